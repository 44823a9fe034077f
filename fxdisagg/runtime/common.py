"""What every runtime shares: the driver-side gathering of the CompNodes' frontier values
into full outputs."""

from __future__ import annotations

import torch

from fxdisagg.exchange import active_comp_nodes
from fxdisagg.plan import Plan


def gather_frontier(plan: Plan, frontier, pieces: dict[int, tuple]) -> list:
    """Full-length frontier values from the active CompNodes' local pieces."""
    active = active_comp_nodes(plan)
    values = []
    for k, fv in enumerate(frontier):
        first = pieces[active[0]][k]
        if fv.dim is None or not isinstance(first, torch.Tensor):
            values.append(first)
            continue
        shape = list(first.shape)
        shape[fv.dim] = plan.n_tokens
        full = first.new_empty(shape)
        for c in active:
            full.index_copy_(fv.dim, plan.comp_tokens[c].to(full.device), pieces[c][k])
        values.append(full)
    return values
