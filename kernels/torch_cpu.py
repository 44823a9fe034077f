"""Fast torch path of partial attention and expsum-merge (backend "torch").

On CPU this is what AttnNodes run, so it avoids dense masks wherever the tile allows:
the fused CPU flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`) returns
the log-sum-exp we need, and the tiles R-sharding produces are causal triangles:

1. no masking feature left          -> one plain call (GQA folded into the row dim: free);
   only key validity left (a decode step: every cached key is in the query's past, some
   are left padding) -> the same call with one additive mask row per batch row;
2. causal only, and the tile's visibility is `tril(0)` of the `[Mq, Mk]` grid -> one
   top-left causal call; if it is `tril(-1)` (query stripe before key stripe: local query
   a sees local key b iff b < a) -> row 0 sees nothing, rows 1.. are a causal call;
3. anything else                    -> a per-tile additive mask `[B|1, 1, Mq, Mk]` built
   from the features by `reference.visibility`, rows with no visible key fixed afterwards;
   with ALiBi the mask is per head and holds the bias (`[B|1, Hq, Mq, Mk]`).

Before that, features that cannot mask anything in this tile are dropped in O(Mq + Mk)
(all keys valid, one document, windows wider than the tile's span, all keys in the past),
and a causal tile whose keys are all in the future returns at once (contiguous sharding).

On other devices (CUDA, where triton is the real kernel) or dtypes the flash kernel lacks,
a math formulation in fp32 is used. Inputs are assumed validated by `api.py`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from fxdisagg.kernels.features import TileFeatures
from fxdisagg.kernels.reference import expand_kv_heads, soft_capped

NEG_INF = float("-inf")
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- features


def _shared_rows(x: Optional[Tensor]) -> Optional[Tensor]:
    """`[B, M]` whose rows are all equal -> `[M]`: enables the 1-D fast paths."""
    if x is None or x.dim() == 1:
        return x
    if x.shape[0] == 1 or bool((x == x[:1]).all()):
        return x[0]
    return x


def _simplify(f: TileFeatures) -> tuple[TileFeatures, bool]:
    """Drop every feature that masks nothing in this tile (O(Mq + Mk), exact); and whether
    the tile is causal with every key after every query (upper tiles of contiguous
    sharding: nothing visible).

    Every fact it needs is a min or max over a few per-token tensors, read with one
    ``tolist()``: an AttnNode's decode tile is small enough that the kernel's ~0.3 ms was
    beside ~60 us of these checks when each was its own reduction and sync."""
    extremes = [f.q_pos, f.k_pos] + ([f.q_doc, f.k_doc] if f.q_doc is not None else [])
    facts = [x for t in extremes for x in torch.aminmax(t)]
    if f.k_valid is not None:
        facts.append(f.k_valid.all())
    facts = torch.stack(facts).tolist()
    q_lo, q_hi, k_lo, k_hi = facts[:4]
    q_doc, k_doc, k_valid = f.q_doc, f.k_doc, f.k_valid
    window, ahead, causal = f.window, f.window_ahead, f.causal
    if q_doc is not None and min(facts[4], facts[6]) == max(facts[5], facts[7]):
        q_doc = k_doc = None  # one document
    if k_valid is not None and facts[-1]:
        k_valid = None
    if window is not None and q_hi - k_lo < window:  # largest q_pos - k_pos of the tile
        window = None
    if ahead is not None and k_hi - q_lo < ahead:  # largest k_pos - q_pos of the tile
        ahead = None
    nothing_visible = causal and k_lo > q_hi
    if causal and k_hi <= q_lo:  # every key in every query's past
        causal = False
    return replace(f, causal=causal, window=window, window_ahead=ahead,
                   q_doc=q_doc, k_doc=k_doc, k_valid=k_valid), nothing_visible


def _rows_shared(f: TileFeatures) -> TileFeatures:
    """Per-token features whose batch rows are all equal as `[M]` (`_shared_rows`), so a
    dense mask is built once for the batch."""
    return replace(f, q_pos=_shared_rows(f.q_pos), k_pos=_shared_rows(f.k_pos),
                   q_doc=_shared_rows(f.q_doc), k_doc=_shared_rows(f.k_doc),
                   k_valid=_shared_rows(f.k_valid))


def _triangle_offset(q_pos: Tensor, k_pos: Tensor) -> Optional[int]:
    """0 or -1 if causal visibility of 1-D positions is `tril(offset)` of `[Mq, Mk]`, else None.

    With keys sorted, row a sees exactly the first `searchsorted(k_pos, q_pos[a], right)`
    keys; `tril(o)` means that count is `clamp(a + 1 + o, 0, Mk)`. O(Mq log Mk + Mk).
    """
    if q_pos.dim() != 1 or k_pos.dim() != 1:
        return None
    mq, mk = q_pos.shape[0], k_pos.shape[0]
    if mk > 1 and not bool((k_pos[1:] >= k_pos[:-1]).all()):
        return None
    counts = torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True)  # [Mq]
    rows = torch.arange(mq, device=q_pos.device)
    for offset in (0, -1):
        if bool((counts == (rows + 1 + offset).clamp(0, mk)).all()):
            return offset
    return None


# ----------------------------------------------------------------------------- helpers


def _empty_rows(q: Tensor) -> tuple[Tensor, Tensor]:
    """The result of a tile where no query sees any key: out 0, lse -inf."""
    b, h, m, d = q.shape
    out = torch.zeros(b, h, m, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, m), NEG_INF, dtype=torch.float32, device=q.device)
    return out, lse


def _fix_empty_rows(out: Tensor, lse: Tensor, any_visible: Tensor) -> tuple[Tensor, Tensor]:
    """Force out 0 / lse -inf on rows with no visible key. any_visible `[B|1, Mq]`."""
    keep = any_visible[:, None]  # [B|1, 1, Mq]
    lse = torch.where(keep, lse, NEG_INF)
    out = torch.where(keep[..., None], out, 0.0)
    return out, lse


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, mask=None):
    """CPU flash call with equal heads; lse as fp32 (the kernel gives fp64 for fp64 input)."""
    out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return out, lse.float()


# ----------------------------------------------------------------------------- CPU cases


def _plain(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """No mask: fold the GQA group into the query rows instead of expanding k/v."""
    b, hq, mq, d = q.shape
    hkv = k.shape[1]
    qf = q.reshape(b, hkv, (hq // hkv) * mq, d)  # [B, Hkv, G*Mq, D]
    out, lse = _flash(qf, k, v, scale, False)
    return out.reshape(b, hq, mq, d), lse.reshape(b, hq, mq)


def _padded(q: Tensor, k: Tensor, v: Tensor, f: TileFeatures) -> tuple[Tensor, Tensor]:
    """Only padding masks: the mask depends on the key alone, so it is one additive row
    `[B|1, 1, 1, Mk]` that the kernel broadcasts over heads and query rows, and the GQA
    group folds into the rows as in `_plain` (no k/v expansion, no `[Mq, Mk]` mask). This is
    every decode tile of a left-padded batch, the AttnNode's hot path."""
    b, hq, mq, d = q.shape
    hkv = k.shape[1]
    valid = f.k_valid if f.k_valid.dim() == 2 else f.k_valid[None]  # [B|1, Mk]
    mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, NEG_INF)
    qf = q.reshape(b, hkv, (hq // hkv) * mq, d)  # [B, Hkv, G*Mq, D]
    out, lse = _flash(qf, k, v, f.scale, False, mask[:, None, None])
    out, lse = out.reshape(b, hq, mq, d), lse.reshape(b, hq, mq)
    any_valid = valid.any(-1)  # [B|1]
    if bool(any_valid.all()):
        return out, lse
    return _fix_empty_rows(out, lse, any_valid[:, None].expand(-1, mq))


def _triangle(q: Tensor, k: Tensor, v: Tensor, scale: float, offset: int) -> tuple[Tensor, Tensor]:
    """Causal tile `tril(0)`: row a sees keys [0, a] (`_causal`).
    `tril(-1)`: row 0 sees nothing, rows 1.. are `tril(0)` of `q[:, :, 1:]`."""
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])  # [B, Hq, Mk, D]
    if offset == 0:
        return _causal(q, k, v, scale)
    if q.shape[2] == 1:
        return _empty_rows(q)
    o1, l1 = _causal(q[:, :, 1:], k, v, scale)  # [B, Hq, Mq-1, D]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Hq, Mq, D]
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # [B, Hq, Mq]
    out[:, :, 0] = 0.0
    lse[:, :, 0] = NEG_INF
    out[:, :, 1:] = o1
    lse[:, :, 1:] = l1
    return out, lse


ROW_BLOCK = 64          # rows per call of a row-blocked triangle (`_causal`)
ROW_BLOCKED = (128, 1024)  # query rows for which a triangle is cut into row blocks


def row_blocked(mq: int) -> bool:
    """Whether `_causal` cuts a triangle of ``mq`` rows into row blocks: for 128..1024 rows,
    and only on one intra-op thread. On two, the 64-row calls (16 (head, 32-row) work items
    each) spent more in fork and join and in their output copies than the blocks saved: at
    N=4096, beta=4 (1024-row tiles), the tiles took 2.04x the fused causal SDPA row-blocked
    and 1.59x as one call each, against 1.24x and 1.40x on one thread. An AttnNode runs one
    thread whenever the AttnNodes outnumber the cores (`fxdisagg.runtime.spawn._threads`),
    the case the blocks are for."""
    return ROW_BLOCKED[0] <= mq <= ROW_BLOCKED[1] and torch.get_num_threads() == 1


def _causal(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """`tril(0)` of `[Mq, Mk]`: row a sees keys [0, min(a + 1, Mk)).

    The CPU flash kernel walks keys in blocks of 512 for every row block of a causal call,
    so a triangle of up to ~1k rows computes much of its upper half: a 1024-row tile does
    1.5x the visible work, a 512-row tile 2x. For such tiles the triangle is cut into row
    blocks of `ROW_BLOCK`, each one call over exactly the keys it can see, with an additive
    mask for its diagonal part, a view of one shared mask. Measured single-threaded, H=8,
    D=64: 0.63x the one call's time at 512 rows, 0.83x at 1024, but 1.09x at 2048, where
    the smaller GEMMs and the mask reads cost more than the waste: larger tiles stay one
    call (`benchmarks/attention_cpu.py`). Only on one thread (`row_blocked`)."""
    mq, mk = q.shape[2], k.shape[2]
    if not row_blocked(mq):
        return _flash(q, k, v, scale, True)
    bs = ROW_BLOCK
    width = -(-mq // bs) * bs  # block b's keys [0, r1) are columns [width - bs - r0, ...) of:
    mask = torch.zeros(bs, width, dtype=q.dtype, device=q.device)
    mask[:, width - bs:] = torch.full((bs, bs), NEG_INF, dtype=q.dtype, device=q.device).triu(1)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Hq, Mq, D]
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # [B, Hq, Mq]
    for r0 in range(0, mq, bs):
        r1, kv = min(r0 + bs, mq), min(r0 + bs, mk)
        col = width - bs - r0
        o, l = _flash(q[:, :, r0:r1], k[:, :, :kv], v[:, :, :kv], scale, False,
                      mask[: r1 - r0, col:col + kv])
        out[:, :, r0:r1] = o
        lse[:, :, r0:r1] = l
    return out, lse


def _masked(q: Tensor, k: Tensor, v: Tensor, f: TileFeatures) -> tuple[Tensor, Tensor]:
    """General tile: additive mask `[B|1, 1, Mq, Mk]` (the CPU kernel rejects bool masks);
    with ALiBi the mask carries the bias too, per head: `[B|1, Hq, Mq, Mk]`.

    GQA either folds the group into the query rows, which repeats the mask G times, or
    expands k/v to every query head: whichever copies less. Decode tiles (Mq = 1 against
    the whole cache slice) fold: the mask copy is D*Hkv*2 times smaller than k/v's."""
    vis = f.visibility()  # [B|1, Mq, Mk]
    mask = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, NEG_INF)
    b, hq, mq, d = q.shape
    g = hq // k.shape[1]
    if f.alibi is not None:  # per head: [B|1, Hq, Mq, Mk]
        bias = f.bias().to(q.dtype).masked_fill(~vis[:, None], NEG_INF)
        k, v = expand_kv_heads(k, hq), expand_kv_heads(v, hq)  # [B, Hq, Mk, D]
        out, lse = _flash(q, k, v, f.scale, False, bias)
    elif g > 1 and mask.shape[0] * g * mq < 2 * b * hq * d:
        qf = q.reshape(b, hq // g, g * mq, d)  # [B, Hkv, G*Mq, D]: row gi*Mq + m
        rows = mask[:, None].expand(-1, g, mq, -1).reshape(-1, 1, g * mq, mask.shape[-1])  # a view at Mq = 1
        out, lse = _flash(qf, k, v, f.scale, False, rows)
        out, lse = out.reshape(b, hq, mq, d), lse.reshape(b, hq, mq)
    else:
        k, v = expand_kv_heads(k, hq), expand_kv_heads(v, hq)  # [B, Hq, Mk, D]
        out, lse = _flash(q, k, v, f.scale, False, mask[:, None])
    any_visible = vis.any(-1)  # [B|1, Mq]
    if bool(any_visible.all()):  # the usual case: no row to fix
        return out, lse
    return _fix_empty_rows(out, lse, any_visible)


# ----------------------------------------------------------------------------- math path


def _math(q: Tensor, k: Tensor, v: Tensor, f: TileFeatures) -> tuple[Tensor, Tensor]:
    """Dense fp32 (fp64 for fp64 input) softmax: the fallback off CPU; O(Mq*Mk) memory."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq = q.shape[1]
    k, v = expand_kv_heads(k.to(acc), hq), expand_kv_heads(v.to(acc), hq)  # [B, Hq, Mk, D]
    scores = soft_capped((q.to(acc) @ k.transpose(-1, -2)) * f.scale, f.softcap)  # [B, Hq, Mq, Mk]
    if f.alibi is not None:
        scores = scores + f.bias().to(acc)
    if not f.masks_nothing():
        scores = scores.masked_fill(~f.visibility()[:, None], NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Mq]
    lse_safe = torch.where(torch.isneginf(lse), 0.0, lse)
    out = torch.exp(scores - lse_safe[..., None]) @ v  # [B, Hq, Mq, D]
    return out.to(q.dtype), lse.float()


# ----------------------------------------------------------------------------- entry points


def _classify(q: Tensor, k: Tensor, f: TileFeatures) -> tuple[str, TileFeatures]:
    """Which case handles this tile, after dropping features that mask nothing; the dense
    cases ("masked", "math") get batch-shared rows as `[M]`, so their mask is built once."""
    if q.numel() == 0 or k.shape[2] == 0:
        return "empty", f  # also: the CPU kernel crashes on empty inputs
    f, nothing_visible = _simplify(f)
    if nothing_visible:
        return "empty", f
    kind = _case(q, f)
    return kind, (_rows_shared(f) if kind in ("masked", "math") else f)


def _case(q: Tensor, f: TileFeatures) -> str:
    """The cheapest case that is exact for the simplified features ``f``."""
    if q.device.type != "cpu" or q.dtype not in _FLASH_DTYPES or f.softcap is not None:
        return "math"   # the flash kernel has no soft-capping: the exact dense path
    if f.alibi is not None:
        return "masked"  # the bias rides in the additive mask
    if f.masks_nothing():
        return "plain"
    if f.only_padding():
        return "padded"
    if f.only_causal():
        offset = _triangle_offset(_shared_rows(f.q_pos), _shared_rows(f.k_pos))
        if offset is not None:
            return ("causal", "causal_shifted")[-offset]
    return "masked"


def tile_kind(q: Tensor, k: Tensor, features: TileFeatures) -> str:
    """Name of the case `partial_attention` uses for this tile, for tests and dumps:
    "empty", "plain", "padded", "causal", "causal_shifted", "masked" or "math"."""
    return _classify(q, k, features)[0]


def partial_attention(
    q: Tensor, k: Tensor, v: Tensor, features: TileFeatures
) -> tuple[Tensor, Tensor]:
    """See `api.partial_attention`. out `[B, Hq, Mq, D]` (q dtype), lse fp32 `[B, Hq, Mq]`."""
    kind, f = _classify(q, k, features)
    if kind == "empty":
        return _empty_rows(q)
    if kind == "plain":
        return _plain(q, k, v, f.scale)
    if kind == "padded":
        return _padded(q, k, v, f)
    if kind in ("causal", "causal_shifted"):
        return _triangle(q, k, v, f.scale, 0 if kind == "causal" else -1)
    if kind == "masked":
        return _masked(q, k, v, f)
    return _math(q, k, v, f)


def expsum_merge(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """See `api.expsum_merge`. P partials out `[B, H, M, D]` and lse fp32 `[B, H, M]`, given as
    `[P, ...]` tensors or sequences of P tensors (no stacking copy needed).

    Folds the partials in one at a time: with L the running lse and w = exp(lse_p - L_new),
    the running out becomes `lerp(out, out_p, w)` = (1 - w) out + w out_p: one fp32 pass
    over the data per partial. A partial with lse -inf gets w = 0 exactly, so a row -inf
    in every partial keeps lse -inf and out 0 (partial rows with lse -inf must be finite;
    `partial_attention` gives 0 there).
    """
    lse = lses[0]  # [B, H, M]
    out = outs[0].float()  # [B, H, M, D] fp32
    if len(outs) == 1:
        return out.to(outs[0].dtype, copy=True), lse.clone()
    for p in range(1, len(outs)):
        new = torch.logaddexp(lse, lses[p])  # -inf only if both are -inf
        w = torch.exp(lses[p] - torch.where(torch.isneginf(new), 0.0, new))  # [B, H, M]
        out_p = outs[p].float()
        if p == 1:
            out = torch.lerp(out, out_p, w.unsqueeze(-1))  # a new tensor: never the input
        else:
            out.lerp_(out_p, w.unsqueeze(-1))
        lse = new
    return out.to(outs[0].dtype), lse
