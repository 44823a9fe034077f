"""Graph ops of the fxdisagg namespace that are not kernels.

- ``fxdisagg::attention``: the canonical attention that `find_attention` rewrites every
  spelling into; carries either a raw mask (before `classify_masks`) or per-token features.
- ``fxdisagg::take_shard``: the keys (or key features) of one attention shard, in the
  single-process graph that `split_attention` produces; runnable, so that graph can be
  checked against the model on its own.
- Split-phase collectives ``exchange_start`` (returns a handle) and ``exchange_wait``
  (returns the received tensors), one pair per (layer, phase) on every rank. They appear by
  name in the role programs, are effectful (never dead-code eliminated or reordered), have
  real fake implementations (role programs re-trace), and calling them runs the transport
  bound to the current worker (`fxdisagg.comm`), which executes the exchange schedule.

- ``kv_cache``: where an AttnNode's partial attention gets its keys: the tile (prefill) or
  the AttnNode's KV cache (decode), by the call's cache action (`fxdisagg.runtime.kvcache`).
- ``tp_all_reduce``: the sum of a tensor over the calling CompNode rank's tensor-parallel
  group (`fxdisagg.tensor_parallel` puts one after each row-parallel linear). Not marked
  effectful: it is in the model when `torch.export` captures it, where effect tokens would
  thread through every pass; its result is always used (no DCE) and FX never reorders.

The kernels' ops (``fxdisagg::partial_attention``, ``fxdisagg::expsum_merge``) are
registered in `fxdisagg.kernels.ops`.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from fxdisagg import comm
from fxdisagg.kernels.reference import alibi_bias, expand_kv_heads, soft_capped, visibility
from fxdisagg.plan import assign


# -- canonical attention ---------------------------------------------------------------------
@torch.library.custom_op("fxdisagg::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], q_pos: Optional[Tensor],
              k_pos: Optional[Tensor], q_doc: Optional[Tensor], k_doc: Optional[Tensor],
              k_valid: Optional[Tensor], scale: float, causal: bool, window: Optional[int],
              window_ahead: Optional[int] = None, softcap: Optional[float] = None,
              alibi: Optional[list[float]] = None) -> Tensor:
    """softmax(q k^T * scale + mask) v with GQA by head mapping. ``mask`` is bool (True =
    visible) or additive float, broadcastable to [B, Hq, Mq, Mk]; positions default to the
    token index; ``alibi`` (one slope per query head) adds ``slope * (k_pos - q_pos)``.
    Rows with no visible key give 0. Runs in the input dtype with fp32 softmax."""
    k = expand_kv_heads(k, q.shape[1])  # [B, Hq, Mk, D]
    v = expand_kv_heads(v, q.shape[1])
    mq, mk = q.shape[2], k.shape[2]
    scores = soft_capped((q.float() @ k.float().transpose(-1, -2)) * scale, softcap)  # [B, Hq, Mq, Mk]
    q_pos = q_pos if q_pos is not None else torch.arange(mq, device=q.device)
    k_pos = k_pos if k_pos is not None else torch.arange(mk, device=q.device)
    visible = visibility(q_pos, k_pos, causal, window, q_doc, k_doc, k_valid, window_ahead)[:, None]
    if alibi is not None:
        scores = scores + alibi_bias(q_pos, k_pos, torch.tensor(alibi, device=q.device))
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask.float()
    scores = scores.masked_fill(~visible, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).to(q.dtype)


@attention.register_fake
def _(q, k, v, mask, q_pos, k_pos, q_doc, k_doc, k_valid, scale, causal, window,
      window_ahead=None, softcap=None, alibi=None):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


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


# -- split-phase, effectful collectives ---------------------------------------------------------
# Registered through torch.library directly rather than `custom_op`: a received tile is a set
# of views into one receive buffer (no copy), and custom_op forbids outputs that alias each
# other. Both ops are marked effectful (ORDERED), so `Node.is_impure()` is True for them:
# DCE keeps them even when nothing reads their result, and passes do not reorder them.
_lib = torch.library.Library("fxdisagg", "FRAGMENT")
_lib.define("exchange_start(Tensor[] send, int layer, str phase) -> Tensor")
_lib.define("exchange_wait(Tensor handle, Tensor[] rows, int layer, str phase, str pieces) -> Tensor[]")
_lib.define("kv_cache(Tensor[] keys, Tensor q_pos, int layer, int? window, str pieces) -> Tensor[]")


def exchange_start(send: list[Tensor], layer: int, phase: str) -> Tensor:
    """Start this rank's part of the (layer, phase) exchange: pack ``send`` as the schedule
    says and issue the collective. Returns a handle (int64 scalar) for `exchange_wait`."""
    return torch.tensor(comm.current().start(layer, phase, list(send)), dtype=torch.int64)


def exchange_wait(handle: Tensor, rows: list[Tensor], layer: int, phase: str, pieces: str) -> list[Tensor]:
    """Wait for the exchange ``handle`` started and return what this rank received:
    ``pieces`` (`fxdisagg.pieces.PieceSpec` text) in order, the token dim of a piece of
    side s sized ``rows[s].size(0)``. Empty for a rank that only sends in this phase."""
    return comm.current().wait(int(handle), list(rows))


def _exchange_start_fake(send, layer, phase):
    return torch.empty((), dtype=torch.int64)


def _exchange_wait_fake(handle, rows, layer, phase, pieces):
    from fxdisagg.pieces import decode_pieces
    specs = decode_pieces(pieces)
    device = rows[0].device if rows else handle.device
    return [torch.empty(p.sized(rows[p.side].shape[0]), dtype=p.dtype, device=device)
            for p in specs]


def kv_cache(keys: list[Tensor], q_pos: Tensor, layer: int, window: Optional[int],
             pieces: str) -> list[Tensor]:
    """An AttnNode's key-side tile (``pieces``: k, v, k_pos, ...) -> the keys its partial
    attention reads. Without a cache (plain prefill) that is the tile; a call that fills a
    cache also stores this AttnNode's share of it; a call that extends one appends the tile
    to the cache (after evicting what a sliding ``window`` hides from ``q_pos`` on) and
    returns the whole cache (`fxdisagg.runtime.kvcache.CacheAction`)."""
    action = comm.cache()
    if action is None:
        return list(keys)
    from fxdisagg.pieces import decode_pieces
    specs = decode_pieces(pieces)
    return action(layer, list(keys), q_pos, window, tuple(p.name for p in specs),
                  tuple(p.token_dim for p in specs))


_CACHED_LENGTHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _kv_cache_fake(keys, q_pos, layer, window, pieces):
    """The cached length is data (it grows per call): one size shared by all pieces, and
    by every layer with the same ``window`` in one trace, because such layers cache the
    same tokens and evict by the same rule. One size per window rather than per layer is
    also cheaper: shapes built from one symbol hit the shape environment's caches (the
    32-layer lowering also skips re-propagating the AttnNode stages, whose inputs now
    match: its fake propagation went from ~0.7 s to ~0.55 s, benchmarks/passes.py)."""
    from fxdisagg.pieces import decode_pieces
    specs = decode_pieces(pieces)
    mode = getattr(q_pos, "fake_mode", None)   # a wrapped fake (functionalization) has none
    per_window = _CACHED_LENGTHS.setdefault(mode, {}) if mode is not None else {}
    if window not in per_window:
        per_window[window] = torch.library.get_ctx().new_dynamic_size()
    rows = per_window[window]
    return [k.new_empty(p.sized(rows)) for k, p in zip(keys, specs)]


# pointwise: out[i] is the sum of the group's x[i], so it keeps tokens apart (partition)
_lib.define("tp_all_reduce(Tensor x) -> Tensor", tags=(torch.Tag.pointwise,))


def tp_all_reduce(x: Tensor) -> Tensor:
    """``x`` summed over this rank's tensor-parallel group, in group order on every rank
    (so the group's ranks hold bitwise equal results)."""
    return comm.current().all_reduce(x)


_lib.impl("tp_all_reduce", tp_all_reduce, "CompositeExplicitAutograd")
torch.library.register_fake("fxdisagg::tp_all_reduce", lambda x: torch.empty_like(x), lib=_lib)


for _name, _real, _fake in (("exchange_start", exchange_start, _exchange_start_fake),
                            ("exchange_wait", exchange_wait, _exchange_wait_fake),
                            ("kv_cache", kv_cache, _kv_cache_fake)):
    _lib.impl(_name, _real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fxdisagg::{_name}", _fake, lib=_lib)
    torch.library._register_effectful_op(f"fxdisagg::{_name}", torch._library.effects.EffectType.ORDERED)
