"""The pass driver: runs passes in order, checks the graph between them, times them and
writes dumps; a failing pass is reported with its name and the passes already run.

A pass is ``fn(gm: GraphModule, ctx: PassContext) -> GraphModule``; it may rewrite in place.
Every rewrite is counted in ``ctx.counts`` (``"pass.what" -> n``) so tests can assert them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from typing import Callable

import sympy
import torch.fx as fx

from fxdisagg.config import Config
from fxdisagg.errors import FxDisaggError, PassError
from fxdisagg.graph import lazy_graph_module

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PassContext:
    """What passes share: the sequence symbol, the configuration, rewrite counts, warnings,
    and the input contracts their proofs need (`fxdisagg.contracts`)."""

    seq: sympy.Symbol
    config: Config = dataclasses.field(default_factory=Config)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    contracts: set = dataclasses.field(default_factory=set)  # `fxdisagg.contracts` on inputs
    dumper: object = None

    alpha = property(lambda self: self.config.alpha)
    beta = property(lambda self: self.config.beta)
    strategy = property(lambda self: self.config.sharding)
    kernel = property(lambda self: self.config.kernel)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def warn(self, msg: str) -> None:
        log.warning("%s", msg)
        self.warnings.append(msg)


Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector for one compile step (the passes, `lower`).

    A step allocates hundreds of thousands of objects that stay alive while it runs (FX
    nodes, sympy expressions, fake tensors), and each allocation burst triggered
    generation-2 collections that walked all of them, and every other live object, to
    free nothing: measured 0.05-0.4 s of a ~1 s 32-layer lowering (benchmarks/passes.py).
    Whatever cycles a step leaves behind (replaced graphs) are collected after it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@gc_paused()
def run_passes(gm: fx.GraphModule, passes: list[Pass], ctx: PassContext) -> fx.GraphModule:
    done: list[str] = []
    for p in passes:
        name = p.__module__.rsplit(".", 1)[-1]
        before = gm.print_readable(print_output=False) if ctx.dumper else None
        t0 = time.perf_counter()
        try:
            gm = p(gm, ctx)
            gm.graph.lint()
        except FxDisaggError:
            raise
        except Exception as e:  # noqa: BLE001 - wrapped with context, cause chained
            raise PassError(f"pass {name!r} failed after {done or 'no passes'}: "
                            f"{type(e).__name__}: {e}") from e
        ctx.timings[name] = time.perf_counter() - t0
        if ctx.dumper:
            ctx.dumper.pass_done(len(done), name, before, gm, ctx.timings[name])
        done.append(name)
        log.debug("pass %s took %.3f s", name, ctx.timings[name])
    return _code_on_demand(gm)


def _code_on_demand(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its Python code generated when it is first run or read
    (`fxdisagg.graph.lazy_graph_module`): generating the code of a 32-layer graph (2599
    nodes) took ~0.1 s of a ~1 s compile (benchmarks/passes.py), and the passes and `lower`
    read the graph only. A caller that runs the result, or reads ``.code``, gets code that
    matches the graph as before."""
    return lazy_graph_module(gm, gm.graph, type(gm).__name__)
