"""Run by tests/test_tensor_parallel.py under torchrun (not a test module itself): GPT-2
(fused Conv1D qkv) at alpha=1, tp=2, beta=2 on 6 ranks, then greedy generation; each rank
writes its prefill error (rank 0 has the outputs) and whether its tokens equal HF's."""

import os

import torch

import fxdisagg
from fxdisagg.testing import inputs, reference, rel_error, tiny_model

model = tiny_model("gpt2")
kw = inputs("gpt2", 2, 13, padding=True)
dm = fxdisagg.compile(model, 1, 2, tp=2, timeout=60, example_inputs=kw)
out = dm(**kw)
err = rel_error(out[0], reference(model, kw), kw) if out is not None else -1.0
options = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
same = torch.equal(dm.generate(**kw, **options), model.generate(**kw, **options))
with open(os.path.join(os.environ["FXDISAGG_REPORT_DIR"], f"rank{os.environ['RANK']}"), "w") as f:
    f.write(f"{err} {same} {dm.memory[int(os.environ['RANK'])]['params']}")
dm.close()
