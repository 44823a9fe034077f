"""The Plan: which token goes where, and what each collective moves.

A Plan is data. It is built from (N, alpha, beta, strategy), printable, serialisable to JSON
and testable on its own; the partitioner, the exchange and both runtimes only read it.

Placements (DESIGN.md, "R-sharding"). Tokens are 0-based positions t < N.
- "r" (default): attention shard of t is ``t % beta`` (round-robin stripes), so every tile
  (i, j) of the causal mask is a plain (i >= j) or strictly (i < j) lower triangle and all
  beta^2 AttnNodes get the same work to within one row. CompNode of t is
  ``(t // beta) % alpha``: chunks of beta consecutive tokens dealt round-robin, so every
  CompNode holds an equal share of every attention shard and the dispatch is a balanced
  all-to-all.
- "contiguous": shard i holds ``[i*N/beta, (i+1)*N/beta)``; the upper tiles of a causal mask
  are idle (max/mean work near 2 - 1/beta). For comparison.
- "zigzag": 2*beta chunks, shard i holds chunks i and 2*beta-1-i (the head-tail placement of
  ring attention); CompNodes likewise with 2*alpha chunks.

Any N >= 1 works: shards differ by at most one token (R) and N < beta leaves shards empty.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from fxdisagg.config import STRATEGIES, validate_degrees
from fxdisagg.errors import ConfigError


def _owner_r(t: torch.Tensor, n: int, parts: int, chunk: int) -> torch.Tensor:
    return (t // chunk) % parts


def _owner_contiguous(t: torch.Tensor, n: int, parts: int) -> torch.Tensor:
    return (t * parts) // n


def _owner_zigzag(t: torch.Tensor, n: int, parts: int) -> torch.Tensor:
    chunk = (t * 2 * parts) // n  # which of 2*parts contiguous chunks
    return torch.where(chunk < parts, chunk, 2 * parts - 1 - chunk)


def assign(n: int, parts: int, strategy: str, *, chunk: int = 1) -> torch.Tensor:
    """Owner in ``[0, parts)`` of every token ``t < n``, int64 ``[n]``."""
    t = torch.arange(n, dtype=torch.int64)
    if strategy == "r":
        return _owner_r(t, n, parts, chunk)
    if strategy == "contiguous":
        return _owner_contiguous(t, n, parts)
    if strategy == "zigzag":
        return _owner_zigzag(t, n, parts)
    raise ConfigError(f"sharding={strategy!r} is not a placement; choose one of {STRATEGIES}")


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Token placement for one sequence length N. Plans are equal (and hash equal) when
    built from the same (N, alpha, beta, strategy): the token sets are a function of those.

    comp_tokens[c]: sorted token indices owned by CompNode c (int64).
    shard_tokens[i]: sorted token indices of attention shard i (int64); AttnNode (i, j)
        attends queries of shard i to keys of shard j.
    """

    n_tokens: int
    alpha: int
    beta: int
    strategy: str
    comp_tokens: tuple[torch.Tensor, ...]
    shard_tokens: tuple[torch.Tensor, ...]

    @staticmethod
    def build(n_tokens: int, alpha: int, beta: int, strategy: str = "r") -> "Plan":
        validate_degrees(alpha, beta)
        if n_tokens < 1:
            raise ConfigError(f"a Plan needs at least one token, got N={n_tokens}")
        comp = assign(n_tokens, alpha, strategy, chunk=beta)
        shard = assign(n_tokens, beta, strategy)
        return Plan(
            n_tokens, alpha, beta, strategy,
            tuple(torch.nonzero(comp == c).flatten() for c in range(alpha)),
            tuple(torch.nonzero(shard == i).flatten() for i in range(beta)),
        )

    def _key(self) -> tuple:
        return (self.n_tokens, self.alpha, self.beta, self.strategy)

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # -- placement lookups ---------------------------------------------------------------
    @functools.cached_property
    def shard_of(self) -> torch.Tensor:
        """Attention shard of every token, int64 ``[N]``."""
        return assign(self.n_tokens, self.beta, self.strategy)

    @functools.cached_property
    def comp_of(self) -> torch.Tensor:
        """CompNode of every token, int64 ``[N]``."""
        return assign(self.n_tokens, self.alpha, self.strategy, chunk=self.beta)

    def active_comp_nodes(self) -> list[int]:
        """CompNodes that own at least one token (all but some when N < alpha * beta)."""
        return [c for c, toks in enumerate(self.comp_tokens) if len(toks) > 0]

    def local_rows(self, c: int, i: int) -> torch.Tensor:
        """Rows of CompNode c's local tensors (indices into comp_tokens[c]) in shard i."""
        return self._local_rows[c][i]

    def reply_rows(self, i: int, c: int) -> torch.Tensor:
        """Rows of AttnNode row i's sorted query shard that belong to CompNode c, in the
        same order as ``local_rows(c, i)``."""
        return self._reply_rows[i][c]

    @functools.cached_property
    def _local_rows(self):
        shard = self.shard_of
        return tuple(
            tuple(torch.nonzero(shard[toks] == i).flatten() for i in range(self.beta))
            for toks in self.comp_tokens
        )

    @functools.cached_property
    def _reply_rows(self):
        comp = self.comp_of
        return tuple(
            tuple(torch.nonzero(comp[toks] == c).flatten() for c in range(self.alpha))
            for toks in self.shard_tokens
        )

    def tile_tokens(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query rows, key rows) AttnNode (i, j) receives: shard i's and shard j's tokens."""
        return self.shard_tokens[i], self.shard_tokens[j]

    @property
    def merge_arity(self) -> int:
        return self.beta

    def arrival_order(self, i: int) -> torch.Tensor:
        """Permutation that sorts the concatenation (over CompNodes c = 0..alpha-1) of the
        shard-i pieces into ascending token order, so that every tile keeps sorted
        positions (its causal structure stays a triangle)."""
        return self._arrival_order[i]

    def arrives_sorted(self, i: int) -> bool:
        """True when shard i's pieces already arrive in token order (one CompNode, say)."""
        return self._arrives_sorted[i]

    @functools.cached_property
    def _arrives_sorted(self):
        return tuple(bool(torch.equal(o, torch.arange(len(o)))) for o in self._arrival_order)

    @functools.cached_property
    def _arrival_order(self):
        orders = []
        for i in range(self.beta):
            arrived = torch.cat([toks[self.local_rows(c, i)] for c, toks in enumerate(self.comp_tokens)])
            orders.append(torch.argsort(arrived))
        return tuple(orders)

    # -- balance -------------------------------------------------------------------------
    def causal_work(self) -> torch.Tensor:
        """Visible (query, key) pairs of a causal mask per AttnNode, int64 ``[beta, beta]``."""
        work = torch.zeros(self.beta, self.beta, dtype=torch.int64)
        for i, q in enumerate(self.shard_tokens):
            for j, k in enumerate(self.shard_tokens):
                work[i, j] = torch.searchsorted(k, q, right=True).sum()
        return work

    def balance(self) -> float:
        """max / mean causal work over AttnNodes (1.0 is perfect)."""
        work = self.causal_work().double()
        return float(work.max() / work.mean()) if work.sum() > 0 else 1.0

    # -- traffic -------------------------------------------------------------------------
    def ring_layer_bytes(self, *, batch: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
        """Ring attention over the same device count (alpha + beta^2): each of P devices
        passes its N/P key/value block around the ring P-1 times."""
        p = self.alpha + self.beta ** 2
        return (p - 1) * self.n_tokens * 2 * batch * kv_heads * head_dim * elem_bytes

    # -- presentation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens, "alpha": self.alpha, "beta": self.beta,
            "strategy": self.strategy,
            "comp_tokens": [t.tolist() for t in self.comp_tokens],
            "shard_tokens": [t.tolist() for t in self.shard_tokens],
            "causal_work": self.causal_work().tolist(),
            "balance": self.balance(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self, *, traffic: dict | None = None, ring: dict | None = None) -> str:
        """Tokens per CompNode and AttnNode, causal work per AttnNode; given ``traffic``
        (one layer's ``{"dispatch": bytes, "return": bytes}`` from the exchange schedule,
        `DisaggregatedModel.expected_traffic`) the bytes per layer, and given ``ring``
        (batch, kv_heads, head_dim, elem_bytes) ring attention's volume beside them."""
        lines = [f"Plan: N={self.n_tokens}, alpha={self.alpha} CompNodes, "
                 f"beta={self.beta} ({self.beta}x{self.beta} AttnNodes), sharding={self.strategy!r}"]
        for c, toks in enumerate(self.comp_tokens):
            lines.append(f"  CompNode {c}: {len(toks)} tokens {_preview(toks)}")
        for i, toks in enumerate(self.shard_tokens):
            lines.append(f"  attention shard {i}: {len(toks)} tokens {_preview(toks)}")
        work = self.causal_work()
        for i in range(self.beta):
            row = " ".join(f"{int(w):>10d}" for w in work[i])
            lines.append(f"  causal work AttnNode ({i}, *): {row}")
        lines.append(f"  balance max/mean = {self.balance():.4f}"
                     + ("" if self.strategy == "contiguous" else
                        f" (contiguous: {Plan.build(self.n_tokens, self.alpha, self.beta, 'contiguous').balance():.4f})"))
        if traffic:
            line = f"  bytes per layer: dispatch {traffic['dispatch']:,}  return {traffic['return']:,}"
            if ring:
                line += (f"  (ring attention on {self.alpha + self.beta ** 2} devices: "
                         f"{self.ring_layer_bytes(**ring):,})")
            lines.append(line)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def cache_owner(t: torch.Tensor, beta: int) -> torch.Tensor:
    """The AttnNode ``a = i*beta + j`` that keeps token t in its KV cache: ``t % beta**2``.

    Under R-sharding this is exactly what prefill leaves behind: AttnNode (i, j) holds key
    shard j (``t % beta == j``) and keeps its i-th strided slice (rows ``i::beta``, so
    ``(t // beta) % beta == i``). Appending later tokens by the same rule keeps every
    AttnNode's cache within one token of the others, with no bookkeeping: every rank
    computes the owner of a token from its index alone.
    """
    return t % (beta * beta)


@dataclasses.dataclass(frozen=True, eq=False)
class ExtendPlan:
    """Placement for one step that appends ``n_tokens`` tokens to a KV cache: a decode step
    (1 token) or a chunk of a chunked prefill. Indices here are *local*: 0..n-1 over the
    new tokens; token t of the sequence is local ``t - past``.

    comp_tokens[c]: local indices CompNode c computes (R-sharded as in `Plan`).
    owners: ``[n]`` the AttnNode (``i*beta + j``) that caches each new token (`cache_owner`).
    Every AttnNode attends every new query to its cache (split-KV), so a query's CompNode
    merges beta**2 partials. Routing depends on ``past`` only through ``offset = past %
    beta**2``: Plans are equal (and their schedules shared) across steps with equal
    (offset, n_tokens, alpha, beta, strategy); a decode step has beta**2 distinct Plans.
    """

    offset: int
    n_tokens: int
    alpha: int
    beta: int
    strategy: str
    comp_tokens: tuple[torch.Tensor, ...]
    owners: torch.Tensor

    @staticmethod
    def build(past: int, n_tokens: int, alpha: int, beta: int, strategy: str = "r") -> "ExtendPlan":
        validate_degrees(alpha, beta)
        if n_tokens < 1:
            raise ConfigError(f"a step appends at least one token, got {n_tokens}")
        offset = past % (beta * beta)
        comp = assign(n_tokens, alpha, strategy, chunk=beta)
        owners = cache_owner(torch.arange(n_tokens) + offset, beta)
        return ExtendPlan(offset, n_tokens, alpha, beta, strategy,
                          tuple(torch.nonzero(comp == c).flatten() for c in range(alpha)), owners)

    def _key(self) -> tuple:
        return (self.offset, self.n_tokens, self.alpha, self.beta, self.strategy)

    def __eq__(self, other) -> bool:
        return isinstance(other, ExtendPlan) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(("extend", *self._key()))

    @property
    def merge_arity(self) -> int:
        return self.beta * self.beta

    def active_comp_nodes(self) -> list[int]:
        return [c for c, toks in enumerate(self.comp_tokens) if len(toks) > 0]

    def owned(self, a: int) -> torch.Tensor:
        """Local indices of the new tokens AttnNode ``a`` appends to its cache (sorted)."""
        return self._owned[a]

    @functools.cached_property
    def _owned(self):
        return tuple(torch.nonzero(self.owners == a).flatten() for a in range(self.beta ** 2))

    def tile_tokens(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query rows, key rows) AttnNode (i, j) receives: every new token's q, and the k
        and v of the tokens it caches."""
        return torch.arange(self.n_tokens), self.owned(i * self.beta + j)


def plan_for_call(cache, n: int, alpha: int, beta: int, strategy: str, past: int | None = None):
    """The Plan of a call of n tokens from ``cache`` (an LRU with ``get_or``): a prefill's,
    or, given ``past`` (tokens already in the KV cache it extends), an `ExtendPlan`, keyed by
    what its routing depends on. The driver and every worker build theirs this way."""
    if past is None:
        return cache.get_or(n, lambda: Plan.build(n, alpha, beta, strategy))
    offset = past % (beta * beta)
    return cache.get_or(("extend", offset, n),
                        lambda: ExtendPlan.build(offset, n, alpha, beta, strategy))


def _preview(toks: torch.Tensor, k: int = 8) -> str:
    vals = toks.tolist()
    return str(vals) if len(vals) <= k else f"[{', '.join(map(str, vals[:k]))}, ...]"
