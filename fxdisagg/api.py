"""``fxdisagg.compile``: an unmodified HF model -> a callable that runs it disaggregated."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxdisagg.capture import Captured, capture, check_inference, flat_inputs
from fxdisagg.errors import ConfigError, InputError
from fxdisagg.passes.classify_masks import classify_masks
from fxdisagg.passes.find_attention import find_attention
from fxdisagg.passes.fold_repeat_kv import fold_repeat_kv
from fxdisagg.passes.insert_collectives import RolePrograms, insert_collectives
from fxdisagg.passes.partition import partition
from fxdisagg.passes.split_attention import split_attention
from fxdisagg.pipeline import PassContext, run_passes
from fxdisagg.plan import STRATEGIES, Plan, validate_degrees

log = logging.getLogger(__name__)

PASSES = [find_attention, fold_repeat_kv, classify_masks, split_attention, partition]
LAUNCHES = ("inprocess", "spawn", "torchrun")
KERNELS = ("", "torch", "triton", "reference")


def compile(model: torch.nn.Module, alpha: int = 1, beta: int = 1, *, example_inputs=None,
            tp: int = 1, sharding: str = "r", launch: str | None = None, dump_dir=None,
            **options) -> "DisaggregatedModel":
    """Compile ``model`` into alpha CompNodes and beta x beta AttnNodes.

    example_inputs: dict of the token-indexed inputs the model will be called with
        (``input_ids``, optionally ``attention_mask``, ``position_ids``...); their names and
        batch size fix the capture. Without it the capture happens on the first call.
    options: ``max_len`` (largest sequence length, default from the model config),
        ``kernel`` ("torch" | "triton" | "reference"; default by device), ``timeout``
        (seconds a worker may wait for a peer).
    """
    validate_degrees(alpha, beta, tp)
    if tp != 1:
        raise ConfigError("tp > 1 (tensor-parallel CompNodes) is not available in this version; "
                          "use tp=1 and scale with alpha")
    if sharding not in STRATEGIES:
        raise ConfigError(f"sharding={sharding!r} is not a placement; choose one of {STRATEGIES}")
    launch = launch or _default_launch()
    if launch not in LAUNCHES:
        raise ConfigError(f"launch={launch!r}; choose one of {LAUNCHES}")
    unknown = set(options) - {"max_len", "kernel", "timeout"}
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)}; known: max_len, kernel, timeout")
    options["kernel"] = options.get("kernel") or ""      # None: chosen by device, as in the kernel API
    if options["kernel"] not in KERNELS:
        raise ConfigError(f"kernel={options['kernel']!r}; choose one of {KERNELS[1:]}")
    check_inference(model, example_inputs or {})
    dm = DisaggregatedModel(model, alpha, beta, sharding, launch,
                            dump_dir or os.environ.get("FXDISAGG_DUMP_DIR"), options)
    if example_inputs is not None:
        dm.prepare(example_inputs)
    return dm


def _default_launch() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return "torchrun"
    return "spawn"


class DisaggregatedModel:
    """Called like the model; ``.plan`` is the Plan of the latest length; ``close()`` stops
    workers (also a context manager)."""

    def __init__(self, model, alpha, beta, sharding, launch, dump_dir, options):
        self.model, self.alpha, self.beta, self.sharding = model, alpha, beta, sharding
        self.launch, self.dump_dir, self.options = launch, dump_dir, options
        self.max_len = options.get("max_len") or getattr(model.config, "max_position_embeddings", 4096)
        self._compiled: dict[tuple, tuple[Captured, RolePrograms, PassContext]] = {}
        self._plans: dict[int, Plan] = {}
        self._last_n = None
        self._last_key = None
        self._runtime = None

    # -- compilation ------------------------------------------------------------------------
    def prepare(self, inputs: dict[str, Any]):
        """Capture and compile for the batch size and the non-tensor settings of ``inputs``
        (``logits_to_keep=1``, ...), once each: every sequence length shares the capture."""
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        settings = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor) and v is not None}
        if not tensors:
            raise InputError("call the model with token-indexed tensors (input_ids=...)")
        first = next(iter(tensors.values()))
        if first.dim() < 2 or first.shape[1] < 1:
            raise InputError(f"inputs need a [batch, seq >= 1] token dim, got shape {tuple(first.shape)}")
        key = (first.shape[0], tuple(sorted((k, repr(v)) for k, v in settings.items()
                                            if k != "use_cache")))
        if key not in self._compiled:
            self._compiled[key] = self._compile({**_capture_example(tensors), **settings}, first.shape[1])
        self._last_n = self._last_n or first.shape[1]
        self._last_key = key
        return self._compiled[key]

    def _compile(self, example, n_tokens: int):
        cap = capture(self.model, example, max_len=self.max_len)
        ctx = PassContext(seq=cap.seq, alpha=self.alpha, beta=self.beta, strategy=self.sharding,
                          kernel=self.options.get("kernel", ""))
        if self.dump_dir:
            from fxdisagg.dump import Dumper
            ctx.dumper = Dumper(self.dump_dir)
        gm = run_passes(cap.gm, PASSES, ctx)
        programs = insert_collectives(gm, ctx)
        if ctx.dumper:
            ctx.dumper.programs(gm, programs, ctx)
            ctx.dumper.plan(self.plan_for(n_tokens))
        return cap, programs, ctx

    def plan_for(self, n: int) -> Plan:
        if n not in self._plans:
            self._plans[n] = Plan.build(n, self.alpha, self.beta, self.sharding)
        return self._plans[n]

    @property
    def plan(self) -> Plan | None:
        return self.plan_for(self._last_n) if self._last_n else None

    def _latest(self):
        if self._last_key is None:
            raise InputError("nothing is compiled yet: pass example_inputs to fxdisagg.compile "
                             "or call the model once")
        return self._compiled[self._last_key]

    @property
    def programs(self) -> RolePrograms:
        """Role programs of the capture the latest call used."""
        return self._latest()[1]

    @property
    def traffic(self) -> dict[int, dict[str, int]]:
        """Bytes each layer's dispatch and return moved in the latest call, counted by the
        distributed runtime (empty in-process, where nothing crosses a process boundary)."""
        return dict(self._runtime.traffic) if self._runtime is not None else {}

    @property
    def counts(self) -> dict[str, int]:
        return self._latest()[2].counts

    # -- execution --------------------------------------------------------------------------
    def __call__(self, **kwargs):
        check_inference(self.model, kwargs)
        cap, programs, ctx = self.prepare(kwargs)
        flat = flat_inputs(cap, kwargs)
        n = flat[0].shape[1]
        self._last_n = n
        plan = self.plan_for(n)
        outs = self._run(programs, plan, flat)
        if outs is None:          # torchrun: only rank 0 returns the outputs
            return None
        return pytree.tree_unflatten(outs, cap.out_spec)

    def _run(self, programs, plan, flat):
        timeout = self.options.get("timeout", 300.0)
        if self.launch == "inprocess":
            from fxdisagg.runtime import inprocess
            return inprocess.run(programs, plan, flat, timeout=timeout)
        from fxdisagg.runtime import distributed
        if self._runtime is None:
            self._runtime = distributed.make_runtime(self.launch, self.alpha, self.beta,
                                                     self.sharding, timeout, _device(self.model))
        try:
            return self._runtime.run(programs, plan, flat)
        except BaseException:
            if self.launch == "spawn":   # failed or interrupted: its workers can not serve
                self.close()             # another call; the next call starts fresh ones
            raise

    def close(self) -> None:
        """Stop the workers (spawn) or leave the process group fxdisagg created (torchrun)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _capture_example(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs to trace with: at least 8 tokens (export specialises lengths 0 and 1), made by
    tiling the user's tokens, so names, dtypes, devices and batch match the calls."""
    n = next(iter(inputs.values())).shape[1]
    if n >= 8:
        return {k: v.clone() for k, v in inputs.items()}  # a view would leak its base's size
    reps = -(-8 // n)
    return {k: v.repeat(1, reps, *([1] * (v.dim() - 2)))[:, :8] for k, v in inputs.items()}
