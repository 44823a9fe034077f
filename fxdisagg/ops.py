"""Graph ops of the fxdisagg namespace that are not kernels.

- ``fxdisagg::attention``: the canonical attention that `find_attention` rewrites every
  spelling into; carries either a raw mask (before `classify_masks`) or per-token features.
- ``fxdisagg::take_shard``: the keys (or key features) of one attention shard, in the
  single-process graph that `split_attention` produces; runnable, so that graph can be
  checked against the model on its own.
- Communication markers ``dispatch``/``combine`` (CompNode side) and ``receive``/``reply``
  (AttnNode side). They appear by name in the role programs; calling them runs the
  transport bound to the current worker (`fxdisagg.comm`).

The kernels' ops (``fxdisagg::partial_attention``, ``fxdisagg::expsum_merge``) are
registered in `fxdisagg.kernels.ops`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fxdisagg import comm
from fxdisagg.kernels.reference import expand_kv_heads, visibility
from fxdisagg.plan import assign


# -- canonical attention ---------------------------------------------------------------------
@torch.library.custom_op("fxdisagg::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q_pos: Optional[Tensor],
              k_pos: Optional[Tensor], q_doc: Optional[Tensor], k_doc: Optional[Tensor],
              k_valid: Optional[Tensor], scale: float, causal: bool, window: Optional[int]) -> Tensor:
    """softmax(q k^T * scale + mask) v with GQA by head mapping. ``mask`` is bool (True =
    visible) or additive float, broadcastable to [B, Hq, Mq, Mk]; positions default to the
    token index. Rows with no visible key give 0. Runs in the input dtype with fp32 softmax."""
    k = expand_kv_heads(k, q.shape[1])  # [B, Hq, Mk, D]
    v = expand_kv_heads(v, q.shape[1])
    mq, mk = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, Hq, Mq, Mk]
    q_pos = q_pos if q_pos is not None else torch.arange(mq, device=q.device)
    k_pos = k_pos if k_pos is not None else torch.arange(mk, device=q.device)
    visible = visibility(q_pos, k_pos, causal, window, q_doc, k_doc, k_valid)[:, None]
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask.float()
    scores = scores.masked_fill(~visible, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).to(q.dtype)


@attention.register_fake
def _(q, k, v, mask, q_pos, k_pos, q_doc, k_doc, k_valid, scale, causal, window):
    return q.new_empty(q.shape)


# -- one attention shard of a token-indexed tensor ---------------------------------------------
def shard_index(n: int, shard: int, nshards: int, strategy: str, device) -> Tensor:
    """Token indices of ``shard`` out of ``nshards`` for a sequence of length n (sorted)."""
    return torch.nonzero(assign(n, nshards, strategy) == shard).flatten().to(device)


@torch.library.custom_op("fxdisagg::take_shard", mutates_args=())
def take_shard(x: Tensor, dim: int, shard: int, nshards: int, strategy: str) -> Tensor:
    """``x`` restricted along its token dim ``dim`` to the tokens of one attention shard."""
    return x.index_select(dim, shard_index(x.shape[dim], shard, nshards, strategy, x.device))


@take_shard.register_fake
def _(x, dim, shard, nshards, strategy):
    shape = list(x.shape)
    shape[dim] = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(shape)


# -- communication markers -----------------------------------------------------------------------
@torch.library.custom_op("fxdisagg::dispatch", mutates_args=())
def dispatch(q_side: list[Tensor], k_side: list[Tensor], layer: int) -> Tensor:
    """CompNode -> AttnNodes for one layer: query-side tensors (q, q_pos, q_doc) go to the
    AttnNodes of their shard's row, key-side ones (k, v, k_pos, k_doc, k_valid) to their
    shard's column. Token dim: 2 for [B, H, M, D] tensors, the last dim for features.
    Returns a ticket that orders `combine` after it."""
    comm.current().dispatch(layer, list(q_side), list(k_side))
    return torch.zeros((), dtype=torch.int64)


@dispatch.register_fake
def _(q_side, k_side, layer):
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("fxdisagg::combine", mutates_args=())
def combine(ticket: Tensor, q: Tensor, v: Tensor, beta: int, layer: int) -> tuple[Tensor, Tensor]:
    """AttnNodes -> CompNode for one layer: the beta partial outputs and lse of this
    CompNode's own queries, ``outs [beta, B, Hq, n, Dv]``, ``lses [beta, B, Hq, n]``.
    ``q`` and ``v`` are the dispatched ones: they give the shapes (the fake implementation)."""
    return comm.current().combine(layer)


@combine.register_fake
def _(ticket, q, v, beta, layer):
    b, hq, n, _ = q.shape
    return v.new_empty((beta, b, hq, n, v.shape[-1])), q.new_empty((beta, b, hq, n), dtype=torch.float32)


@torch.library.custom_op("fxdisagg::receive", mutates_args=())
def receive(layer: int) -> list[Tensor]:
    """AttnNode side of the dispatch: this tile's query-side then key-side tensors, rows in
    ascending token order."""
    return comm.current().receive(layer)


@receive.register_fake
def _(layer):
    raise NotImplementedError("fxdisagg::receive has data-dependent shapes; it is not traced")


@torch.library.custom_op("fxdisagg::reply", mutates_args=())
def reply(out: Tensor, lse: Tensor, layer: int) -> Tensor:
    """AttnNode side of the return: each query row's partial goes back to its CompNode."""
    comm.current().reply(layer, out, lse)
    return torch.zeros((), dtype=torch.int64)


@reply.register_fake
def _(out, lse, layer):
    return torch.empty((), dtype=torch.int64)
