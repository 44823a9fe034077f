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


class Workers:
    """The workers one model's calls share: started by the first call, stopped by
    ``close()`` or by a failed call (its messages in flight belong to it, so the next call
    starts fresh ones). ``epoch`` counts starts: a KV cache lives in the workers of one.
    Several programs may share one `Workers` (the graphs of one ``torch.compile``d model);
    the runtime loads each program once."""

    def __init__(self, config, device=None):
        self.config, self.device = config, device
        self.runtime = None
        self.epoch = 0

    def run(self, programs, plan, flat, step=None):
        if self.runtime is None:
            self.runtime = make_runtime(self.config, self.device)
            self.epoch += 1
        try:
            return self.runtime.run(programs, plan, flat, step)
        except BaseException:
            if self.config.launch != "torchrun":   # failed or interrupted: its workers can not
                self.close()                       # serve another call; the next starts fresh
            raise

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
