"""One model end to end with the Triton kernels (under TRITON_INTERPRET=1 on CPU)."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU interpreter

import fxdisagg  # noqa: E402
from fxdisagg.testing import inputs, reference, rel_error, tiny_model  # noqa: E402


def test_llama_alpha2_beta2_triton_kernels():
    model = tiny_model("llama", hidden=32, heads=2, kv_heads=1)
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess", kernel="triton")
    for n in (1, 7, 19):
        kw = inputs("llama", 1, n)
        assert rel_error(dm(**kw).logits, reference(model, kw), kw) <= 1e-4
