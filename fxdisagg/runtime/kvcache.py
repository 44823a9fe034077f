"""KV caches on the AttnNodes, input histories on the CompNodes.

A call that uses a cache carries a `CacheStep`:

- ``fill``: a prefill that starts cache ``cache_id``. Every AttnNode (i, j) attends its tile
  as in any prefill and keeps the rows ``i::beta`` of its key shard j (`keep_rows`): with
  R-sharding those are the tokens ``t % beta**2 == i*beta + j`` (`fxdisagg.plan.cache_owner`),
  so the cache is spread over all beta**2 AttnNodes with no extra traffic.
- ``extend``: ``n`` tokens after ``past`` cached ones (a decode step, or a chunk of a
  chunked prefill). Each AttnNode appends the key-side rows of the tokens it owns and
  attends every new query to its whole cache (split-KV); the CompNodes merge.

CompNode programs are stateless functions of the full-length inputs and the global indices
of the tokens to compute (``tokens``), so a CompNode keeps the inputs seen so far
(`InputHistory`) and an ``extend`` call sends only the new columns: positions, masks and
document ids of the new tokens come out exactly as a prefill of the whole sequence would
compute them.

The AttnNode side is reached from its program through ``fxdisagg::kv_cache`` (see
`fxdisagg.ops`), which asks `fxdisagg.comm.cache()` for the `CacheAction` the worker bound
for this call; without one (a plain prefill) the op passes its inputs through.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

FILL, EXTEND = "fill", "extend"


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """What one call does with KV cache ``cache_id`` (`FILL` or `EXTEND` after ``past``
    tokens). ``drop``: caches the caller released since the last call; workers free them."""

    cache_id: int
    mode: str
    past: int = 0
    drop: tuple[int, ...] = ()


class LayerCache:
    """One layer's cached key-side pieces (k, v, k_pos, and k_doc / k_valid when the layer
    has them) on one AttnNode.

    Each piece is a buffer grown by doubling along its token dim; the live rows are
    ``[start, end)``. Sliding-window layers advance ``start`` past keys that no query can
    see any more (`evict`), and the buffers are compacted when more than half of them is
    dead, so their memory is bounded by the window, not by the generated length.
    """

    def __init__(self, dims: tuple[int, ...], rows: list[Tensor]):
        self.dims = dims
        self.buffers = [r.contiguous().clone() for r in rows]
        self.start, self.end = 0, rows[0].shape[dims[0]] if rows else 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[self.dims[0]]

    def live(self) -> list[Tensor]:
        return [b.narrow(d, self.start, self.end - self.start) for b, d in zip(self.buffers, self.dims)]

    def append(self, rows: list[Tensor]) -> None:
        n = rows[0].shape[self.dims[0]]
        if self.end + n > self.capacity:
            self._reallocate(max(2 * (self.end - self.start), self.end - self.start + n, 16))
        for b, d, r in zip(self.buffers, self.dims, rows):
            b.narrow(d, self.end, n).copy_(r)
        self.end += n

    def evict(self, n_dead: int) -> None:
        """Forget the ``n_dead`` oldest live keys; compact once half the buffer is dead."""
        self.start += n_dead
        if self.start > self.capacity // 2:
            self._reallocate(max(2 * (self.end - self.start), 16))

    def _reallocate(self, capacity: int) -> None:
        live = self.live()
        grown = []
        for b, d, l in zip(self.buffers, self.dims, live):
            shape = list(b.shape)
            shape[d] = capacity
            g = b.new_empty(shape)
            g.narrow(d, 0, l.shape[d]).copy_(l)
            grown.append(g)
        self.buffers, self.end, self.start = grown, self.end - self.start, 0

    def nbytes(self) -> int:
        """Bytes of the live rows (what the cache holds, not the slack of its buffers)."""
        return sum(l.numel() * l.element_size() for l in self.live())

    def __len__(self) -> int:
        return self.end - self.start


def keep_rows(n_key_rows: int, i: int, beta: int) -> Tensor:
    """Rows of AttnNode (i, j)'s key tile (shard j, sorted) that it keeps after a fill."""
    return torch.arange(i, n_key_rows, beta)


def dead_prefix(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor | None, window: int) -> int:
    """How many of the oldest cached keys no query from now on can see through a sliding
    ``window``: positions only grow (each new query's position is at least the smallest of
    this step's), so a key with ``min_q_pos - k_pos >= window`` in every batch row (or
    padding there) stays invisible for good."""
    min_q = q_pos.min(dim=-1, keepdim=True).values if q_pos.dim() == 2 else q_pos.min()
    dead = (min_q - k_pos) >= window
    if k_valid is not None:
        dead = dead | ~k_valid
    if dead.dim() == 2:
        dead = dead.all(dim=0)
    return int(dead.to(torch.int64).cumprod(0).sum())


class CacheAction:
    """What ``fxdisagg::kv_cache`` does on one AttnNode during one call of a `CacheStep`.

    fill: store the kept rows of every layer's key tile, attend the tile as it is.
    extend: evict what the window hides, append the new rows, attend the whole cache.
    """

    def __init__(self, layers: dict[int, LayerCache], mode: str, i: int, beta: int):
        self.layers, self.mode, self.i, self.beta = layers, mode, i, beta

    def __call__(self, layer: int, keys: list[Tensor], q_pos: Tensor, window: int | None,
                 names: tuple[str, ...], dims: tuple[int, ...]) -> list[Tensor]:
        if self.mode == FILL:
            rows = keep_rows(keys[0].shape[dims[0]], self.i, self.beta).to(keys[0].device)
            self.layers[layer] = LayerCache(dims, [k.index_select(d, rows) for k, d in zip(keys, dims)])
            return list(keys)
        cache = self.layers.get(layer)
        if cache is None:
            raise RuntimeError(f"no KV cache for layer {layer}: extend a cache that a fill "
                               f"(its first call) created")
        if window is not None and len(cache):
            live = dict(zip(names, cache.live()))
            cache.evict(dead_prefix(q_pos, live["k_pos"], live.get("k_valid"), window))
        cache.append(list(keys))
        return cache.live()


class InputHistory:
    """A CompNode's full-length inputs of one cache: what a prefill of the whole sequence
    would have been given. ``extend`` appends the new columns along the token dim (1)."""

    def __init__(self, flat: list):
        self.flat = list(flat)

    def extend(self, new: list) -> list:
        self.flat = [torch.cat([old, n], dim=1) for old, n in zip(self.flat, new)]
        return self.flat
