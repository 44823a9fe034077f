"""Attention kernels of fxdisagg: partial attention and expsum-merge.

Public, stable API (see `api.py` for the contract and conventions):

    out, lse = partial_attention(q, k, v, q_pos, k_pos, *, scale=None, causal=True,
                                 window=None, q_doc=None, k_doc=None, k_valid=None,
                                 backend=None)
    out, lse = expsum_merge(outs, lses, *, backend=None)

Backends: "torch" (fast CPU/GPU torch path), "reference" (fp64, tests only), "triton".
The graph ops `torch.ops.fxdisagg.partial_attention` / `torch.ops.fxdisagg.expsum_merge`
are registered in `ops.py` on import of this package.
"""

from fxdisagg.kernels.api import expsum_merge, partial_attention  # noqa: F401
from fxdisagg.kernels import ops  # noqa: F401  (registers torch.ops.fxdisagg.*)

__all__ = ["partial_attention", "expsum_merge"]
