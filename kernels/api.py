"""Public kernel API: partial attention over one key shard, and expsum-merge of partials.

This is the one entry point every caller uses (AttnNode programs, the custom ops in
`ops.py`, tests). It validates and normalizes the arguments once, then dispatches to a
backend, so that backends may assume well-formed inputs:

- "torch":     fast torch path (`torch_cpu.py`); the CPU flash kernel on CPU, a math
               formulation elsewhere. Default for CPU tensors.
- "reference": fp64 dense oracle (`reference.py`); tests only.
- "triton":    `fxdisagg.kernels.triton_backend`, imported lazily. Default for CUDA tensors.

Conventions (numerical, shared by all backends):
- q `[B, Hq, Mq, D]`, k/v `[B, Hkv, Mk, D]`, `Hq % Hkv == 0`; query head h reads kv head
  `h // (Hq // Hkv)` (GQA/MQA). k/v are never expanded by the caller.
- Positions, document ids: int64 `[M]` or `[B, M]`; key validity: bool `[Mk]` or `[B, Mk]`.
  The visibility rule is `reference.visibility`. Backends receive these features and the
  scale as one `features.TileFeatures`: `backend.partial_attention(q, k, v, features)`.
- out: q's dtype, contiguous `[B, Hq, Mq, D]`. lse: fp32 natural log, contiguous
  `[B, Hq, Mq]`. A row with no visible key: out 0, lse -inf, never NaN.
- Mq == 0 or Mk == 0 (empty shards) is valid.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fxdisagg.errors import KernelError, describe
from fxdisagg.kernels import reference, torch_cpu
from fxdisagg.kernels.features import TileFeatures

BACKENDS = ("torch", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(cond: bool, op: str, msg) -> None:
    """Raise KernelError(op: msg) unless cond; msg may be a callable, built only on failure."""
    if not cond:
        raise KernelError(f"{op}: {msg() if callable(msg) else msg}")


def resolve_backend(backend: Optional[str], device: torch.device, op: str) -> str:
    """None -> "triton" for CUDA tensors, "torch" otherwise; reject unknown names."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    _check(
        backend in BACKENDS,
        op,
        f"unknown backend {backend!r}; expected one of {BACKENDS} or None (automatic)",
    )
    return backend


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    op = "partial_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(t, Tensor), op, lambda: f"{name} must be a Tensor, got {type(t).__name__}")
        _check(t.dim() == 4, op, lambda: f"{name} must be 4-D [B, H, M, D], got {describe(t)}")
        _check(t.dtype in FLOAT_DTYPES, op, lambda: f"{name} must be one of {FLOAT_DTYPES}, got {describe(t)}")

    def shapes() -> str:
        return f"q={describe(q)}, k={describe(k)}, v={describe(v)}"

    _check(q.dtype == k.dtype == v.dtype, op, lambda: f"q, k, v must share a dtype; {shapes()}")
    _check(q.device == k.device == v.device, op, lambda: f"q, k, v must share a device; {shapes()}")
    _check(k.shape == v.shape, op, lambda: f"k and v must have the same shape; {shapes()}")
    _check(q.shape[0] == k.shape[0], op, lambda: f"batch sizes differ; {shapes()}")
    _check(
        q.shape[3] == k.shape[3] and q.shape[3] > 0, op, lambda: f"head dims differ or are 0; {shapes()}"
    )
    hq, hkv = q.shape[1], k.shape[1]
    _check(
        hkv > 0 and hq % hkv == 0,
        op,
        lambda: f"query heads Hq={hq} must be a positive multiple of kv heads Hkv={hkv}; {shapes()}",
    )


def _check_token_feature(
    name: str, t: Tensor, dtype: torch.dtype, batch: int, length: int, device: torch.device
) -> None:
    """A per-token feature is `[M]` or `[B, M]` of the given dtype, on the tensors' device."""
    op = "partial_attention"
    _check(isinstance(t, Tensor), op, lambda: f"{name} must be a Tensor, got {type(t).__name__}")
    _check(t.dtype == dtype, op, lambda: f"{name} must have dtype {dtype}, got {describe(t)}")
    _check(t.device == device, op, lambda: f"{name} must be on {device}, got {describe(t)}")
    ok = tuple(t.shape) in ((length,), (batch, length))
    _check(ok, op, lambda: f"{name} must have shape [{length}] or [{batch}, {length}], got {describe(t)}")


def _check_features(q: Tensor, k: Tensor, f: TileFeatures) -> None:
    op = "partial_attention"
    b, mq, mk, dev = q.shape[0], q.shape[2], k.shape[2], q.device
    _check_token_feature("q_pos", f.q_pos, torch.int64, b, mq, dev)
    _check_token_feature("k_pos", f.k_pos, torch.int64, b, mk, dev)
    _check((f.q_doc is None) == (f.k_doc is None), op, "q_doc and k_doc must be given together")
    if f.q_doc is not None:
        _check_token_feature("q_doc", f.q_doc, torch.int64, b, mq, dev)
        _check_token_feature("k_doc", f.k_doc, torch.int64, b, mk, dev)
    if f.k_valid is not None:
        _check_token_feature("k_valid", f.k_valid, torch.bool, b, mk, dev)
    c = f.softcap
    _check(c is None or (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0), op,
           f"softcap must be None or a number > 0, got {c!r}")
    for name in ("window", "window_ahead"):
        w = getattr(f, name)
        is_int = isinstance(w, int) and not isinstance(w, bool)
        _check(w is None or is_int, op, f"{name} must be None or an int, got {w!r}")


def _slopes(alibi, q: Tensor) -> Optional[Tensor]:
    """ALiBi slopes as fp32 `[Hq]` on q's device (a list, as the graph op passes them, is
    converted once per distinct list and device)."""
    if alibi is None:
        return None
    if not isinstance(alibi, Tensor):
        _check(all(isinstance(x, (int, float)) for x in alibi), "partial_attention",
               f"alibi must be a Tensor or a sequence of numbers, got {alibi!r}")
        alibi = _slopes_tensor(tuple(float(x) for x in alibi), q.device)
    _check(alibi.shape == (q.shape[1],) and alibi.is_floating_point(), "partial_attention",
           lambda: f"alibi must hold one slope per query head ({q.shape[1]}), got {describe(alibi)}")
    return alibi.to(device=q.device, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _slopes_tensor(slopes: tuple, device: torch.device) -> Tensor:
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def partial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    window: Optional[int] = None,
    q_doc: Optional[Tensor] = None,
    k_doc: Optional[Tensor] = None,
    k_valid: Optional[Tensor] = None,
    backend: Optional[str] = None,
    window_ahead: Optional[int] = None,
    softcap: Optional[float] = None,
    alibi: Optional[Union[Tensor, Sequence[float]]] = None,
) -> tuple[Tensor, Tensor]:
    """Attention of queries q over one key shard (k, v): `(out, lse)`.

    q `[B, Hq, Mq, D]`; k, v `[B, Hkv, Mk, D]`; q_pos `[Mq]|[B, Mq]`, k_pos `[Mk]|[B, Mk]`
    int64 token positions. Visibility (`reference.visibility`): causal `k_pos <= q_pos`,
    window `q_pos - k_pos < window`, window ahead `k_pos - q_pos < window_ahead`, documents `q_doc == k_doc`, `k_valid` (False = padding).
    scale defaults to `1/sqrt(D)`; softcap caps the scaled scores at `softcap * tanh(s / softcap)`;
    alibi (Hq slopes) adds `alibi[h] * (k_pos - q_pos)` to them. Returns out (q's dtype) `[B, Hq, Mq, D]` and lse (fp32,
    natural log) `[B, Hq, Mq]`; rows with no visible key give out 0, lse -inf.
    Raises KernelError on malformed arguments.
    """
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    features = TileFeatures(q_pos, k_pos, scale=scale, causal=bool(causal), window=window,
                            window_ahead=window_ahead, q_doc=q_doc, k_doc=k_doc,
                            k_valid=k_valid, softcap=None if softcap is None else float(softcap),
                            alibi=_slopes(alibi, q))
    _check_features(q, k, features)
    name = resolve_backend(backend, q.device, "partial_attention")
    out, lse = _backend(name).partial_attention(q, k, v, features)
    return out.contiguous(), lse.contiguous()


def _check_merge(outs, lses) -> int:
    """Validate P partials (stacked tensors or sequences of tensors); returns P."""
    op = "expsum_merge"
    stacked = isinstance(outs, Tensor), isinstance(lses, Tensor)
    _check(stacked[0] == stacked[1], op, "outs and lses must both be Tensors or both sequences")
    if stacked[0]:
        _check(outs.dim() == 5, op, lambda: f"outs must be 5-D [P, B, H, M, D], got {describe(outs)}")
        _check(
            lses.shape == outs.shape[:-1],
            op,
            lambda: f"lses must be [P, B, H, M] matching outs; outs={describe(outs)}, lses={describe(lses)}",
        )
        p = outs.shape[0]
    else:
        p = len(outs)
        _check(len(lses) == p, op, f"got {p} outs but {len(lses)} lses")
        _check(p > 0 and all(isinstance(t, Tensor) for t in (*outs, *lses)), op, "need P >= 1 Tensors")
        for o, l in zip(outs, lses):
            ok = o.dim() == 4 and o.shape == outs[0].shape and l.shape == o.shape[:-1]
            _check(ok, op, lambda: f"partials must be [B, H, M, D] and [B, H, M]; got {describe(o)}, {describe(l)}")
    _check(p > 0, op, "need at least one partial (P >= 1)")
    for o, l in zip(outs, lses):
        _check(o.dtype in FLOAT_DTYPES, op, lambda: f"outs must be one of {FLOAT_DTYPES}; got {describe(o)}")
        _check(o.dtype == outs[0].dtype, op, lambda: f"outs must share a dtype; got {describe(o)}")
        _check(l.dtype == torch.float32, op, lambda: f"lses must be float32; got {describe(l)}")
        _check(o.device == l.device == outs[0].device, op, lambda: f"partials must share a device; got {describe(o)}, {describe(l)}")
    return p


def expsum_merge(outs, lses, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Exact merge of P partials: `lse = logsumexp_p lses[p]`, `out = sum_p exp(lses[p]-lse) outs[p]`.

    outs `[P, B, H, M, D]` (any float dtype), lses fp32 `[P, B, H, M]`; or, equivalently,
    sequences of P tensors `[B, H, M, D]` / `[B, H, M]` (what a receiver of separate
    messages holds; saves stacking). Computed in fp32, out returned in outs' dtype
    `[B, H, M, D]`, lse fp32 `[B, H, M]`. Rows that are -inf in every partial give out 0
    and lse -inf. Outputs never alias the inputs, even for P == 1.
    """
    _check_merge(outs, lses)
    name = resolve_backend(backend, outs[0].device, "expsum_merge")
    if name != "torch" and not isinstance(outs, Tensor):
        outs, lses = torch.stack(list(outs)), torch.stack(list(lses))  # [P, B, H, M, D], [P, B, H, M]
    out, lse = _backend(name).expsum_merge(outs, lses)
    return out.contiguous(), lse.contiguous()


def _backend(name: str):
    """The module of a backend: `partial_attention(q, k, v, features)`, `expsum_merge(outs,
    lses)`. Triton is imported on first use: it is optional and its import is slow."""
    if name == "torch":
        return torch_cpu
    if name == "reference":
        return reference
    return importlib.import_module("fxdisagg.kernels.triton_backend")
