"""``fxdisagg.compile``: an unmodified HF model -> a callable that runs it disaggregated."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxdisagg.capture import (HF_DEFAULTS, Captured, capture, capture_example, check_inference,
                              check_token_ids, flat_inputs, new_columns)
from fxdisagg.config import Config
from fxdisagg.contracts import check_all
from fxdisagg.errors import ConfigError, InputError
from fxdisagg.passes.classify_masks import classify_masks
from fxdisagg.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from fxdisagg.passes.find_attention import find_attention
from fxdisagg.passes.fold_repeat_kv import fold_repeat_kv
from fxdisagg.passes.lower import RolePrograms, lower
from fxdisagg.passes.partition import partition
from fxdisagg.passes.split_attention import split_attention
from fxdisagg.pipeline import PassContext, run_passes
from fxdisagg.plan import Plan
from fxdisagg.runtime.worker import LRU

log = logging.getLogger(__name__)

PASSES = [find_attention, fold_repeat_kv, classify_masks, split_attention,
          eliminate_common_subexpressions, partition]


def compile(model: torch.nn.Module, alpha: int = 1, beta: int = 1, *, example_inputs=None,
            tp: int = 1, sharding: str = "r", launch: str | None = None, dump_dir=None,
            **options) -> "DisaggregatedModel":
    """Compile ``model`` into alpha CompNodes and beta x beta AttnNodes.

    example_inputs: dict of the token-indexed inputs the model will be called with
        (``input_ids``, optionally ``attention_mask``, ``position_ids``...); their names and
        batch size fix the capture. Without it the capture happens on the first call.
    alpha="auto", beta="auto": the grid of least prefill time by the cost model
        (`fxdisagg.cost.pick_grid`) for ``devices=`` GPUs of kind ``hw=`` ("h100", "h200")
        at the example's length (else ``max_len``).
    options: ``max_len`` (largest sequence length, default from the model config),
        ``kernel`` ("torch" | "triton" | "reference"; default by device), ``timeout``
        (seconds a worker may make no progress), ``cache_size`` (per-length Plans and
        schedules kept), ``verify`` (True or a tolerance: compare every layer's hidden
        state with the unmodified model on the first call of each capture,
        `fxdisagg.verify`), ``token_local`` (modules declared token-local: paths, globs or
        class names). All of it becomes one frozen `fxdisagg.config.Config`.
    """
    if "auto" in (alpha, beta):
        alpha, beta = _auto_grid(model, example_inputs, options)
    config = Config.of(alpha, beta, tp=tp, sharding=sharding, launch=launch, dump_dir=dump_dir,
                       **options)
    check_inference(model, example_inputs or {})
    dm = DisaggregatedModel(model, config)
    if example_inputs is not None:
        dm.prepare(example_inputs)
    return dm


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What one capture compiled to: the capture, its role programs and the pass counts."""

    captured: Captured
    programs: RolePrograms
    counts: dict[str, int]
    warnings: tuple[str, ...]
    dump_dir: pathlib.Path | None
    contracts: frozenset = frozenset()   # `fxdisagg.contracts` every call's inputs must meet


class DisaggregatedModel:
    """Called like the model; ``.plan`` is the Plan of the latest length; ``close()`` stops
    workers (also a context manager)."""

    def __init__(self, model: torch.nn.Module, config: Config, workers=None):
        from fxdisagg.runtime import Workers
        self.model, self.config = model, config
        self.max_len = config.max_len or getattr(getattr(model, "config", None),
                                                 "max_position_embeddings", 4096)
        self._compiled: dict[tuple, Compiled] = {}
        self._plans = LRU(config.cache_size)
        self._last_n = None
        self._last_key = None
        self._workers = workers or Workers(config, _device(model))
        self._released_caches: list[int] = []
        self._tp_shards: list | None = None
        if config.tp > 1:
            from fxdisagg.tensor_parallel import check_tp
            check_tp(model, config.tp)
        self._verified: set[int] = set()     # ids of the Compiled whose first call verify ran
        self._lock = threading.RLock()

    alpha = property(lambda self: self.config.alpha)
    beta = property(lambda self: self.config.beta)
    launch = property(lambda self: self.config.launch)
    _runtime = property(lambda self: self._workers.runtime)

    # -- compilation ------------------------------------------------------------------------
    def prepare(self, inputs: dict[str, Any]) -> Compiled:
        """Capture and compile for the batch size, the input names and the non-tensor
        settings of ``inputs`` (``logits_to_keep=1``, ...), once each: every sequence length
        shares the capture, and so do calls that leave out inputs HF fills by default."""
        with self._lock:
            return self._prepare(inputs)

    def _prepare(self, inputs: dict[str, Any]) -> Compiled:
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        settings = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor) and v is not None}
        if not tensors:
            raise InputError("call the model with token-indexed tensors (input_ids=...)")
        first_name, first = next(iter(tensors.items()))
        dim = self._token_dims(first_name)[0]
        if first.dim() <= dim or first.shape[dim] < 1:
            raise InputError(f"{first_name} needs a token dim {dim} of length >= 1, got shape "
                             f"{tuple(first.shape)}")
        n = first.shape[dim]
        key = (first.shape[0], tuple(sorted(tensors)),
               tuple(sorted((k, repr(v)) for k, v in settings.items() if k != "use_cache")))
        key = self._compatible(key)
        if key not in self._compiled:
            example = capture_example(tensors, {k: self._token_dims(k) for k in tensors})
            self._compiled[key] = self._compile({**example, **settings}, n, len(self._compiled))
        self._last_n = self._last_n or n
        self._last_key = key
        return self._compiled[key]

    def _compatible(self, key: tuple) -> tuple:
        """An existing capture's key that serves a call of ``key``: the same batch and
        settings, inputs a superset of the call's whose extra ones HF fills by default
        (`capture.with_hf_defaults`); else ``key`` itself (a new capture)."""
        batch, names, settings = key
        for have in self._compiled:
            extra = set(have[1]) - set(names)
            if have[0] == batch and have[2] == settings and set(names) <= set(have[1]) \
                    and extra <= set(HF_DEFAULTS):
                return have
        return key

    def _compile(self, example, n_tokens: int, index: int) -> Compiled:
        cap = self._capture(example)
        self.max_len = min(self.max_len, cap.max_len)     # the model's code may allow fewer
        ctx = PassContext(seq=cap.seq, config=self.config, warnings=list(cap.notes))
        dump_dir = None
        if self.config.dump_dir:
            from fxdisagg.dump import Dumper
            dump_dir = pathlib.Path(self.config.dump_dir) / f"capture{index}"
            ctx.dumper = Dumper(dump_dir)
        gm = run_passes(cap.gm, PASSES, ctx)
        programs = lower(gm, ctx)
        if self.config.tp > 1:
            from fxdisagg.tensor_parallel import rank_programs
            programs.comp_by_rank = tuple(rank_programs(programs.comp, self._shards()))
        compiled = Compiled(cap, programs, ctx.counts, tuple(ctx.warnings), dump_dir,
                            frozenset(ctx.contracts))
        if ctx.dumper:
            ctx.dumper.programs(gm, programs, ctx)
            ctx.dumper.plan(self.plan_for(n_tokens), self._schedule_traffic(programs, n_tokens))
        return compiled

    def _capture(self, example) -> Captured:
        return capture(self._shards()[0], example, max_len=self.max_len)

    def _shards(self) -> list[torch.nn.Module]:
        """The model as each tensor-parallel rank of a CompNode holds it (`fxdisagg.
        tensor_parallel`); ``[model]`` without tensor parallelism."""
        if self.config.tp == 1:
            return [self.model]
        if self._tp_shards is None:
            from fxdisagg.tensor_parallel import shard_model
            self._tp_shards = [shard_model(self.model, self.config.tp, t) for t in range(self.config.tp)]
        return self._tp_shards

    def _token_dims(self, name: str) -> tuple[int, ...]:
        return (1,)

    def plan_for(self, n: int) -> Plan:
        return self._plan_for_step(n, None)

    @property
    def plan(self) -> Plan | None:
        return self.plan_for(self._last_n) if self._last_n else None

    def _latest(self) -> Compiled:
        if self._last_key is None:
            raise InputError("nothing is compiled yet: pass example_inputs to fxdisagg.compile "
                             "or call the model once")
        return self._compiled[self._last_key]

    def explain(self, n_tokens: int | None = None) -> str:
        """What fxdisagg made of the model: the attention sites and their masks, where ops
        run, the Plan for ``n_tokens`` (default: the latest call's length) and the expected
        bytes and work per node (`fxdisagg.explain`)."""
        from fxdisagg.explain import explain
        return explain(self, n_tokens)

    @property
    def compiled(self) -> Compiled:
        """The capture the latest call used."""
        return self._latest()

    @property
    def programs(self) -> RolePrograms:
        """Role programs of the capture the latest call used."""
        return self._latest().programs

    @property
    def counts(self) -> dict[str, int]:
        return self._latest().counts

    @property
    def traffic(self) -> dict[int, dict[str, int]]:
        """Bytes each layer's dispatch and return moved in the latest call, counted by the
        transports (the in-process runtime counts what would cross a process boundary)."""
        return dict(self._runtime.traffic) if self._runtime is not None else {}

    def expected_traffic(self, n_tokens: int, batch: int = 1, past: int | None = None
                         ) -> dict[int, dict[str, int]]:
        """The bytes the schedule says a call of ``n_tokens`` tokens and ``batch`` rows moves
        (``past``: a call that extends a KV cache holding that many tokens, e.g. a decode
        step): the same structure as `traffic`, computed without running anything. ``batch``
        must be one the model was compiled for (what travels per token depends on the
        capture: HF's document ids are ``[N]`` at batch 1 and ``[B, N]`` above)."""
        for key, compiled in self._compiled.items():
            if key[0] == batch:
                return self._schedule_traffic(compiled.programs, n_tokens, past)
        raise InputError(f"no capture for batch size {batch} (compiled: "
                         f"{sorted({k[0] for k in self._compiled})}); call the model once with "
                         f"that batch size or pass example_inputs of it")

    def _schedule_traffic(self, programs, n_tokens: int, past: int | None = None) -> dict:
        from fxdisagg.runtime.kvcache import EXTEND, CacheStep
        from fxdisagg.runtime.layout import RankLayout
        from fxdisagg.schedule import Schedule, reduction_bytes
        c = self.config
        step = None if past is None else CacheStep(0, EXTEND, past)
        plan, layout = self._plan_for_step(n_tokens, step), RankLayout(c.alpha, c.beta, c.tp)
        traffic = Schedule.build(plan, layout, programs.layers).traffic()
        for layer, nbytes in reduction_bytes(plan, layout, programs.reductions).items():
            traffic[layer]["all_reduce"] = nbytes
        return traffic

    @property
    def runtime(self):
        """The running runtime (None before the first call or after ``close()``): ``pids``
        of spawned workers, ``call(rank, fn, *args)`` to run a function inside a worker."""
        return self._runtime

    # -- execution --------------------------------------------------------------------------
    def __call__(self, **kwargs):
        """Run the model on ``kwargs`` as HF would (missing optional inputs get HF's
        defaults). Callers on several threads are served one call at a time: each call has
        the workers to itself and gets its own exact answer.

        With ``cache=`` (a `DistributedCache` from `new_cache`) the call continues that
        cache: ``input_ids`` are the new tokens; ``attention_mask`` may cover the cached
        tokens too, as HF passes it."""
        check_inference(self.model, kwargs)
        check_token_ids(kwargs, getattr(getattr(self.model, "config", None), "vocab_size", None))
        cache = kwargs.pop("cache", None)
        if cache is not None:
            return self._call_cached(cache, kwargs)
        if self.config.verify is not False:
            self._verify_first(kwargs)
        return self._call(kwargs)

    def _verify_first(self, kwargs) -> None:
        """Run `_verify` on the first call of each capture (again after a failed one)."""
        with self._lock:
            compiled = self.prepare(kwargs)
            if id(compiled) in self._verified:
                return
            self._verified.add(id(compiled))
            tolerance = None if self.config.verify is True else self.config.verify
            try:
                self._verify(kwargs, tolerance)
            except BaseException:
                self._verified.discard(id(compiled))
                raise

    def _verify(self, kwargs, tolerance) -> None:
        from fxdisagg.verify import verify_call
        verify_call(self, kwargs, tolerance)

    def _call(self, kwargs):
        with self._lock:
            compiled = self.prepare(kwargs)
            check_all(compiled.contracts, kwargs)
            flat = flat_inputs(compiled.captured, kwargs)
            n = compiled.captured.length(flat)
            self._last_n = n
            outs = self._run(compiled.programs, n, flat)
        if outs is None:          # torchrun: only rank 0 returns the outputs
            return None
        return pytree.tree_unflatten(outs, compiled.captured.out_spec)

    # -- KV cache and generation ----------------------------------------------------------------
    @property
    def max_cache_len(self) -> int:
        return min(self.config.max_cache_len or self.max_len, self.max_len)

    def new_cache(self, batch: int) -> "DistributedCache":
        """An empty KV cache for ``batch`` sequences, held by this model's AttnNodes once
        a call fills it (`__call__` with ``cache=``)."""
        from fxdisagg.generation import DistributedCache
        return DistributedCache(self, batch, self.max_cache_len)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """HF's ``generate`` (same arguments: greedy, sampling, generation_config,
        streamer, stopping criteria...) with the KV cache on the AttnNodes."""
        from fxdisagg.generation import generate
        return generate(self, input_ids, attention_mask, **kwargs)

    @property
    def memory(self) -> dict[int, dict[str, int]]:
        """Per rank, measured in its worker: ``params`` (parameter and buffer bytes of its
        programs) and ``kv_cache`` (bytes of the KV caches it holds)."""
        return self._runtime.memory() if self._runtime is not None else {}

    def _call_cached(self, cache, kwargs):
        from fxdisagg.generation import DistributedCache
        from fxdisagg.runtime.kvcache import EXTEND, FILL, CacheStep
        if not isinstance(cache, DistributedCache) or cache.owner() is not self:
            raise InputError(f"cache={type(cache).__name__}: fxdisagg keeps the KV cache on its "
                             f"AttnNodes; pass a cache from this model's new_cache() (or use "
                             f"its generate())")
        kwargs.pop("use_cache", None)
        with self._lock:
            past = cache.seq_length
            new = new_columns(kwargs, past)
            b, n = new["input_ids"].shape
            if b != cache.batch:
                raise InputError(f"the cache holds {cache.batch} sequences, the call has {b}")
            if past + n > cache.max_len:
                raise InputError(f"{past} cached + {n} new tokens exceed the cache's max_len "
                                 f"{cache.max_len} (option max_cache_len)")
            if past and (self._runtime is None or cache.epoch != self._workers.epoch):
                raise InputError("the workers that held this cache were stopped (close() or a "
                                 "failure); start again from the prompt with a new cache")
            compiled = self.prepare(new)
            check_all(compiled.contracts, kwargs)      # over cached and new tokens
            flat = flat_inputs(compiled.captured, new, past)
            drop, self._released_caches[:] = tuple(self._released_caches), []
            step = CacheStep(cache.cache_id, EXTEND if past else FILL, past, drop)
            outs = self._run(compiled.programs, n, flat, step)
            cache.seq_length, cache.epoch = past + n, self._workers.epoch
        if outs is None:
            return None
        return pytree.tree_unflatten(outs, compiled.captured.out_spec)

    def _plan_for_step(self, n, step):
        from fxdisagg.plan import plan_for_call
        from fxdisagg.runtime.kvcache import EXTEND
        c = self.config
        past = step.past if step is not None and step.mode == EXTEND else None
        return plan_for_call(self._plans, n, c.alpha, c.beta, c.sharding, past)

    def _run(self, programs, n, flat, step=None):
        return self._workers.run(programs, self._plan_for_step(n, step), flat, step)

    def close(self) -> None:
        """Stop the workers (spawn, inprocess) or leave the process group fxdisagg created
        (torchrun)."""
        self._workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _auto_grid(model, example_inputs, options: dict) -> tuple[int, int]:
    """alpha="auto", beta="auto": the cost model's pick (pops ``devices`` and ``hw``)."""
    from fxdisagg import cost
    devices, hw = options.pop("devices", None), options.pop("hw", "h100")
    if not isinstance(devices, int) or devices < 2:
        raise ConfigError(f'alpha="auto", beta="auto" needs devices= (an int >= 2: alpha + beta**2 '
                          f'GPUs), got {devices!r}')
    if hw not in cost.HARDWARE:
        raise ConfigError(f"hw={hw!r}: one of {sorted(cost.HARDWARE)}")
    ids = (example_inputs or {}).get("input_ids")
    n = ids.shape[1] if ids is not None else options.get("max_len") or model.config.max_position_embeddings
    return cost.pick_grid(cost.ModelShape.of(model.config), cost.HARDWARE[hw], int(n), devices)
