"""Exact fp64 reference of partial attention and expsum-merge: the test oracle.

This module *defines* the semantics every backend must reproduce. It is dense and slow on
purpose (it materializes the `[B, Mq, Mk]` visibility and the fp64 scores) so that it is
obviously correct; it is never used on a hot path except through `visibility`, which the
fast torch path reuses to build the per-tile mask of the general case.

Conventions (shared by every backend, see `api.py`):
- q `[B, Hq, Mq, D]`, k/v `[B, Hkv, Mk, D]`; query head h reads kv head `h // (Hq // Hkv)`.
- lse is the natural-log log-sum-exp of `scale * q.k` over the visible keys, fp32,
  `[B, Hq, Mq]`. A row with no visible key has out 0 and lse -inf.
- scores are `softcap(scale * q.k) + alibi_bias` (each optional), then masked.
- Inputs are assumed already validated by `api.py`; the masking features and the scale
  come as one `features.TileFeatures`, whose `visibility()` applies `visibility` here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # features.py imports this module for `visibility`
    from fxdisagg.kernels.features import TileFeatures

NEG_INF = float("-inf")


def _as_rows(x: Tensor) -> Tensor:
    """Per-token feature `[M]` or `[B, M]` -> `[B|1, M]`, so that all broadcast alike."""
    return x if x.dim() == 2 else x.unsqueeze(0)


def visibility(
    q_pos: Tensor,
    k_pos: Tensor,
    causal: bool = True,
    window: Optional[int] = None,
    q_doc: Optional[Tensor] = None,
    k_doc: Optional[Tensor] = None,
    k_valid: Optional[Tensor] = None,
    window_ahead: Optional[int] = None,
) -> Tensor:
    """The definition of which key each query may attend to: bool `[B|1, Mq, Mk]`.

    Key k is visible to query q iff every enabled condition holds (they are ANDed):
      - causal:   `k_pos <= q_pos`
      - window W: `q_pos - k_pos < W`  (alone, without causal, it bounds only the past)
      - window ahead A: `k_pos - q_pos < A` (with W: a two-sided local window, encoders)
      - documents (q_doc and k_doc given): `q_doc == k_doc`
      - k_valid given: `k_valid[k]` (False marks a padding key, never visible)

    Every per-token argument is `[M]` (shared by the batch) or `[B, M]`. The leading dim of
    the result is B if any argument is per-batch, else 1. Positions need not be sorted nor
    contiguous: they are explicit token positions of the original sequence.
    """
    qp = _as_rows(q_pos)[:, :, None]  # [B|1, Mq, 1]
    kp = _as_rows(k_pos)[:, None, :]  # [B|1, 1, Mk]
    rows = max(qp.shape[0], kp.shape[0])  # B|1 (torch.broadcast_shapes: 10x slower)
    vis = torch.ones((rows, qp.shape[1], kp.shape[2]), dtype=torch.bool, device=qp.device)
    if causal:
        vis = vis & (kp <= qp)
    if window is not None:
        vis = vis & (qp - kp < window)
    if window_ahead is not None:
        vis = vis & (kp - qp < window_ahead)
    if q_doc is not None and k_doc is not None:
        vis = vis & (_as_rows(q_doc)[:, :, None] == _as_rows(k_doc)[:, None, :])
    if k_valid is not None:
        vis = vis & _as_rows(k_valid)[:, None, :]
    return vis


def expand_kv_heads(x: Tensor, hq: int) -> Tensor:
    """`[B, Hkv, M, D]` -> `[B, Hq, M, D]` by the GQA head map `h -> h // (Hq // Hkv)`.

    Returns x itself (no copy) when Hq == Hkv.
    """
    if hq == x.shape[1]:
        return x
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def soft_capped(scores: Tensor, softcap: Optional[float]) -> Tensor:
    """Logit soft-capping (Gemma 2): `softcap * tanh(scores / softcap)`, after the scale and
    before the mask; None leaves the scores as they are."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def alibi_bias(q_pos: Tensor, k_pos: Tensor, slopes: Tensor) -> Tensor:
    """ALiBi (Press et al.): `slopes[h] * (k_pos - q_pos)`, `[B|1, Hq, Mq, Mk]` in slopes'
    dtype, added to the scaled (and soft-capped) scores before the mask.

    Relative to the query, not `slopes[h] * k_pos` as HF's Bloom writes it: the two differ
    by a constant per query row, which softmax ignores, and every tile of a row shifts its
    lse by the same constant, so partials still merge exactly. The relative form keeps the
    bias of visible (past) keys small in magnitude at any position, where `slope * k_pos`
    grows with the sequence and eats fp32 mantissa bits of the scores."""
    rel = _as_rows(k_pos)[:, None, :] - _as_rows(q_pos)[:, :, None]  # [B|1, Mq, Mk]
    return slopes[None, :, None, None] * rel[:, None].to(slopes.dtype)


def partial_attention(q: Tensor, k: Tensor, v: Tensor, f: TileFeatures) -> tuple[Tensor, Tensor]:
    """Dense masked softmax attention in fp64; out in q's dtype, lse fp32 `[B, Hq, Mq]`."""
    hq = q.shape[1]
    q64 = q.double()  # [B, Hq, Mq, D]
    k64 = expand_kv_heads(k.double(), hq)  # [B, Hq, Mk, D]
    v64 = expand_kv_heads(v.double(), hq)  # [B, Hq, Mk, D]
    vis = f.visibility()[:, None]  # [B|1, 1, Mq, Mk]
    scores = soft_capped((q64 @ k64.transpose(-1, -2)) * f.scale, f.softcap)  # [B, Hq, Mq, Mk]
    if f.alibi is not None:
        scores = scores + alibi_bias(f.q_pos, f.k_pos, f.alibi.double())
    scores = scores.masked_fill(~vis, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Mq]; -inf where nothing is visible
    lse_safe = torch.where(torch.isneginf(lse), 0.0, lse)
    probs = torch.exp(scores - lse_safe[..., None])  # exactly 0 on masked keys
    out = probs @ v64  # [B, Hq, Mq, D]
    return out.to(q.dtype), lse.float()


def expsum_merge(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """fp64 merge of partials `outs [P, B, H, M, D]`, `lses [P, B, H, M]`.

    lse = logsumexp_p lses[p]; out = sum_p exp(lses[p] - lse) * outs[p]. A row that is -inf
    in every partial gets out 0 and lse -inf.
    """
    lses64 = lses.double()
    lse = torch.logsumexp(lses64, dim=0)  # [B, H, M]
    lse_safe = torch.where(torch.isneginf(lse), 0.0, lse)
    weights = torch.exp(lses64 - lse_safe)  # [P, B, H, M]; 0 for -inf partials
    out = (weights[..., None] * outs.double()).sum(dim=0)  # [B, H, M, D]
    return out.to(outs.dtype), lse.float()
