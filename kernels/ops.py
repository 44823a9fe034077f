"""Graph ops `torch.ops.fxdisagg.partial_attention` and `torch.ops.fxdisagg.expsum_merge`.

The split-attention pass writes these into FX graphs, so they must be traceable
(`torch.export`, Dynamo) and show up by name in dumps: defined in a `torch.library.Library`
with a CompositeExplicitAutograd kernel and fake implementations that only compute output
metadata (they work with symbolic shapes). Not `torch.library.custom_op`: its autograd and
Dynamo-disable wrappers cost ~50 us a call, and an AttnNode's decode step is little else
than these calls (the ops have no backward; fxdisagg runs inference). The real
implementations call `api.py`, so validation and backend choice are the same as for
direct calls.

Differences from the Python API, forced by the op schema:
- `scale` is required (the pass computes it; there is no None default);
- `backend` is a string; "" means automatic (None in `api.py`).

This module registers on import; it is imported exactly once, by `fxdisagg.kernels`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fxdisagg.kernels import api

_PARTIAL_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor? q_doc, Tensor? k_doc, "
    "Tensor? k_valid, float scale, bool causal, int? window, str backend, "
    "int? window_ahead=None, float? softcap=None, float[]? alibi=None) -> (Tensor, Tensor)"
)
_MERGE_SCHEMA = "(Tensor outs, Tensor lses, str backend) -> (Tensor, Tensor)"


_lib = torch.library.Library("fxdisagg", "FRAGMENT")
_lib.define("partial_attention" + _PARTIAL_SCHEMA)
_lib.define("expsum_merge" + _MERGE_SCHEMA)


def partial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_doc: Optional[Tensor],
    k_doc: Optional[Tensor],
    k_valid: Optional[Tensor],
    scale: float,
    causal: bool,
    window: Optional[int],
    backend: str,
    window_ahead: Optional[int] = None,
    softcap: Optional[float] = None,
    alibi: Optional[list[float]] = None,
) -> tuple[Tensor, Tensor]:
    """Graph op for `api.partial_attention`: out `[B, Hq, Mq, D]`, lse fp32 `[B, Hq, Mq]`."""
    return api.partial_attention(
        q, k, v, q_pos, k_pos, scale=scale, causal=causal, window=window,
        q_doc=q_doc, k_doc=k_doc, k_valid=k_valid, backend=backend or None,
        window_ahead=window_ahead, softcap=softcap, alibi=alibi,
    )


def _partial_attention_fake(
    q, k, v, q_pos, k_pos, q_doc, k_doc, k_valid, scale, causal, window, backend,
    window_ahead=None, softcap=None, alibi=None,
):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Hq, Mq, D]
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # [B, Hq, Mq]
    return out, lse


def expsum_merge(outs: Tensor, lses: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Graph op for `api.expsum_merge`: out `[B, H, M, D]` (outs' dtype), lse fp32 `[B, H, M]`."""
    return api.expsum_merge(outs, lses, backend=backend or None)


def _expsum_merge_fake(outs, lses, backend):
    out = outs.new_empty(outs.shape[1:])  # [B, H, M, D]
    lse = lses.new_empty(lses.shape[1:])  # [B, H, M]
    return out, lse


for _name, _real, _fake in (("partial_attention", partial_attention, _partial_attention_fake),
                            ("expsum_merge", expsum_merge, _expsum_merge_fake)):
    _lib.impl(_name, _real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fxdisagg::{_name}", _fake, lib=_lib)
