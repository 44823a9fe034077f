"""Input contracts: facts about a call's inputs that a pass's proof relied on, checked on
every call before any worker runs.

A pass proves a rewrite exact for a class of inputs, not for one example; where the class
is narrower than "any tensor of the captured shape", the pass records the condition here
(`PassContext.contracts`) and `DisaggregatedModel` checks it on each call's full inputs
(for a cached call, over the cached and the new tokens alike, as HF passes them). A call
outside the class gets an `InputError` saying which proof needs what, never a wrong answer.
"""

from __future__ import annotations

import dataclasses

import torch

from fxdisagg.errors import InputError


@dataclasses.dataclass(frozen=True)
class OnesInOneRun:
    """Each row of the 2-D input ``name`` holds its non-zero entries in one contiguous run
    (left or right padding; no holes). ``why`` names the proof that needs it.

    `classify_masks` needs this for ALiBi as Bloom and Falcon write it, with positions
    ``(cumsum(mask) - 1) * mask``: on one run of ones those equal the token index minus a
    constant per row, which softmax ignores; a hole would shift the keys after it."""

    name: str
    why: str

    def check(self, inputs: dict) -> None:
        m = inputs.get(self.name)
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[1] == 0:
            return              # absent: HF's default (all ones) is one run
        on = m != 0
        starts = on[:, :1].sum(-1) + (on[:, 1:] & ~on[:, :-1]).sum(-1)   # runs per row
        bad = (starts > 1).nonzero().flatten().tolist()
        if bad:
            raise InputError(f"{self.name} row {bad[0]} has holes (its ones are not one "
                             f"contiguous run); {self.why} is exact only for left or right "
                             f"padding. Pack each sequence's tokens together.")


def check_all(contracts, inputs: dict) -> None:
    for c in contracts:
        c.check(inputs)
