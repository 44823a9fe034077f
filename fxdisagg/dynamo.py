"""The torch.compile backend: ``torch.compile(model, backend="fxdisagg", options={...})``.

Dynamo is a second capture method in front of the same passes and lowering as
`fxdisagg.compile`. Each graph Dynamo hands the backend becomes a `DynamoGraph`, a module
whose forward replays the graph; from there the path is `fxdisagg.compile`'s own: export
with a dynamic token dim, the passes, `lower`, the runtime. Only the front end differs:

- **Inputs and state.** Dynamo lifts weights and buffers into graph inputs. A placeholder
  reached through an attribute (``L['self'].layer._parameters['weight']``, a global) is
  state: it becomes a buffer of the module, so export sees it as a constant and `partition`
  places it like any weight. A placeholder reached through arguments alone
  (``L['kwargs']['input_ids']``, a resumed frame's local) is a call input, token-indexed at
  dim 1 as HF's are. Size placeholders (``s0``) are read off the tensors they came from.
- **Dynamic from the first graph.** By default Dynamo specialises the first graph to the
  length it saw (the constants are baked into its code), so no pass could serve another
  length. Before compiling a graph whose inputs have unmarked dims, the backend marks them
  ``maybe_mark_dynamic`` on the user's tensors (every dim but the batch; soft, so a dim the
  graph pins, like a hidden size, stays static) and asks Dynamo to trace the frame again
  (``TensorifyScalarRestartAnalysis``, the restart Dynamo lets backends raise). The retrace
  has the length as a symbol, so a new length reuses the graph: no recompile, where Dynamo's
  own automatic dynamic would recompile once. The token dims of each input are its symbolic
  dims as long as the tokens (`_token_dims`). A length-1 call is specialised by Dynamo (it
  never makes 1 symbolic); the symbolic graph of the same frame serves it.
- **Graph breaks.** Each graph is handled alone: one that contains attention is
  disaggregated, one that does not (the code after a break, a sampling step) is returned
  to Dynamo to run as it is. A piece after a break inside the layer stack takes hidden
  states that eager code made; they are marked like the model's inputs.
- **One set of workers.** All graphs of one compiled model share one `Workers` (the
  runtime loads each graph's programs once). A compiled model is identified by its
  ``options`` dict, which torch.compile passes to every graph of that model; the workers
  stop with ``torch._dynamo.reset()``, `close_all`, or at exit.

Inference only: the graphs run under ``torch.no_grad()``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import pathlib
import re
import threading
import types
import weakref

import sympy
import torch
import torch.fx as fx

from fxdisagg.api import DisaggregatedModel, _device
from fxdisagg.capture import Captured, capture
from fxdisagg.config import Config
from fxdisagg.errors import CaptureError, ConfigError
from fxdisagg.locality import size_hint
from fxdisagg.runtime import Workers

log = logging.getLogger(__name__)

#: torch-level calls that can start an attention `find_attention` matches; a graph without
#: any runs as Dynamo traced it, without an export
_ATTENTION_CALLS = {torch.nn.functional.scaled_dot_product_attention, torch.softmax,
                    torch.nn.functional.softmax, torch.Tensor.softmax}
#: source kinds that reach a value through a frame's arguments alone
_ARGUMENT_SOURCES = ("LocalSource", "GetItemSource", "DictGetItemSource")
#: options that are `fxdisagg.compile` arguments rather than `Config` options
_COMPILE_ARGS = ("alpha", "beta", "tp", "sharding", "launch", "dump_dir")


class _Session:
    """What one compiled model's graphs share: the Config and the workers. Its graphs hold
    it; Dynamo holds the graphs (in its caches): when Dynamo lets them go (the model is
    freed, ``torch._dynamo.reset()``), the session goes and its workers stop."""

    def __init__(self, options: dict | None):
        self.options = options                    # the key's object: its id stays unique
        options = dict(options or {})
        degrees = {k: options.pop(k) for k in _COMPILE_ARGS if k in options}
        self.config = Config.of(degrees.pop("alpha", 1), degrees.pop("beta", 1), **degrees,
                                **options)
        self.workers = Workers(self.config)
        self.graphs: dict[tuple, DynamoGraph] = {}   # by frame and inputs
        weakref.finalize(self, self.workers.close)

    def stop_with(self, example_inputs) -> None:
        """Stop the workers when the model is freed: Dynamo keeps compiled graphs (and so
        this session) until ``torch._dynamo.reset()``, but only weak references to the
        model's parameters, which die with it."""
        param = next((t for t in example_inputs if isinstance(t, torch.nn.Parameter)), None)
        if param is not None:
            weakref.finalize(param, self.workers.close)

    def close(self) -> None:
        self.workers.close()


_sessions: weakref.WeakValueDictionary[int, _Session] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None,
            mode: str | None = None):
    """The ``torch_dynamo_backends`` entry point ``fxdisagg``. ``options``: the arguments of
    `fxdisagg.compile` (``alpha``, ``beta``, ``launch``, ``kernel``, ``max_len``...)."""
    if mode is not None:
        raise ConfigError(f"mode={mode!r} is an Inductor setting; fxdisagg takes "
                          f"options={{'alpha': ..., 'beta': ...}}")
    if (options or {}).get("tp", 1) != 1:
        raise ConfigError("tp > 1 splits the model's modules before capture, which Dynamo's "
                          "graphs no longer have; use fxdisagg.compile(model, alpha, beta, tp=...)")
    slots = _slots(gm)
    if _mark_dynamic(slots, example_inputs):
        raise torch._dynamo.exc.TensorifyScalarRestartAnalysis(
            "fxdisagg: trace again with the token dims dynamic")
    if not _may_have_attention(gm):
        log.info("fxdisagg: Dynamo graph %s has no attention; it runs as traced", _graph_id(gm))
        return gm.forward
    if any(n.op == "call_method" and n.target == "item" for n in gm.graph.nodes):
        raise ConfigError(f"fxdisagg: Dynamo graph {_graph_id(gm)} reads tensor values with "
                          f".item() (torch.compile(dynamic=True) turns float attributes such "
                          f"as a softmax scale into tensors read that way), which torch.export "
                          f"can not trace. Leave dynamic at its default: fxdisagg makes the "
                          f"token dims dynamic itself")
    python = [s[2] for s in slots if s[0] == "python"]
    if python:
        raise CaptureError(f"fxdisagg: Dynamo graph {_graph_id(gm)} has attention and takes "
                           f"the Python values {python} as inputs; fxdisagg takes tensors "
                           f"only. Make them constants, avoid the graph break before it, "
                           f"or use fxdisagg.compile")
    session = _session(options)
    key = _graph_key(gm, slots)
    token_dims, untokened = _token_dims(gm, slots)
    if not untokened:
        module = _GraphModule(gm, slots, example_inputs, token_dims)
        session.workers.device = session.workers.device or _device(module)
        graph = session.graphs[key] = DynamoGraph(module, session)
        session.stop_with(example_inputs)
        return graph.run_flat
    # Dynamo specialises a token dim of length 1 (it never makes 0 or 1 symbolic): the
    # symbolic graph of the same frame serves it, its capture being valid from length 1
    sibling = session.graphs.get(key)
    if sibling is not None:
        return functools.partial(_run_on, sibling, gm, slots)
    log.warning("fxdisagg: Dynamo graph %s runs as traced, not disaggregated: its inputs %s "
                "have no dynamic token dim (a first call with one token, or "
                "torch.compile(dynamic=False))", _graph_id(gm), untokened)
    return gm.forward


def _session(options: dict | None) -> _Session:
    """The session of the compiled model whose ``options`` dict this is (torch.compile
    passes the same dict to every graph of one model); without options, one shared."""
    with _lock:
        session = _sessions.get(id(options))
        if session is None or session.options is not options:
            session = _sessions[id(options)] = _Session(options)
        return session


@torch.compiler.disable
def _run_on(graph: "DynamoGraph", gm, slots, *args):
    inputs = {s[1]: a for s, a in zip(slots, args) if s[0] == "input"}
    return gm(*args) if graph.as_traced else graph.run_inputs(inputs, gm, args)


def graphs() -> list["DynamoGraph"]:
    """The disaggregated graphs of every live compiled model (explain(), traffic,
    counts, runtime: as `DisaggregatedModel`)."""
    with _lock:
        return [g for s in _sessions.values() for g in s.graphs.values()]


def close_all() -> None:
    """Stop the workers of every model compiled with the backend (also run by
    ``torch._dynamo.reset()``)."""
    with _lock:
        sessions = list(_sessions.values())
        _sessions.clear()
    for s in sessions:
        s.close()


backend.reset = close_all      # torch.compile's wrapper calls it from torch._dynamo.reset()


class DynamoGraph(DisaggregatedModel):
    """One Dynamo graph, disaggregated: `DisaggregatedModel` over a `_GraphModule` whose
    inputs are the graph's token-indexed ones."""

    as_traced = False       # no attention matched: the graph runs as Dynamo traced it

    def __init__(self, module: "_GraphModule", session: _Session):
        config = session.config
        if config.dump_dir:           # one directory per graph: graphs must not overwrite
            sub = f"dynamo_graph_{module.graph_id.replace('/', '_')}"
            config = dataclasses.replace(config, dump_dir=str(pathlib.Path(config.dump_dir, sub)))
        super().__init__(module, config, session.workers)
        self.session = session                     # keeps the workers' owner alive
        self.max_len = min(session.config.max_len or module.max_len, module.max_len)

    def _capture(self, example) -> Captured:
        return capture(self.model, example, max_len=self.max_len,
                       token_dims=self.model.token_dims)

    def _token_dims(self, name: str) -> tuple[int, ...]:
        return self.model.token_dims[name]

    def _verify(self, kwargs, tolerance) -> None:
        """verify: the graph's outputs against the graph run as traced (a Dynamo graph
        has no per-layer hidden states to compare)."""
        from fxdisagg.verify import verify_outputs
        verify_outputs(f"Dynamo graph {self.model.graph_id}", self._call(kwargs),
                       self.model(**kwargs), tolerance)

    @torch.compiler.disable
    def run_flat(self, *args):
        """What Dynamo calls: the graph's placeholders in order -> its outputs. Dynamo is
        disabled in here, or it would compile the frames export traces."""
        if self.as_traced:
            return self.model.graph_module(*args)
        return self.run_inputs(self.model.inputs_of(args), self.model.graph_module, args)

    def run_inputs(self, inputs: dict, traced, args):
        """The capture happens here, on the first call of each batch size (an export inside
        Dynamo's compile would corrupt the guards Dynamo is building); ``traced(*args)``
        runs a graph fxdisagg finds no attention in."""
        with torch.no_grad():
            if not self.prepare(inputs).counts.get("lower.exchanges"):
                log.info("fxdisagg: Dynamo graph %s has no attention fxdisagg matches; it "
                         "runs as traced", self.model.graph_id)
                self.as_traced = True
                return traced(*args)
            return list(self(**inputs))


class _GraphModule(torch.nn.Module):
    """A Dynamo graph as a module torch.export can trace: state held as buffers (or plain
    attributes for non-tensors), sizes read off the inputs, call inputs by name."""

    def __init__(self, gm: fx.GraphModule, slots: list[tuple], example_inputs, token_dims: dict):
        super().__init__()
        self.graph_module, self.slots = gm, [list(s) for s in slots]
        self.input_names = tuple(s[1] for s in slots if s[0] == "input")
        self.token_dims = token_dims
        self.graph_id = _graph_id(gm)
        self.display_name = f"Dynamo graph {self.graph_id}"
        self.max_len = _max_len(gm, slots, token_dims)
        for i, ((kind, name, *_), value) in enumerate(zip(slots, example_inputs)):
            if kind != "state":
                continue
            if hasattr(self, name):      # a name taken (by nn.Module or another state)
                name = self.slots[i][1] = f"state_{i}"
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value.detach(), persistent=False)
            else:
                setattr(self, name, value)
        self.eval()
        # export binds inputs by forward's parameter names: give this instance's forward
        # the graph's input names
        forward = lambda self, **inputs: _GraphModule.forward(self, **inputs)  # noqa: E731
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in self.input_names])
        self.forward = types.MethodType(forward, self)

    def inputs_of(self, args) -> dict[str, torch.Tensor]:
        return {s[1]: a for s, a in zip(self.slots, args) if s[0] == "input"}

    def forward(self, **inputs):
        args = []
        for kind, name, *where in self.slots:
            if kind == "input":
                args.append(inputs[name])
            elif kind == "state":
                args.append(getattr(self, name))
            else:                       # a size: dim `where[1]` of input `where[0]`
                args.append(inputs[where[0]].shape[where[1]])
        return tuple(self.graph_module(*args))


# -- reading Dynamo's graph ------------------------------------------------------------------------
def _examples(gm) -> list:
    return [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]


def _slots(gm: fx.GraphModule) -> list[tuple]:
    """Per placeholder: ``("input", name)``, ``("state", name)``, ``("size", name,
    input name, dim)`` or ``("python", name, source)`` (a Python value argument)."""
    nodes = list(gm.graph.find_nodes(op="placeholder"))
    inputs_by_source = {}
    slots = []
    for n in nodes:
        source = n.meta["grapharg"].source
        if _is_argument(source) and isinstance(n.meta.get("example_value"), torch.Tensor):
            inputs_by_source[source.name] = n.name
            slots.append(("input", n.name))
        elif type(source).__name__ == "TensorPropertySource":
            slots.append(None)          # resolved below: its tensor may come later
        elif _is_argument(source):
            slots.append(("python", n.name, source.name))
        else:
            slots.append(("state", _state_name(source.name, n.name)))
    for i, n in enumerate(nodes):
        if slots[i] is None:
            source = n.meta["grapharg"].source
            owner = inputs_by_source.get(source.base.name)
            if owner is None or source.prop.name != "SIZE":
                slots[i] = ("python", n.name, source.name)
            else:
                slots[i] = ("size", n.name, owner, source.idx)
    return slots


def _is_argument(source) -> bool:
    while source is not None:
        if type(source).__name__ not in _ARGUMENT_SOURCES:
            return False
        source = getattr(source, "base", None)
    return True


def _state_name(source: str, fallback: str) -> str:
    """``L['args'][0]._modules['model']._parameters['w']`` -> ``model_w`` (a buffer name
    the dumps can show)."""
    parts = [a or b or c for a, b, c in re.findall(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)", source)]
    parts = [p for p in parts if p not in ("_modules", "_parameters", "_buffers")]
    while parts and parts[0] in ("args", "kwargs", "self", "0"):
        parts.pop(0)
    name = re.sub(r"\W", "_", "_".join(parts))
    return name if name and name.isidentifier() else fallback


def _token_dims(gm, slots) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Per call input, its token dims: the symbolic dims as long as the first symbolic dim
    after the batch (dim 0 of a vector) of the first input that has one. Dynamo gives each
    input its own symbol (``input_ids`` s0, ``attention_mask`` s1), equal at trace time; a
    dim left free but not tokens (a vocabulary after a graph break) has another length and
    stays static. Also the inputs without a token dim (none: the graph can be captured)."""
    inputs = [(s[1], v) for s, v in zip(slots, _examples(gm)) if s[0] == "input"]
    n = next((size_hint(x) for _, v in inputs for x in v.shape[v.dim() > 1:]
              if isinstance(x, torch.SymInt)), None)
    dims = {name: tuple(d for d, x in enumerate(v.shape)
                        if isinstance(x, torch.SymInt) and size_hint(x) == n)
            for name, v in inputs}
    return dims, [name for name, d in dims.items() if not d]


#: the largest length of a graph whose token range Dynamo left unbounded
UNBOUNDED_MAX_LEN = 1 << 20


def _max_len(gm, slots, token_dims) -> int:
    """The largest token count Dynamo's shape environment allows the graph (BERT's
    position table bounds it at max_position_embeddings)."""
    for s, v in zip(slots, _examples(gm)):
        if s[0] == "input":
            node = v.shape[token_dims[s[1]][0]].node
            upper = node.shape_env.bound_sympy(node.expr).upper
            return int(upper) if isinstance(upper, sympy.Integer) else UNBOUNDED_MAX_LEN
    return UNBOUNDED_MAX_LEN


def _graph_key(gm, slots) -> tuple:
    """Graphs of one frame with the same inputs and state: a length-1 specialisation and
    the symbolic graph it can use."""
    compile_id = gm.meta.get("dynamo_compile_id")
    return (getattr(compile_id, "frame_id", None),
            tuple((s[0], s[1]) for s in slots if s[0] != "size"))


def _mark_dynamic(slots, example_inputs) -> bool:
    """Mark the dims a call input may index tokens by dynamic, on the user's tensors: dim 0
    of a vector (``cache_position``), every dim but the batch of the rest (HF's token dim
    is 1, a mask's are 2 and 3). The marks are soft (``maybe_mark_dynamic``): a dim the
    graph pins (a hidden size) stays static. True if a mark was new, i.e. a retrace can
    make the graph symbolic."""
    new = False
    for slot, value in zip(slots, example_inputs):
        if slot[0] != "input":
            continue
        marked = getattr(value, "_dynamo_weak_dynamic_indices", set())
        for d in range(value.dim() > 1, value.dim()):
            if value.shape[d] >= 2 and d not in marked:
                torch._dynamo.maybe_mark_dynamic(value, d)
                new = True
    return new


def _may_have_attention(gm) -> bool:
    return any(n.target in _ATTENTION_CALLS or (n.op == "call_method" and n.target == "softmax")
               for n in gm.graph.nodes)


def _graph_id(gm) -> str:
    return str(gm.meta.get("dynamo_compile_id", "?"))
