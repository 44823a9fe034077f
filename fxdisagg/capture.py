"""Capture: an unmodified HF model -> one flat ATen FX graph with a dynamic sequence dim.

`torch.export` (non-strict, ``use_cache=False``) traces the model once with the sequence
dimension of every token-indexed input marked dynamic (``torch.export.Dim``). Every node's
``meta["val"]`` then carries the sequence length as one sympy symbol, so later passes read
"which dims are sequence dims" off shapes instead of guessing, and one capture serves every
length from 1 to the maximum.

The batch size is static in a capture (HF graphs specialise it); the API keeps one capture
per batch size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxdisagg.errors import CaptureError, InferenceOnlyError, InputError, describe

log = logging.getLogger(__name__)

#: inputs whose dim 1 is the token dim (HF names); anything else must not depend on N.
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


@dataclasses.dataclass
class Captured:
    """A captured model: a flat GraphModule plus what is needed to call it like the model."""

    gm: fx.GraphModule
    input_names: tuple[str, ...]     # flat tensor inputs, in placeholder order
    constants: dict[str, Any]        # non-tensor kwargs baked into the capture (use_cache=False)
    out_spec: pytree.TreeSpec        # rebuilds the HF output type from the flat outputs
    seq: sympy.Symbol                # the symbol of the sequence length
    batch: int
    max_len: int
    token_dims: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()        # what the capture decided that the user should know

    def dims_of(self, name: str) -> tuple[int, ...]:
        """The token dims of input ``name``: dim 1 (HF's inputs) unless the capture says."""
        return self.token_dims.get(name, (1,))

    def length(self, flat) -> int:
        """The token count of a call's flat inputs."""
        return flat[0].shape[self.dims_of(self.input_names[0])[0]]


def check_inference(model: torch.nn.Module, inputs: dict[str, Any]) -> None:
    if model.training:
        raise InferenceOnlyError(
            "the model is in training mode; fxdisagg compiles inference programs only for now. "
            "Call model.eval() before fxdisagg.compile.")
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            raise InferenceOnlyError(
                f"input {name!r} requires grad; fxdisagg runs inference only for now. "
                f"Pass a detached tensor (x.detach()) or run under torch.no_grad().")


def capture(model: torch.nn.Module, example: dict[str, torch.Tensor], *, max_len: int,
            token_dims: dict[str, tuple[int, ...]] | None = None) -> Captured:
    """Export ``model(**example, use_cache=False)`` with a dynamic token dim: dim 1 of
    every tensor input HF names (`TOKEN_INPUTS`), or the dims ``token_dims`` gives per
    input (the torch.compile front end's graphs)."""
    check_inference(model, example)
    tensors = {k: v for k, v in example.items() if isinstance(v, torch.Tensor)}
    known = token_dims if token_dims is not None else dict.fromkeys(TOKEN_INPUTS, (1,))
    unknown = [k for k in tensors if k not in known]
    if unknown:
        raise InputError(f"inputs {unknown} are not token-indexed inputs fxdisagg knows "
                         f"({', '.join(known)}); pass only those as tensors")
    settings = {k: v for k, v in example.items() if not isinstance(v, torch.Tensor) and v is not None}
    kwargs = {**tensors, **settings}     # settings (logits_to_keep=1, ...) are baked in
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    notes: list[str] = []
    with _token_local_experts(model, notes):
        ep, max_len = _export_in_range(model, kwargs, {k: known[k] for k in tensors}, max_len,
                                       notes)
    gm = ep.module()
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    names = _flatten_placeholders(gm, tuple(kwargs))
    gm = fx.GraphModule(gm, gm.graph)  # a plain module: no pytree in-spec hooks
    out_spec = ep.call_spec.out_spec
    seq = _seq_symbol(gm)
    batch = next(iter(tensors.values())).shape[0]
    return Captured(gm, names, constants, out_spec, seq, batch, max_len,
                    {k: known[k] for k in names} if token_dims is not None else {}, tuple(notes))


def _export_in_range(model, kwargs: dict, token_dims: dict, max_len: int, notes: list):
    """Export for lengths 1..max_len; when the model's code guards the length lower, again
    with the bounds that guard names (`_lower_bounds`, noted). Returns (program, max_len)."""
    try:
        return _export(model, kwargs, token_dims, max_len), max_len
    except Exception as e:  # noqa: BLE001 - re-raised typed, with the cause attached
        first, limits = e, _lower_bounds(e, max_len)
    for limit in limits:
        try:
            ep = _export(model, kwargs, token_dims, limit)
        except Exception:  # noqa: BLE001 - the next bound, or the first error below
            continue
        notes.append(f"capture: the model's code allows at most {limit} tokens (torch.export "
                     f"found the guard), fewer than max_len={max_len}; captured for 1..{limit}")
        log.warning("%s", notes[-1])
        return ep, limit
    raise _capture_error(model, first) from first


#: HF's MoE expert implementations that keep each token's experts on its own rows
TOKEN_LOCAL_EXPERTS = "batched_mm"


@contextlib.contextmanager
def _token_local_experts(model, notes: list):
    """Capture a mixture-of-experts model with HF's ``batched_mm`` experts: per (token,
    expert) pair it gathers that expert's weights and multiplies, so every op keeps tokens
    apart (`partition` proves it with DTensor's rules). HF's ``grouped_mm`` sorts the
    pairs of all tokens by expert and its ``eager`` loop is data-dependent: neither can
    run on a CompNode. Same math; the model's setting is restored after the capture."""
    can = getattr(type(model), "_can_set_experts_implementation", None)
    before = getattr(getattr(model, "config", None), "_experts_implementation", None)
    if can is None or not can() or before in (None, TOKEN_LOCAL_EXPERTS):
        yield
        return
    model.set_experts_implementation(TOKEN_LOCAL_EXPERTS)
    notes.append(f"capture: mixture-of-experts layers captured with experts_implementation="
                 f"{TOKEN_LOCAL_EXPERTS!r} (the model uses {before!r}, which mixes tokens "
                 f"across the batch); same math")
    try:
        yield
    finally:
        model.set_experts_implementation(before)


def _export(model, kwargs: dict, token_dims: dict, max_len: int):
    n_dim = torch.export.Dim("N", min=1, max=max_len)
    dynamic = {k: (dict.fromkeys(token_dims[k], n_dim) if k in token_dims else None) for k in kwargs}
    with torch.no_grad():
        return torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)


def _lower_bounds(e: Exception, max_len: int) -> list[int]:
    """Bounds below ``max_len`` to capture for when the model's code guards the length, best
    first (at most two): the bound torch.export proposes (``Suggested fixes: N =
    Dim('N', max=512)``; BERT's 512 positions), else the lengths named in the guards it
    found violated, each as it is and one below, since a guard ``N != 2048`` excludes the
    bound itself (GPT-Neo's and MPT's 2048-position buffers, sliced to N, guard
    ``N != 2048``; MPT's ALiBi also ``N <= 2048``, spelled with ``max``)."""
    text = str(e)
    proposed = re.search(r"N = Dim\('N', max=(\d+)\)", text)
    if proposed:
        return [int(proposed.group(1))] if 1 <= int(proposed.group(1)) < max_len else []
    named = set()
    for guard in re.findall(r"satisfy the generated guard (.*)", text):
        guard = re.sub(r"\.size\(\)\[\d+\]", "", guard.rstrip("."))   # dims are not lengths
        named.update(int(c) for c in re.findall(r"(?<![\w.])(\d+)(?![\w.])", guard))
    bounds = sorted({b for c in named for b in (c, c - 1) if 1 < b < max_len}, reverse=True)
    return bounds[:2]


def _capture_error(model, e: Exception) -> CaptureError:
    return CaptureError(f"torch.export could not capture {type(model).__name__}: "
                        f"{type(e).__name__}: {str(e)[:2000]}")


def _accepts(model: torch.nn.Module, name: str) -> bool:
    import inspect
    return name in inspect.signature(model.forward).parameters


def _flatten_placeholders(gm: fx.GraphModule, names: tuple[str, ...]) -> tuple[str, ...]:
    """Give the graph plain positional tensor placeholders: drop the pytree codegen and
    the constant (non-tensor) placeholders, which the capture already specialised."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)  # export's input guards: `flat_inputs` validates instead
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)  # dtype asserts of the trace; they only add users
    kept = []
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], names):
        if isinstance(node.meta.get("val"), torch.Tensor):
            node.target = node.name = name
            kept.append(name)
        else:
            if node.users:
                raise CaptureError(f"constant input {name!r} is used by the graph; "
                                   f"fxdisagg can not specialise it")
            gm.graph.erase_node(node)
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    return tuple(kept)


def _seq_symbol(gm: fx.GraphModule) -> sympy.Symbol:
    for node in gm.graph.find_nodes(op="placeholder"):
        for size in node.meta["val"].shape:
            if isinstance(size, torch.SymInt):
                return size.node.expr
    raise CaptureError("the capture did not keep the sequence dimension dynamic")


#: optional token inputs HF fills when a call leaves them out (`with_hf_defaults`)
HF_DEFAULTS = ("attention_mask", "position_ids", "token_type_ids")


def with_hf_defaults(names, kwargs: dict[str, Any], past: int = 0) -> dict[str, Any]:
    """Optional token inputs the capture has but the call left out, filled as HF fills them:
    ``attention_mask`` all ones, ``position_ids`` past..past+N-1 per row (``past``: tokens
    already in the KV cache), ``token_type_ids`` zeros."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return kwargs
    b, n = ids.shape
    defaults = {
        "attention_mask": lambda: torch.ones_like(ids),
        "position_ids": lambda: torch.arange(past, past + n, device=ids.device).expand(b, n),
        "token_type_ids": lambda: torch.zeros_like(ids),
    }
    filled = {k: defaults[k]() for k in names if kwargs.get(k) is None and k in defaults}
    return {**kwargs, **filled} if filled else kwargs


def check_token_ids(kwargs: dict[str, Any], vocab_size: int | None) -> None:
    """``input_ids`` as HF's embedding accepts them: integers in [0, vocab_size). Checked
    before any worker runs, so a bad id is a typed error here, not an IndexError remotely."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"input_ids must hold integer token ids, got {describe(ids)}")
    if vocab_size and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InputError(f"input_ids hold ids in [{int(ids.min())}, {int(ids.max())}], outside the "
                         f"vocabulary [0, {vocab_size}) of the model")


def flat_inputs(cap: Captured, kwargs: dict[str, Any], past: int = 0) -> list[torch.Tensor]:
    """Validate call kwargs against the capture and return them in placeholder order
    (``past``: tokens before these in a KV cache; the sequence is ``past + N`` long)."""
    names = set(cap.input_names)
    kwargs = with_hf_defaults(cap.input_names, kwargs, past)
    extra = [k for k, v in kwargs.items() if k not in names and k not in cap.constants and v is not None]
    missing = [k for k in cap.input_names if kwargs.get(k) is None]
    if extra or missing:
        raise InputError(f"the model was compiled for inputs {list(cap.input_names)}; "
                         f"got unexpected {extra} and missing {missing}. Recompile with "
                         f"example_inputs holding the inputs you pass.")
    for k, v in cap.constants.items():
        if k in kwargs and kwargs[k] != v:
            raise InputError(f"{k}={kwargs[k]!r} differs from the captured {k}={v!r}")
    flat = [kwargs[k] for k in cap.input_names]
    n = None
    for k, t in zip(cap.input_names, flat):
        dims = cap.dims_of(k)
        if not isinstance(t, torch.Tensor) or t.dim() <= max(dims):
            raise InputError(f"input {k!r} must be a tensor with token dims {dims}, got "
                             f"{describe(t)}")
        n = t.shape[dims[0]] if n is None else n
        if any(t.shape[d] != n for d in dims):
            raise InputError(f"input {k!r} has {[t.shape[d] for d in dims]} tokens but "
                             f"{cap.input_names[0]!r} has {n}")
        if t.requires_grad:
            raise InferenceOnlyError(f"input {k!r} requires grad; fxdisagg runs inference only for now")
    if not 1 <= past + n <= cap.max_len:
        fix = (f"the model's code allows at most {cap.max_len} tokens" if cap.notes else
               f"recompile with max_len >= {past + n}")
        raise InputError(f"sequence length {past + n} is outside the captured range "
                         f"[1, {cap.max_len}]; {fix}")
    return flat


def capture_example(inputs: dict[str, torch.Tensor], token_dims: dict[str, tuple[int, ...]]
                     ) -> dict[str, torch.Tensor]:
    """Inputs to trace with: at least 8 tokens (export specialises lengths 0 and 1), made by
    tiling the user's tokens along each input's token dims, so names, dtypes, devices and
    batch match the calls."""
    out = {}
    for k, v in inputs.items():
        for d in token_dims[k]:
            n = v.shape[d]
            if n < 8:
                reps = [1] * v.dim()
                reps[d] = -(-8 // n)
                v = v.repeat(*reps).narrow(d, 0, 8)
        out[k] = v.clone(memory_format=torch.contiguous_format)  # a view leaks its base's size
    return out


def new_columns(kwargs: dict, past: int) -> dict:
    """The call's token inputs restricted to its new tokens: HF passes ``attention_mask``
    (and sometimes ``position_ids``) over cached and new tokens alike."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("a call with a cache needs input_ids of shape [batch, new tokens]")
    n, out = ids.shape[1], {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and k != "input_ids" and v.dim() >= 2 and v.shape[1] != n:
            if v.shape[1] != past + n:
                raise InputError(f"{k} has {v.shape[1]} tokens; with {past} cached and {n} new "
                                 f"it must have {n} or {past + n}")
            v = v[:, past:]
        out[k] = v
    return out
