"""Runtimes: the same role programs on threads, spawned processes or torchrun ranks.

`layout` (which rank plays which role), `transport` (executes the exchange schedule),
`worker` (the persistent loop every rank runs), `driver` (what the in-process and spawn
runtimes share), `inprocess`, `spawn`, `torchrun`.
"""

from __future__ import annotations


def make_runtime(config, device=None):
    """The runtime ``config.launch`` names; ``device``: where the model lives (under
    torchrun a CUDA model gets NCCL on LOCAL_RANK)."""
    if config.launch == "inprocess":
        from fxdisagg.runtime.inprocess import InProcessRuntime
        return InProcessRuntime(config)
    if config.launch == "spawn":
        from fxdisagg.runtime.spawn import SpawnRuntime
        return SpawnRuntime(config)
    from fxdisagg.runtime.torchrun import TorchrunRuntime
    return TorchrunRuntime(config, device)
