"""Small helpers over FX graphs that every pass shares: shapes, sequence dims, node text."""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def val(node) -> object:
    """The example value export recorded for ``node`` (FakeTensor, SymInt, tuple...)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def empty_val(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous value of ``shape`` (and ``dtype``, default ``like``'s) on ``like``'s
    device and fake mode, for the ``meta["val"]`` of a node a pass creates.

    Equal requests share one value (values are metadata; nothing writes them). A fresh
    fake tensor with symbolic sizes costs ~1 ms (its strides and contiguity are sympy
    expressions), and the passes ask for the same few shapes once per layer: 160 of them
    were 0.09 s of `split_attention` on a 32-layer Llama (benchmarks/passes.py). The
    shared values live on the fake mode, and go with it (a weak-keyed table would keep
    every mode alive: its values refer to it)."""
    dtype = dtype or like.dtype
    mode = getattr(like, "fake_mode", None)
    if mode is None:
        return like.new_empty(shape, dtype=dtype)
    key = (tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in shape), dtype,
           like.device)
    cache = mode.__dict__.setdefault("_fxdisagg_empty_vals", {})
    if key not in cache:
        cache[key] = like.new_empty(shape, dtype=dtype)
    return cache[key]


def lazy_graph_module(root, graph: fx.Graph, class_name: str = "GraphModule") -> fx.GraphModule:
    """A GraphModule whose Python code is generated when it is first run or read (torch's
    lazy GraphModule, as Inductor builds its own), not when it is built. Passes and `lower`
    only read graphs, and code generation is ~1.5 ms a module: the 65 stages of a 32-layer
    program cost 0.1 s of a compile in code nothing had read yet (benchmarks/passes.py).
    Running, pickling (to a spawned worker) or reading ``.code`` generates it. Without the
    lazy class (an older torch): generated now."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        return fx.GraphModule(root, graph, class_name=class_name)
    return _LazyGraphModule(root, graph, class_name=class_name)


def attr_value(node: fx.Node):
    """The module attribute a ``get_attr`` node reads (a weight, buffer or constant)."""
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(val(node), torch.Tensor)


def is_seq(size, seq) -> bool:
    """True when ``size`` (an int or SymInt) is exactly the sequence length symbol."""
    return isinstance(size, torch.SymInt) and size.node.expr == seq


def mentions_seq(size, seq) -> bool:
    return isinstance(size, torch.SymInt) and seq in size.node.expr.free_symbols


def seq_dims(node, seq) -> list[int]:
    """Dims of ``node``'s tensor whose size is the sequence length."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return []
    return [d for d, s in enumerate(v.shape) if is_seq(s, seq)]


def token_dims(node, seq) -> list[int]:
    """Dims whose size involves the sequence length: ``N`` itself or a merged dim such as
    ``B*N`` (HF's Conv1D flattens batch and tokens into rows)."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return []
    return [d for d, s in enumerate(v.shape) if mentions_seq(s, seq)]


def has_seq(node, seq) -> bool:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return any(mentions_seq(s, seq) for s in v.shape)
    return mentions_seq(v, seq)


def describe_node(node: fx.Node) -> str:
    """``name = target(...)`` with the tensor's shape: for error messages."""
    v = val(node)
    shape = f" -> {tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else ""
    stack = node.meta.get("stack_trace", "").strip().splitlines()
    where = f"  (from {stack[-2].strip()})" if len(stack) >= 2 else ""
    return f"node {node.name!r} = {node.target}{shape}{where}"


def single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None

