"""launch="torchrun": SPMD, this process is one rank of ``alpha + beta**2``.

Every rank runs the same script, builds the same model and calls the DisaggregatedModel;
each takes its role from its rank (`RankLayout`) and runs the shared `Worker` with a
`CollectiveTransport` (NCCL on CUDA, device LOCAL_RANK; gloo on CPU). Rank 0 is CompNode 0
*and* the driver: its inputs are authoritative and the call returns the outputs on rank 0
and ``None`` elsewhere.

Inputs and outputs travel as tensors, never pickled (on NCCL an unpickled tensor would land
on the sender's device): rank 0 broadcasts a small int64 header (dtype, rank and sizes of
every input), then each input into buffers the other ranks preallocate from the header;
CompNodes send their frontier pieces to rank 0, which preallocates them from its own pieces
and the Plan's token counts. At set-up every rank checks that all hold the same programs
(a sha256 all-gathered as bytes) and refuses to run otherwise.
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

from fxdisagg.errors import ConfigError, WorkerError
from fxdisagg.runtime.driver import active_comp_nodes, gather_frontier
from fxdisagg.runtime.layout import COMP, RankLayout
from fxdisagg.runtime.transport import CollectiveTransport
from fxdisagg.runtime.worker import Worker, programs_digest, worker_error

_DTYPES = (torch.int64, torch.int32, torch.bool, torch.float32, torch.float16, torch.bfloat16,
           torch.float64, torch.uint8)
_HEADER = 64                                    # int64 slots of the input header


def check_same_digest(digest: bytes, device=None) -> None:
    """Every rank of the default group must hold the same digest (as bytes in a tensor)."""
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device or "cpu")
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    bad = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
    if bad:
        raise WorkerError(f"ranks {bad} hold different programs than rank 0; every rank must "
                          f"compile the same model with the same alpha, beta, sharding and "
                          f"batch size")


class TorchrunRuntime:
    def __init__(self, config, device=None):
        self.config, self.layout = config, RankLayout(config.alpha, config.beta, config.tp)
        self.owns_group = not dist.is_initialized()
        self.device = torch.device("cpu")
        if torch.device(device or "cpu").type == "cuda":   # the model's device, not the machine's
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=config.timeout))
        if dist.get_world_size() != self.layout.world:
            raise ConfigError(f"launch='torchrun' with alpha={config.alpha}, beta={config.beta} "
                              f"needs {self.layout.world} ranks (alpha + beta**2), WORLD_SIZE is "
                              f"{dist.get_world_size()}")
        self.rank = dist.get_rank()
        transport = CollectiveTransport(self.rank, self.layout.world, device=self.device)
        self.worker = Worker(self.rank, self.layout, transport, strategy=config.sharding,
                             cache_size=config.cache_size)
        self._keys: dict[int, tuple[int, object]] = {}
        self.traffic: dict[int, dict[str, int]] = {}

    def run(self, programs, n: int, flat: list) -> list | None:
        key = self._load(programs)
        flat = self._broadcast_inputs(flat)
        n = flat[0].shape[1]
        try:
            pieces = self.worker.run(key, n, flat)
        except Exception as e:
            raise worker_error(self.layout, self.rank, self.worker.transport.layer,
                               traceback.format_exc()) from e
        self._sum_traffic(programs)
        plan = self.worker.plan(n)
        gathered = self._gather_frontier(plan, programs.frontier, pieces)
        if self.rank != 0:
            return None
        with torch.no_grad():
            return list(programs.epilogue(*gather_frontier(plan, programs.frontier, gathered)))

    # -- set-up --------------------------------------------------------------------------------
    def _load(self, programs) -> int:
        if id(programs) in self._keys:
            return self._keys[id(programs)][0]
        check_same_digest(programs_digest(programs), self.device)
        key = len(self._keys)
        role = self.layout.role(self.rank)[0]
        self.worker.load(key, programs.comp if role == COMP else programs.attn, programs.layers)
        self._keys[id(programs)] = (key, programs)
        return key

    # -- inputs and outputs as tensors -----------------------------------------------------------
    def _broadcast_inputs(self, flat: list) -> list:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        if self.rank == 0:
            fields = [len(flat)]
            for t in flat:
                fields += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
            header[:len(fields)] = torch.tensor(fields)
        header = header.to(self.device)
        dist.broadcast(header, src=0)
        fields, k, out = header.tolist(), 1, []
        for idx in range(fields[0]):
            dtype, ndim = _DTYPES[fields[k]], fields[k + 1]
            shape = fields[k + 2:k + 2 + ndim]
            k += 2 + ndim
            t = flat[idx].to(self.device).contiguous() if self.rank == 0 else \
                torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(t, src=0)
            out.append(t)
        return out

    def _sum_traffic(self, programs) -> None:
        layers = [lp.layer for lp in programs.layers]
        sent = torch.zeros(len(layers), 2, dtype=torch.int64)
        for (layer, phase), nb in self.worker.transport.sent.items():
            sent[layers.index(layer), phase == "return"] += nb
        sent = sent.to(self.device)
        dist.all_reduce(sent)
        self.traffic = {l: {"dispatch": int(d), "return": int(r)} for l, (d, r) in zip(layers, sent.tolist())}

    def _gather_frontier(self, plan, frontier, pieces) -> dict[int, tuple]:
        """Rank 0 receives every active CompNode's token-local pieces into buffers sized
        from its own pieces and the Plan; replicated values are rank 0's own."""
        active = active_comp_nodes(plan)
        token_local = [k for k, fv in enumerate(frontier) if fv.dim is not None]
        if self.rank != 0:
            if self.layout.role(self.rank)[0] == COMP and self.worker.index in active:
                for k in token_local:
                    dist.send(pieces[k].contiguous(), dst=0)
            return {}
        got = {0: pieces}
        for c in active[1:]:
            mine = list(pieces)
            for k in token_local:
                shape = list(pieces[k].shape)
                shape[frontier[k].dim] = len(plan.comp_tokens[c])
                mine[k] = pieces[k].new_empty(shape)
                dist.recv(mine[k], src=self.layout.comp_rank(c))
            got[c] = tuple(mine)
        return got

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
