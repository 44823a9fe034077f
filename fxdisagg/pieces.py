"""Pieces: the tensors one attention layer sends between CompNodes and AttnNodes, as data.

`PieceSpec` is one tensor that travels (dtype, shape with the token dim explicit, whose
rows it carries, where its batch and head dims are); `LayerPieces` is what one layer
sends, read off the graph by the lowering (`passes/lower.py`), which also writes the specs
into the comm ops of the role programs as text (`encode_pieces`), so that the ops' fake
implementations, dumps and the runtime read the same thing. Who sends which rows of them
to whom is the exchange schedule's business (`fxdisagg.schedule`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

import torch
from torch import Tensor

QUERY, KEY = 0, 1                      # sides: whose rows a piece carries
SIDE_NAMES = ("query", "key")

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
    torch.bool, torch.uint8, torch.int8)}


@dataclasses.dataclass(frozen=True)
class PieceSpec:
    """One tensor that travels: dtype and shape, ``None`` at the token dim.

    ``side``: whose rows it carries (QUERY: the query shard's, KEY: the key shard's).
    ``batch_dim``: the dim holding the batch, if any (per-token features shared by the
    batch are ``[M]``); ``head_dim``: the dim holding attention heads, if any (tensor
    parallelism splits it). Encoded in graphs as ``name:dtype[b2,h4,*,16]@query`` so that
    comm ops' fake implementations, dumps and the runtime read the same text.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int | None, ...]
    side: int = QUERY
    batch_dim: int | None = None
    head_dim: int | None = None

    @property
    def token_dim(self) -> int:
        return self.shape.index(None)

    def sized(self, rows: int) -> tuple[int, ...]:
        return tuple(rows if s is None else s for s in self.shape)

    def row_bytes(self, batch: int | None = None) -> int:
        """Bytes per token row (for ``batch`` rows of the batch dim, default as captured)."""
        dims = [s for k, s in enumerate(self.shape) if s is not None and k != self.batch_dim]
        b = 1 if self.batch_dim is None else (self.shape[self.batch_dim] if batch is None else batch)
        return math.prod(dims) * b * self.dtype.itemsize

    def with_heads(self, factor: int) -> "PieceSpec":
        """The spec with ``factor`` times the heads (an AttnNode's view of a TP rank's piece)."""
        if self.head_dim is None or factor == 1:
            return self
        shape = list(self.shape)
        shape[self.head_dim] *= factor
        return dataclasses.replace(self, shape=tuple(shape))

    def encode(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        mark = {self.batch_dim: "b", self.head_dim: "h"}
        dims = ",".join("*" if s is None else f"{mark.get(k, '')}{s}" for k, s in enumerate(self.shape))
        return f"{self.name}:{dtype}[{dims}]@{SIDE_NAMES[self.side]}"

    @staticmethod
    def decode(text: str) -> "PieceSpec":
        m = re.fullmatch(r"(\w+):(\w+)\[([^\]]*)\]@(\w+)", text)
        if m is None:
            raise ValueError(f"not a piece spec: {text!r}")
        name, dtype, dims, side = m.groups()
        shape, batch_dim, head_dim = [], None, None
        for k, s in enumerate(d for d in dims.split(",") if d):
            if s.startswith("b"):
                batch_dim, s = k, s[1:]
            elif s.startswith("h"):
                head_dim, s = k, s[1:]
            shape.append(None if s == "*" else int(s))
        return PieceSpec(name, _DTYPES[dtype], tuple(shape), SIDE_NAMES.index(side), batch_dim,
                         head_dim)

    @staticmethod
    def of(name: str, t: Tensor, token_dim: int, side: int, head_dim: int | None = None
           ) -> "PieceSpec":
        """The spec of an example tensor whose token dim is ``token_dim``."""
        shape = tuple(None if k == token_dim else int(s) for k, s in enumerate(t.shape))
        batch_dim = 0 if t.dim() >= 2 and token_dim != 0 else None
        return PieceSpec(name, t.dtype, shape, side, batch_dim, head_dim)


def encode_pieces(pieces: Sequence[PieceSpec]) -> str:
    return " ".join(p.encode() for p in pieces)


@functools.lru_cache(maxsize=1024)      # the op arguments of the programs: a few per layer
def decode_pieces(text: str) -> tuple[PieceSpec, ...]:
    return tuple(PieceSpec.decode(t) for t in text.split())


@dataclasses.dataclass(frozen=True)
class LayerPieces:
    """What one attention layer sends, independent of N: read off the graph by the lowering.

    query: q, q_pos (, q_doc); key: k, v, k_pos (, k_doc, k_valid); reply: out ``[B, Hq, *,
    Dv]`` (Dv from v, not q) and lse ``[B, Hq, *]``. ``stacked``: the partials as the
    CompNode receives them, ``[arity, B, Hq, *, Dv]`` and ``[arity, B, Hq, *]``.
    """

    layer: int
    query: tuple[PieceSpec, ...]
    key: tuple[PieceSpec, ...]
    reply: tuple[PieceSpec, ...]
    arity: int

    @property
    def dispatch(self) -> tuple[PieceSpec, ...]:
        return self.query + self.key

    @property
    def stacked(self) -> tuple[PieceSpec, ...]:
        return tuple(dataclasses.replace(p, shape=(self.arity, *p.shape),
                                         batch_dim=None if p.batch_dim is None else p.batch_dim + 1,
                                         head_dim=None if p.head_dim is None else p.head_dim + 1)
                     for p in self.reply)

    def all_heads(self, tp: int) -> "LayerPieces":
        """The pieces as an AttnNode holds them: the heads of all ``tp`` ranks of a group."""
        def widen(ps):
            return tuple(p.with_heads(tp) for p in ps)
        return dataclasses.replace(self, query=widen(self.query), key=widen(self.key),
                                   reply=widen(self.reply))
