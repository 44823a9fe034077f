"""Which rank plays which role.

CompNode c is ranks ``c*tp .. c*tp + tp-1`` (its tensor-parallel group, contiguous so that
a group can sit inside one node under torchrun); AttnNode (i, j) is rank
``alpha*tp + i*beta + j``. The world has ``alpha*tp + beta**2`` ranks. With tp == 1
CompNode c is rank c.
"""

from __future__ import annotations

import dataclasses

COMP, ATTN = "CompNode", "AttnNode"


@dataclasses.dataclass(frozen=True)
class RankLayout:
    alpha: int
    beta: int
    tp: int = 1

    @property
    def world(self) -> int:
        return self.alpha * self.tp + self.beta ** 2

    def workers(self, role: str) -> int:
        """How many ranks play ``role``: alpha * tp CompNode ranks, beta**2 AttnNodes."""
        return self.alpha * self.tp if role == COMP else self.beta ** 2

    def comp_rank(self, c: int, t: int = 0) -> int:
        return c * self.tp + t

    def attn_rank(self, i: int, j: int) -> int:
        return self.alpha * self.tp + i * self.beta + j

    def role(self, rank: int) -> tuple[str, object]:
        """(COMP, c) or (ATTN, (i, j))."""
        if rank < self.alpha * self.tp:
            return COMP, rank // self.tp
        return ATTN, divmod(rank - self.alpha * self.tp, self.beta)

    def tp_group(self, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s tensor-parallel group (its CompNode's), in order; an
        AttnNode is a group of one."""
        role, c = self.role(rank)
        return tuple(self.comp_rank(c, t) for t in range(self.tp)) if role == COMP else (rank,)

    def describe(self, rank: int) -> str:
        role, idx = self.role(rank)
        return f"{role} {idx} (rank {rank})"

    def peers(self, rank: int) -> list[int]:
        """The ranks ``rank`` exchanges with: every rank of the other role (CompNodes send
        to AttnNodes and back; neither role routes to itself)."""
        mine = self.role(rank)[0]
        return [r for r in range(self.world) if self.role(r)[0] != mine]
