"""Triton backend of the kernels: host launchers, autotune configs, graph ops.

Contract (the public API in `api.py` validates and calls these; the launchers check again,
for direct callers):

    partial_attention(q, k, v, features) -> (out, lse)
        q        [B, Hq, Mq, D]    fp16 | bf16 | fp32, any strides
        k, v     [B, Hkv, Mk, D]   same dtype/device as q, any strides; Hq % Hkv == 0.
                                   Query head h reads kv head h // (Hq // Hkv): GQA/MQA by
                                   head mapping, k/v are never expanded.
        features `features.TileFeatures`: scale (finite), causal, window; per-token
                 q_pos/q_doc int64 [Mq] or [B, Mq], k_pos/k_doc int64 [Mk] or [B, Mk],
                 k_valid bool [Mk] or [B, Mk] (1-D: shared by the batch; docs both or
                 neither); visibility as `reference.visibility`.
        out [B, Hq, Mq, D] dtype of q; lse fp32 [B, Hq, Mq], natural log.
        Rows with no visible key: out 0, lse -inf. Mq == 0 or Mk == 0 are valid.

    expsum_merge(outs, lses) -> (out, lse)
        outs [P, B, H, M, D] fp16 | bf16 | fp32; lses fp32 [P, B, H, M] natural log
        out  [B, H, M, D] dtype of outs; lse fp32 [B, H, M]
        lse = logsumexp_p lses[p];  out = sum_p exp(lses[p] - lse) * outs[p]
        (all partials -inf -> out 0, lse -inf; P == 0 is the same as all -inf).

Two attention kernels, chosen in the op body (`_partial_attention_impl`), so every caller
gets the right one: the decode variant (`triton_decode.py`: the GROUP query heads of a kv
head packed into one row block, key loop bounded per batch row) when GROUP * Mq <= 64 (a
decode step, short chunked prefill), else `partial_attention_fwd_kernel` (one program per
query row block and query head, every key block classified).

Both launchers go through the graph ops `torch.ops.fxdisagg.triton_partial_attention` and
`torch.ops.fxdisagg.triton_expsum_merge`, registered here with `torch.library.triton_op`
(the op bodies launch via `wrap_triton`), so make_fx / torch.export / torch.compile see a
named op or the kernel itself instead of an opaque Python call.

Interpreter: when `TRITON_INTERPRET=1` was set before `triton_kernels` was imported, the
kernels run on CPU tensors in Triton's interpreter (tests on machines without a GPU). The
interpreter cannot multiply bf16; use fp32/fp16 there. Under the interpreter a single small
fixed config is used instead of autotuning, and tracing with fake tensors skips the launch
(the interpreter cannot run on fakes; shapes are all a fake run needs).
"""

import functools
import logging
import math
import threading
from typing import Optional, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from fxdisagg.errors import KernelError, describe
from fxdisagg.kernels import triton_kernels as tk
from fxdisagg.kernels.features import TileFeatures
from fxdisagg.kernels.triton_decode import (REG_BUDGET, SMEM_BUDGET, KernelFeatures, bucket,
                                            kernel_features, launch_decode, uses_decode_kernel)

log = logging.getLogger(__name__)

__all__ = ["partial_attention", "expsum_merge", "INTERPRETED"]

#: True when the jit bodies were decorated under TRITON_INTERPRET=1 (CPU interpreter).
INTERPRETED = isinstance(tk.partial_attention_fwd_kernel, InterpretedFunction)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # BLOCK_D <= 256 keeps the q tile and accumulator in registers


# ----------------------------------------------------------------------------- autotuning


def _attention_configs():
    if INTERPRETED:
        # One config: no benchmarking, and 16x16 tiles keep the interpreter quick while
        # still exercising multi-block loops, ragged tails and block skipping.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def _prune_attention_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit or cannot pay off for this call, before benchmarking.

    - tiles much longer than the shard (short shards, decode): BLOCK_M <= max(32, Mq
      bucket), BLOCK_N <= max(32, Mk bucket);
    - shared memory: q tile + num_stages double (k, v) tiles must fit SMEM_BUDGET, which
      removes the deep pipelines / large BLOCK_N at D = 128 and for fp32 inputs;
    - registers: fp32 accumulator [BLOCK_M, D] + score tile [BLOCK_M, BLOCK_N] per thread;
    - 8 warps on a 32-row tile only adds synchronisation.
    """
    args = {**named_args, **kwargs}
    block_d = args["BLOCK_D"]
    elt = args["Q"].element_size()
    mq, mk = args["MQ_BUCKET"], args["MK_BUCKET"]
    mq = mq if isinstance(mq, int) else 1 << 30
    mk = mk if isinstance(mk, int) else 1 << 30
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        w, s = c.num_warps, c.num_stages
        if bm > max(32, mq) or bn > max(32, mk):
            continue
        if elt * (bm * block_d + s * 2 * bn * block_d) > SMEM_BUDGET:
            continue
        if (bm * block_d + bm * bn) / (32 * w) > REG_BUDGET:
            continue
        if bm == 32 and w == 8:
            continue
        kept.append(c)
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return kept


_attention_kernel = triton.autotune(
    configs=_attention_configs(),
    key=["MQ_BUCKET", "MK_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW"],  # + tensor dtypes
    prune_configs_by=None if INTERPRETED else {"early_config_prune": _prune_attention_configs},
)(tk.partial_attention_fwd_kernel)


def _merge_configs():
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm in (8, 16, 32, 64)
        for w in (2, 4, 8)
        for s in (1, 2)
    ]


def _prune_merge_configs(configs, named_args, **kwargs):
    """Keep tiles of 1K..8K elements (enough bytes in flight per program, no spills) and
    no more rows than the merge has."""
    args = {**named_args, **kwargs}
    block_d, m = args["BLOCK_D"], args["M_BUCKET"]
    m = m if isinstance(m, int) else 1 << 30
    kept = [
        c for c in configs
        if 1024 <= c.kwargs["BLOCK_M"] * block_d <= 8192 and c.kwargs["BLOCK_M"] <= max(8, m)
        and c.kwargs["BLOCK_M"] * block_d >= 256 * c.num_warps
    ]
    return kept or [configs[0]]


_merge_kernel = triton.autotune(
    configs=_merge_configs(),
    key=["M_BUCKET", "HEAD_DIM", "P"],  # + tensor dtypes
    prune_configs_by=None if INTERPRETED else {"early_config_prune": _prune_merge_configs},
)(tk.expsum_merge_kernel)


# ----------------------------------------------------------------------------- checks


def _launchable(*tensors) -> bool:
    """False while tracing with fake/functional tensors under the interpreter, which
    cannot run on them. Compiled kernels are traced by `wrap_triton` instead."""
    if not INTERPRETED:
        return True
    return all(type(t) is torch.Tensor for t in tensors)


def _check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu"):
        return
    if t.device.type == "meta" or not _launchable(t):
        return
    hint = (" (CPU tensors need TRITON_INTERPRET=1 in the environment before "
            "fxdisagg.kernels.triton_kernels is first imported)") if t.device.type == "cpu" else ""
    raise KernelError(f"triton backend: {what} must be on a CUDA device, got {describe(t)}{hint}")


def _check_row_offsets(t: torch.Tensor, name: str) -> None:
    """Kernels index rows and head-dim lanes of one (batch, head) slice with int32
    offsets (batch/head/partial offsets are int64): the slice's span must fit int32."""
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape[-2:], t.stride()[-2:]) if n > 0)
    if isinstance(span, int) and span >= 2**31:  # symbolic shapes: checked when run
        raise KernelError(f"triton backend: {name} rows span {span} elements per (batch, head) "
                          f"slice, beyond int32 offsets; split the shard. Got {describe(t)}")


def _check_attention(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise KernelError(f"triton backend: {name} must be 4-D [B, H, M, D], got {describe(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise KernelError(f"triton backend: {name} must be fp16, bf16 or fp32, got {describe(t)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise KernelError(f"triton backend: q, k, v must share dtype and device, got "
                              f"q {describe(q)}, {name} {describe(t)}")
        _check_device(t, name)
        _check_row_offsets(t, name)
    B, Hq, _, D = q.shape
    if k.shape != v.shape:
        raise KernelError(f"triton backend: k and v must have the same shape, got "
                          f"k {describe(k)}, v {describe(v)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise KernelError(f"triton backend: k must be [B={B}, Hkv, Mk, D={D}], got {describe(k)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise KernelError(f"triton backend: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise KernelError(f"triton backend: head dim must be in [1, {_MAX_HEAD_DIM}], got {D}")


# ----------------------------------------------------------------------------- graph ops


def _partial_attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
    scale: float, causal: bool, window: Optional[int], q_doc: Optional[torch.Tensor],
    k_doc: Optional[torch.Tensor], k_valid: Optional[torch.Tensor],
    window_ahead: Optional[int] = None, softcap: Optional[float] = None,
    alibi: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Body of `fxdisagg::triton_partial_attention`, also its fake implementation (fake
    tensors allocate the outputs; `wrap_triton` records the launch, or under the
    interpreter the launch is skipped). Flat, not a `TileFeatures`: these annotations are
    the op's schema, which holds only tensors and scalars."""
    _check_attention(q, k, v)
    B, Hq, Mq, D = q.shape
    Hkv, Mk = k.shape[1], k.shape[2]
    f = kernel_features(q, k, q_pos, k_pos, scale, causal, window, q_doc, k_doc, k_valid,
                        window_ahead, softcap, alibi)
    out = torch.empty((B, Hq, Mq, D), dtype=q.dtype, device=q.device)  # [B, Hq, Mq, D]
    lse = torch.empty((B, Hq, Mq), dtype=torch.float32, device=q.device)  # [B, Hq, Mq]
    if Mq == 0 or B * Hq == 0:
        return out, lse
    if Mk == 0:  # no key at all: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    if not _launchable(q, k, v):
        return out, lse
    if uses_decode_kernel(Mq, Hq // Hkv):
        launch_decode(q, k, v, out, lse, f)
    else:
        _launch_prefill(q, k, v, out, lse, f)
    return out, lse


def _launch_prefill(q, k, v, out, lse, f: KernelFeatures) -> None:
    """`partial_attention_fwd_kernel`: one program per (query row block, batch * query head)."""
    B, Hq, Mq, _ = q.shape
    Mk = k.shape[2]

    def grid(meta):
        return (triton.cdiv(Mq, meta["BLOCK_M"]), B * Hq)

    wrap_triton(_attention_kernel)[grid](
        q, k, v, *f.pointers(), out, lse, *f.scalars(),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *f.batch_strides,
        Hq, Mq, Mk, Hq // k.shape[1],
        bucket(Mq), bucket(Mk),
        **f.constexprs(q),
    )


def _expsum_merge_impl(outs: torch.Tensor, lses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Body of `fxdisagg::triton_expsum_merge`, also its fake implementation."""
    if outs.dim() != 5 or outs.dtype not in _FLOAT_DTYPES:
        raise KernelError(f"triton backend: outs must be [P, B, H, M, D] fp16/bf16/fp32, "
                          f"got {describe(outs)}")
    P, B, H, M, D = outs.shape
    if lses.shape != (P, B, H, M) or lses.dtype != torch.float32 or lses.device != outs.device:
        raise KernelError(f"triton backend: lses must be fp32 [P={P}, B={B}, H={H}, M={M}] on "
                          f"{outs.device}, got {describe(lses)}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise KernelError(f"triton backend: head dim must be in [1, {_MAX_HEAD_DIM}], got {D}")
    _check_device(outs, "outs")
    _check_row_offsets(outs, "outs")
    dev = outs.device
    out = torch.empty((B, H, M, D), dtype=outs.dtype, device=dev)  # [B, H, M, D]
    lse = torch.empty((B, H, M), dtype=torch.float32, device=dev)  # [B, H, M]
    if M == 0 or B * H == 0:
        return out, lse
    if P == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if not _launchable(outs, lses):
        return out, lse

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), B * H)

    wrap_triton(_merge_kernel)[grid](
        outs, lses, out, lse,
        outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3), outs.stride(4),
        lses.stride(0), lses.stride(1), lses.stride(2), lses.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        P, H, M,
        bucket(M),
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out, lse


def _serialised_when_interpreted(impl):
    """Triton's CPU interpreter patches module-level state while a kernel runs, so two
    threads interpreting at once (the in-process runtime runs one thread per AttnNode)
    corrupt each other. Compiled kernels need no lock."""
    if not INTERPRETED:
        return impl

    @functools.wraps(impl)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return impl(*args, **kwargs)
    return locked


_INTERPRETER_LOCK = threading.Lock()


def _register(name: str, impl):
    """Compiled kernels: `triton_op`, so torch.compile can see through to the kernel.
    Interpreter: a plain opaque `custom_op` with the same body as fake kernel, because
    interpreted kernels cannot be traced into graphs (AOT dispatch would otherwise trace
    the body with the launch skipped)."""
    if INTERPRETED:
        op = torch.library.custom_op(name, _serialised_when_interpreted(impl), mutates_args=())
        op.register_fake(impl)
        return op
    return triton_op(name, impl, mutates_args=())


_partial_attention_op = _register("fxdisagg::triton_partial_attention", _partial_attention_impl)
_expsum_merge_op = _register("fxdisagg::triton_expsum_merge", _expsum_merge_impl)


# ----------------------------------------------------------------------------- launchers


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: TileFeatures
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of one (query shard, key shard) tile; see the module docstring
    for shapes. Returns `(out [B, Hq, Mq, D] dtype of q, lse fp32 [B, Hq, Mq])`."""
    if not math.isfinite(float(f.scale)):
        raise KernelError(f"triton backend: scale must be finite, got {f.scale}")
    return torch.ops.fxdisagg.triton_partial_attention(
        q, k, v, f.q_pos, f.k_pos, float(f.scale), bool(f.causal),
        None if f.window is None else int(f.window), f.q_doc, f.k_doc, f.k_valid,
        None if f.window_ahead is None else int(f.window_ahead),
        None if f.softcap is None else float(f.softcap), f.alibi,
    )


def expsum_merge(outs: torch.Tensor, lses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of P partials `outs [P, B, H, M, D]`, `lses fp32 [P, B, H, M]` into
    `(out [B, H, M, D], lse fp32 [B, H, M])`."""
    return torch.ops.fxdisagg.triton_expsum_merge(outs, lses)
