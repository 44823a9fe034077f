"""Triton decode variant of partial attention: host side of `partial_attention_decode_kernel`.

In decode an AttnNode holds a slice of the KV cache (its key shard, sorted by token
position) and receives Mq new query rows: Mq = 1 for a decode step, a few for chunked
prefill. The prefill kernel (`partial_attention_fwd_kernel`) then wastes most of its work:
one program per (row block, query head) holds 1 real row of 32+, reloads the kv head's k/v
once per query head (GROUP = Hq // Hkv times), and visits every key block from 0 only to
skip most of them under a sliding window or left padding. The decode kernel instead:

- packs the GROUP query heads that share a kv head into the row block (query-major:
  packed row r = query r // GROUP of head hk * GROUP + r % GROUP), as flash-decoding and
  FlashInfer do, so k/v are loaded once per kv head;
- loops over keys [lo, hi) of each batch row only (`key_bounds`), in blocks that start at
  lo, still classifying each block (causal, window, documents, padding) so that the
  bounds need only contain the visible keys: loose bounds cost time, never correctness.

When (`uses_decode_kernel`): GROUP * Mq <= 64. Then every row that reads one kv head fits
one program (BLOCK_M <= 64), so each k/v byte of [lo, hi) is read once per kv head, the
least any kernel can read; a decode step is bound by exactly these bytes. Above 64 rows a
program would need a 128-row tile (register pressure at D up to 256) or several row
blocks that each reload k/v, which is what the prefill kernel does, with autotuned tiles
up to 128 rows: that many queries make the tile compute-bound, where those tiles win.
64 rows cover the decode steps of common models (GROUP <= 8 with Mq <= 8; MQA with up to
64 query heads at Mq = 1).

Bounds rule (`key_bounds`), torch ops on the device, no host sync, any key order: for
batch row b a key can matter only if some query of the row could see it:
`(k_pos <= max q_pos if causal) & (min q_pos - k_pos < W if window) & k_valid &
(min q_doc <= k_doc <= max q_doc if documents)`; lo = the first such key, hi = the last
+ 1, lo = hi = 0 if none. For sorted keys, consecutive queries, causal, window and left
padding (a decode step on R-sharded tiles or on the cache) [lo, hi) runs from the first to
the last key some query sees, so the kernel loads the causal minimum of
cdiv(hi - lo, BLOCK_N) key blocks (tests/test_triton_decode.py counts them under the
interpreter with COUNT_BLOCKS).

This module is also the lower layer of `triton_backend` (which imports it and dispatches
here from the graph op's body, interpreter lock included): the kernel-side layout of a
tile's features (`KernelFeatures`) and the tuning budgets shared by both launchers live
here, so that the two modules do not import each other. Device code is in
`triton_kernels.py`; shapes and conventions as in `triton_backend.py`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from fxdisagg.errors import KernelError, describe
from fxdisagg.kernels import triton_kernels as tk

#: True when the jit bodies were decorated under TRITON_INTERPRET=1 (CPU interpreter).
INTERPRETED = isinstance(tk.partial_attention_decode_kernel, InterpretedFunction)

#: Most packed rows (GROUP * Mq) of one (batch, kv head) the decode kernel is chosen for.
MAX_PACKED_ROWS = 64

# Ampere (A100) allows ~163 KiB of shared memory per block, Hopper ~227 KiB: prune to what
# both can hold so one list serves both.
SMEM_BUDGET = 160 * 1024
# fp32 registers per thread left for the accumulator and the score tile.
REG_BUDGET = 192
_LOG2E = 1.4426950408889634


def bucket(n):
    """Autotune key for a length: the next power of two, so that every new shard length
    does not retune. Symbolic lengths (tracing) pass through unchanged rather than
    specialising the graph on them."""
    if isinstance(n, int):
        return 1 << max(n - 1, 0).bit_length()
    return n


def uses_decode_kernel(mq: int, group: int) -> bool:
    """The dispatch rule (module docstring): all GROUP * Mq rows of a kv head in one program."""
    return mq * group <= MAX_PACKED_ROWS


# ----------------------------------------------------------------------------- features


def _per_token(t: Optional[torch.Tensor], name: str, b: int, m: int, dtype: torch.dtype,
               device: torch.device) -> Tuple[Optional[torch.Tensor], int]:
    """Per-token feature as a 2-D tensor with a contiguous token dim plus its batch stride
    (0 when shared by the whole batch). `[M]`, `[1, M]` and `[B, M]` are accepted."""
    if t is None:
        return None, 0
    if t.dtype != dtype:
        raise KernelError(f"triton backend: {name} must be {dtype}, got {describe(t)}")
    if t.device != device:
        raise KernelError(f"triton backend: {name} must be on {device}, got {describe(t)}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != m or t.shape[0] not in (1, b):
        raise KernelError(f"triton backend: {name} must be [{m}] or [{b}, {m}], got {describe(t)}")
    if m > 1 and t.stride(1) != 1:
        t = t.contiguous()  # O(B*M) integers: negligible next to the tile
    if dtype == torch.bool:
        t = t.view(torch.uint8)  # same bytes; pointers to uint8 are portable across backends
    return t, (t.stride(0) if t.shape[0] == b and b > 1 else 0)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelFeatures:
    """One tile's features as both attention kernels read them. Per-token tensors are 2-D
    `[1|B, M]` with a contiguous token dim (k_valid viewed as uint8, 0 = padding);
    `batch_strides` are theirs in kernel argument order, 0 when shared by the batch."""

    q_pos: torch.Tensor  # int64 [1|B, Mq]
    k_pos: torch.Tensor  # int64 [1|B, Mk]
    q_doc: Optional[torch.Tensor]  # int64 [1|B, Mq]
    k_doc: Optional[torch.Tensor]  # int64 [1|B, Mk]
    k_valid: Optional[torch.Tensor]  # uint8 [1|B, Mk]
    batch_strides: Tuple[int, int, int, int, int]  # q_pos, k_pos, q_doc, k_doc, k_valid
    scale: float
    causal: bool
    window: Optional[int]
    window_ahead: Optional[int] = None
    softcap: Optional[float] = None
    alibi: Optional[torch.Tensor] = None  # fp32 [Hq] ALiBi slopes

    def pointers(self) -> tuple:
        """QPOS, KPOS, QDOC, KDOC, KVALID, ALIBI; absent features become positions (never
        read)."""
        def _or(t):
            return self.k_pos if t is None else t
        return (self.q_pos, self.k_pos, _or(self.q_doc), _or(self.k_doc), _or(self.k_valid),
                _or(self.alibi))

    def scalars(self) -> tuple:
        """qk_scale_log2 (the kernels work in base 2), the window and the window ahead
        (0 when unused), the softcap (1.0 when unused)."""
        return (self.scale * _LOG2E, 0 if self.window is None else self.window,
                0 if self.window_ahead is None else self.window_ahead,
                1.0 if self.softcap is None else float(self.softcap))

    def constexprs(self, q: torch.Tensor) -> dict:
        """The tile's compile-time kernel arguments (head dim, feature flags, precision)."""
        return dict(
            HEAD_DIM=q.shape[-1],
            BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),  # lanes >= D masked
            IS_CAUSAL=bool(self.causal),
            HAS_WINDOW=self.window is not None,
            HAS_WINDOW_AHEAD=self.window_ahead is not None,
            HAS_SOFTCAP=self.softcap is not None,
            HAS_ALIBI=self.alibi is not None,
            HAS_DOC=self.q_doc is not None,
            HAS_VALID=self.k_valid is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )


def kernel_features(q, k, q_pos, k_pos, scale, causal=True, window=None, q_doc=None, k_doc=None,
                    k_valid=None, window_ahead=None, softcap=None, alibi=None) -> KernelFeatures:
    """Check the features of tile (q `[B, Hq, Mq, D]`, k `[B, Hkv, Mk, D]`) and lay them
    out for the kernels. Raises KernelError naming the feature."""
    B, Mq, Mk, dev = q.shape[0], q.shape[2], k.shape[2], q.device
    if (q_doc is None) != (k_doc is None):
        raise KernelError("triton backend: q_doc and k_doc must be given together")
    qp, s_qp = _per_token(q_pos, "q_pos", B, Mq, torch.int64, dev)
    kp, s_kp = _per_token(k_pos, "k_pos", B, Mk, torch.int64, dev)
    qd, s_qd = _per_token(q_doc, "q_doc", B, Mq, torch.int64, dev)
    kd, s_kd = _per_token(k_doc, "k_doc", B, Mk, torch.int64, dev)
    kv, s_kv = _per_token(k_valid, "k_valid", B, Mk, torch.bool, dev)
    if alibi is not None and (alibi.shape != (q.shape[1],) or alibi.dtype != torch.float32
                              or alibi.device != dev):
        raise KernelError(f"triton backend: alibi must be fp32 [{q.shape[1]}] on {dev}, got "
                          f"{describe(alibi)}")
    return KernelFeatures(qp, kp, qd, kd, kv, (s_qp, s_kp, s_qd, s_kd, s_kv),
                          float(scale), bool(causal), window, window_ahead, softcap,
                          None if alibi is None else alibi.contiguous())


def key_bounds(f: KernelFeatures) -> torch.Tensor:
    """int32 `[1|B, 2]`: per batch row `(lo, hi)`, the first and one past the last key that
    some query of the row could see, `(0, 0)` if none (the rule of the module docstring).
    Torch ops only: no host sync, traceable. Correct for any key order; the first to the
    last visible key for sorted keys under causal, window and left padding."""
    keep = torch.ones_like(f.k_pos, dtype=torch.bool)  # [1|B, Mk]
    if f.causal:
        keep = keep & (f.k_pos <= f.q_pos.amax(-1, keepdim=True))
    if f.window is not None:
        keep = keep & (f.q_pos.amin(-1, keepdim=True) - f.k_pos < f.window)
    if f.window_ahead is not None:
        keep = keep & (f.k_pos - f.q_pos.amax(-1, keepdim=True) < f.window_ahead)
    if f.q_doc is not None:
        keep = keep & (f.k_doc >= f.q_doc.amin(-1, keepdim=True))
        keep = keep & (f.k_doc <= f.q_doc.amax(-1, keepdim=True))
    if f.k_valid is not None:
        keep = keep & (f.k_valid != 0)
    mk = keep.shape[-1]
    idx = torch.arange(mk, dtype=torch.int32, device=keep.device)  # [Mk]
    hi = torch.where(keep, idx + 1, 0).amax(-1)  # [1|B]; 0 when no key
    lo = torch.where(keep, idx, mk).amin(-1).minimum(hi)  # [1|B]; 0 when no key
    return torch.stack([lo, hi], dim=-1)  # [1|B, 2]


# ----------------------------------------------------------------------------- autotuning


def _decode_configs():
    if INTERPRETED:
        # One config, as for the prefill kernel: 16-key blocks exercise multi-block loops,
        # unaligned starts and ragged tails while keeping the interpreter quick.
        return [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn in (32, 64, 128)
        for w in (2, 4)
        for s in (2, 3, 4)
    ]


def _prune_decode_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit or cannot pay off, before benchmarking: BLOCK_N <=
    max(32, Mk bucket); q tile + num_stages double (k, v) tiles within SMEM_BUDGET; fp32
    accumulator + score tile within REG_BUDGET registers per thread. BLOCK_M is the host's."""
    args = {**named_args, **kwargs}
    bm, block_d, elt = args["BLOCK_M"], args["BLOCK_D"], args["Q"].element_size()
    mk = args["MK_BUCKET"] if isinstance(args["MK_BUCKET"], int) else 1 << 30
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= max(32, mk)
        and elt * (bm * block_d + c.num_stages * 2 * c.kwargs["BLOCK_N"] * block_d) <= SMEM_BUDGET
        and (bm * block_d + bm * c.kwargs["BLOCK_N"]) / (32 * c.num_warps) <= REG_BUDGET
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.num_stages, -c.num_warps))]


_decode_kernel = triton.autotune(
    configs=_decode_configs(),
    key=["MK_BUCKET", "HEAD_DIM", "BLOCK_M", "IS_CAUSAL", "HAS_WINDOW"],  # + tensor dtypes
    prune_configs_by=None if INTERPRETED else {"early_config_prune": _prune_decode_configs},
)(tk.partial_attention_decode_kernel)


# ----------------------------------------------------------------------------- launcher


class BlockCounts(NamedTuple):
    """Key blocks each decode program loaded (`launch_decode(..., count_blocks=True)`)."""

    loaded: torch.Tensor  # int32 [B, Hkv, row blocks]
    block_n: int  # BLOCK_N of the config that ran


def launch_decode(q, k, v, out, lse, f: KernelFeatures, *,
                  count_blocks: bool = False) -> Optional[BlockCounts]:
    """Fill `out [B, Hq, Mq, D]` (q's dtype) and `lse fp32 [B, Hq, Mq]` (natural log) with
    the decode kernel. Inputs as checked by `triton_backend` (q, k, v of one dtype and
    device, any strides; Mq, Mk, B * Hq > 0; real tensors under the interpreter).
    With count_blocks, also returns how many key blocks each program loaded."""
    B, Hq, Mq, _ = q.shape
    Hkv = k.shape[1]
    rows = (Hq // Hkv) * Mq  # packed rows per (batch, kv head)
    block_m = max(16, triton.next_power_of_2(min(rows, MAX_PACKED_ROWS)))  # tl.dot: >= 16
    grid = (triton.cdiv(rows, block_m), B * Hkv)
    bounds = key_bounds(f)  # int32 [1|B, 2]
    loaded = (torch.empty((B, Hkv, grid[0]), dtype=torch.int32, device=q.device)
              if count_blocks else bounds)  # [B, Hkv, row blocks]; else a dummy
    wrap_triton(_decode_kernel)[grid](
        q, k, v, *f.pointers(), out, lse, bounds, loaded, *f.scalars(),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *f.batch_strides, bounds.stride(0) if bounds.shape[0] > 1 else 0,
        Hkv, Mq, Hq // Hkv, bucket(k.shape[2]),
        **f.constexprs(q), COUNT_BLOCKS=count_blocks, BLOCK_M=block_m,
    )
    if not count_blocks:
        return None
    return BlockCounts(loaded, _decode_kernel.best_config.kwargs["BLOCK_N"])
