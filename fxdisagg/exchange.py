"""Who sends which rows to whom: the index arithmetic of the per-layer exchange.

Pure functions of the Plan, shared by every transport (in-process queues, torch.distributed).

Dispatch (CompNode c -> AttnNode (i, j)): c's query-side tensors (q, q_pos, q_doc) restricted
to its tokens of shard i, and its key-side tensors (k, v, k_pos, k_doc, k_valid) restricted
to its tokens of shard j. An AttnNode concatenates the pieces of the CompNodes in rank order
and sorts the rows into ascending token order (`Plan.arrival_order`), so every tile keeps
sorted positions and R-sharded causal tiles stay triangles.

Return (AttnNode (i, j) -> CompNode c): the rows of its partial output and lse that belong
to c's queries; c scatters the rows from row i of the grid into its local order, for each
key shard j, and stacks the beta partials for the merge.

The token dim is 2 for ``[B, H, M, D]`` tensors and the last dim for per-token features
(``[M]`` or ``[B, M]``); lse ``[B, H, M]`` has it at 2 as well.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxdisagg.plan import Plan


def token_dim(t: Tensor) -> int:
    return 2 if t.dim() >= 3 else t.dim() - 1


def _rows(t: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` (sorted, unique) of t's token dim; all of them is t itself, no copy."""
    d = token_dim(t)
    if len(rows) == t.shape[d]:
        return t
    return t.index_select(d, rows.to(t.device))


def active_comp_nodes(plan: Plan) -> list[int]:
    """CompNodes that own at least one token; only they take part in an exchange."""
    return [c for c, toks in enumerate(plan.comp_tokens) if len(toks) > 0]


def split_dispatch(plan: Plan, c: int, q_side: list[Tensor], k_side: list[Tensor]) -> dict:
    """What CompNode c sends: ``{(i, j): [q-side pieces of shard i] + [k-side pieces of shard j]}``."""
    q_parts = [[_rows(x, plan.local_rows(c, i)) for x in q_side] for i in range(plan.beta)]
    k_parts = [[_rows(x, plan.local_rows(c, j)) for x in k_side] for j in range(plan.beta)]
    return {(i, j): q_parts[i] + k_parts[j] for i in range(plan.beta) for j in range(plan.beta)}


def assemble_tile(plan: Plan, i: int, j: int, pieces: list[list[Tensor]], n_q: int) -> list[Tensor]:
    """AttnNode (i, j): join the pieces of the active CompNodes (rank order) into its tile,
    rows sorted by token. ``n_q`` leading entries are query-side (shard i), the rest key-side."""
    out, storages = [], set()
    for p in range(len(pieces[0])):
        parts = [pc[p] for pc in pieces]
        d = token_dim(parts[0])
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)
        shard = i if p < n_q else j
        if not plan.arrives_sorted(shard):
            joined = joined.index_select(d, plan.arrival_order(shard).to(joined.device))
        storage = joined.untyped_storage().data_ptr()
        if storage in storages:
            joined = joined.clone()  # an op's outputs may not alias (q_pos is k_pos on a diagonal tile)
        storages.add(storage)
        out.append(joined)
    return out


def split_reply(plan: Plan, i: int, out: Tensor, lse: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """AttnNode in grid row i: ``{c: (out rows, lse rows)}`` for every active CompNode."""
    return {c: (_rows(out, plan.reply_rows(i, c)), _rows(lse, plan.reply_rows(i, c)))
            for c in active_comp_nodes(plan)}


def assemble_partials(plan: Plan, c: int, replies: dict) -> tuple[Tensor, Tensor]:
    """CompNode c: ``replies[(i, j)] = (out rows, lse rows)`` -> ``outs [beta, B, H, n_c, D]``,
    ``lses [beta, B, H, n_c]`` in c's local token order, one partial per key shard j."""
    o0, l0 = replies[(0, 0)]
    n = len(plan.comp_tokens[c])
    if plan.beta == 1:                       # one tile: its rows are all of c's, in order
        if o0.untyped_storage().data_ptr() == l0.untyped_storage().data_ptr():
            l0 = l0.clone()                  # unpacked from one buffer: outputs may not alias
        return o0.unsqueeze(0), l0.unsqueeze(0)
    outs = o0.new_empty((plan.beta, o0.shape[0], o0.shape[1], n, o0.shape[3]))
    lses = l0.new_empty((plan.beta, l0.shape[0], l0.shape[1], n))
    for (i, j), (o, l) in replies.items():
        rows = plan.local_rows(c, i).to(o.device)
        outs[j].index_copy_(2, rows, o)
        lses[j].index_copy_(2, rows, l)
    return outs, lses
