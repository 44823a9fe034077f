"""Tensor-parallel CompNodes: each CompNode is a group of ``tp`` ranks that split every
transformer block as Megatron does.

Column-parallel q/k/v and MLP up (and gate) projections, row-parallel O-projection and MLP
down projection, and one all-reduce (``fxdisagg::tp_all_reduce``) after each row-parallel
linear: two per layer. Rank ``t`` of a group holds query heads ``[t*H/tp, (t+1)*H/tp)``, kv
heads ``[t*Hkv/tp, (t+1)*Hkv/tp)`` (so GQA's head map is kept) and the same block of the MLP's
intermediate features. Norms, embeddings and the LM head stay replicated.

How: module surgery before capture. `shard_model(model, tp, t)` is a shallow copy of the
model whose planned linears are replaced by their rank-``t`` slices; everything else is
shared with the user's model. HF writes head counts in its views as ``-1`` and derives
GQA's head map from ratios, so the copy's own code computes the local shapes, and one
capture (of rank 0's copy) is the program of every rank of a group: only the parameters
differ (`rank_programs`). Why not DTensor's ``parallelize_module`` before capture: the plan
is the same (HF's ``base_model_tp_plan`` *is* a DTensor plan), but it does not export
here: a Llama parallelized with ``ColwiseParallel``/``RowwiseParallel`` on a fake process
group fails ``torch.export`` (non-strict, torch 2.13) with "Expected all
pytree.tree_leaves ... to be graphable types, but found ... DTensorSpec"; and where it
exports it traces a live process group's collectives into the graph, while fxdisagg's
workers own their transports (three runtimes, no process group in the driver). A plain
sliced module exports like the model itself.

The plan: HF's ``config.base_model_tp_plan`` ("colwise" / "rowwise" on ``nn.Linear``),
or `OWN_PLANS` for families HF ships none for or one fxdisagg cannot apply (GPT-2's fused
``Conv1D`` ``c_attn`` and Phi-3's fused ``qkv_proj`` are split per head within each of q, k
and v; Phi-3's fused ``gate_up_proj`` within each half). Anything else raises
`ConfigError` naming the module.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from fxdisagg.errors import ConfigError
from fxdisagg.graph import lazy_graph_module

COLWISE, ROWWISE = "colwise", "rowwise"
COLWISE_QKV = "colwise_qkv"            # fused [q | k | v] rows: each section split per head
COLWISE_PAIR = "colwise_pair"          # fused [gate | up] rows: each half split alike
#: HF plan styles whose modules fxdisagg keeps whole on every rank, which is exact: norms
#: replicated for training's sake, vocabulary-parallel embeddings (a lookup, not a matmul)
KEPT_WHOLE = {"replicated_with_grad_allreduce", "embedding_rowwise"}

#: plans (relative to ``model.base_model``) for families HF ships none for, or ships one
#: fxdisagg cannot apply (Phi-3's fused projections are "colwise_gather_output" there)
OWN_PLANS = {
    "gpt2": {"h.*.attn.c_attn": COLWISE_QKV, "h.*.attn.c_proj": ROWWISE,
             "h.*.mlp.c_fc": COLWISE, "h.*.mlp.c_proj": ROWWISE},
    "phi3": {"layers.*.self_attn.qkv_proj": COLWISE_QKV, "layers.*.self_attn.o_proj": ROWWISE,
             "layers.*.mlp.gate_up_proj": COLWISE_PAIR, "layers.*.mlp.down_proj": ROWWISE},
}


def _local_split_size(attention, tp: int) -> None:
    """GPT-2 cuts its fused qkv output at ``split_size``."""
    attention.split_size //= tp


def _local_head_counts(attention, tp: int) -> None:
    """Phi-3 reads its head counts from itself and, to cut its fused qkv, from its config
    (a copy: the user's model keeps its own)."""
    attention.num_key_value_heads //= tp
    c = attention.config = copy.copy(attention.config)
    c.num_attention_heads //= tp
    c.num_key_value_heads //= tp


#: per family, module pattern -> how its copy learns the local sizes the split changes
OWN_FIXES = {
    "gpt2": {"h.*.attn": _local_split_size},
    "phi3": {"layers.*.self_attn": _local_head_counts},
}


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x @ W_t^T) + b``: rank t's columns of the weight; the bias is added
    once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        y = torch.ops.fxdisagg.tp_all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def plan_of(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    plan = OWN_PLANS.get(getattr(config, "model_type", None)) or getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise ConfigError(f"tp > 1 needs a tensor-parallel plan for {type(model).__name__}: HF ships "
                          f"none for model_type {getattr(config, 'model_type', None)!r} and fxdisagg "
                          f"has its own only for {sorted(OWN_PLANS)}; use tp=1")
    for name, style in plan.items():
        if style not in (COLWISE, ROWWISE, COLWISE_QKV, COLWISE_PAIR, *KEPT_WHOLE):
            raise ConfigError(f"tp > 1: the plan of {type(model).__name__} splits {name!r} as "
                              f"{style!r}; fxdisagg splits only colwise and rowwise linears")
    return plan


def check_tp(model: nn.Module, tp: int) -> None:
    """Raise ConfigError unless ``tp`` divides the heads, the kv heads and every planned
    linear; the message lists the tp values that work."""
    if tp == 1:
        return
    plan_of(model)
    config = model.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    sizes = [heads, kv] + [n for _, m, s in _planned(model) if s != ROWWISE
                           for n in _sections(model, m, s)]
    if any(s % tp for s in sizes):
        ok = [d for d in range(1, heads + 1) if all(s % d == 0 for s in sizes)]
        raise ConfigError(f"tp={tp} does not divide the model: {heads} query heads, {kv} kv "
                          f"heads and the column-split linears must split evenly; tp in {ok} work")


def shard_model(model: nn.Module, tp: int, t: int) -> nn.Module:
    """Rank ``t``'s copy of ``model``: planned linears sliced, everything else shared."""
    check_tp(model, tp)
    root = _Copier(model)
    for name, module, style in _planned(model):
        root.replace(_base_name(model, name), _slice(module, _sections(model, module, style), tp, t))
    for pattern, fix in OWN_FIXES.get(model.config.model_type, {}).items():
        for name, _ in model.base_model.named_modules():
            if _matches(pattern, name):
                fix(root.module(_base_name(model, name)), tp)
    return root.copy


def rank_programs(program, shards) -> list:
    """One CompNode program per TP rank: ``program`` (captured from ``shards[0]``) with
    each stage's parameters taken from that rank's shard by name; constants the capture
    made, which no shard holds, are shared."""
    out = [program]
    for shard in shards[1:]:
        p = copy.copy(program)
        p._modules = dict(program._modules)
        for name, stage in program.named_children():
            mine = lazy_graph_module(stage, stage.graph, type(stage).__name__)
            for node in stage.graph.find_nodes(op="get_attr"):
                value = _lookup(shard, node.target)
                if value is not None:
                    parent, _, leaf = node.target.rpartition(".")
                    setattr(mine.get_submodule(parent) if parent else mine, leaf, value)
            p._modules[name] = mine
        out.append(p)
    return out


def _lookup(module: nn.Module, target: str):
    try:
        return module.get_parameter(target)
    except AttributeError:
        try:
            return module.get_buffer(target)
        except AttributeError:
            return None


# -- slicing ------------------------------------------------------------------------------------
def _planned(model):
    """(name, module, style) of every module the plan splits."""
    plan = {p: s for p, s in plan_of(model).items() if s not in KEPT_WHOLE}
    for name, module in model.base_model.named_modules():
        for pattern, style in plan.items():
            if _matches(pattern, name):
                yield name, module, style


def _matches(pattern: str, name: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace(r"\*", r"\d+"), name) is not None


def _base_name(model, name: str) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}.{name}" if model.base_model is not model and prefix else name


def _linear(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) of an ``nn.Linear`` or HF's ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D":          # transformers.pytorch_utils.Conv1D: [in, out]
        return module.weight.t(), module.bias
    raise ConfigError(f"tp > 1: {type(module).__name__} is planned as a linear but is neither "
                      f"nn.Linear nor Conv1D")


def _sections(model, module, style: str) -> list[int] | None:
    """The row sections a column split cuts alike (None: a row split): q, k, v sized by the
    head counts for a fused qkv, two halves for a fused gate-up, else the whole."""
    out = _linear(module)[0].shape[0]
    if style == ROWWISE:
        return None
    if style == COLWISE_QKV:
        c = model.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        d = out // (heads + 2 * kv)
        return [heads * d, kv * d, kv * d]
    return [out // 2] * 2 if style == COLWISE_PAIR else [out]


def _slice(module, sections: list[int] | None, tp: int, t: int) -> nn.Module:
    w, b = _linear(module)
    if sections is None:
        cols = w.shape[1] // tp
        return RowParallelLinear(w.detach()[:, t * cols:(t + 1) * cols].clone(),
                                 None if b is None else b.detach().clone())
    starts = [sum(sections[:k]) for k in range(len(sections))]
    rows = torch.cat([torch.arange(s0 + t * n // tp, s0 + (t + 1) * n // tp)
                      for s0, n in zip(starts, sections)])
    out = nn.Linear(w.shape[1], len(rows), bias=b is not None, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w.detach()[rows].clone(), requires_grad=False)
    if b is not None:
        out.bias = nn.Parameter(b.detach()[rows].clone(), requires_grad=False)
    return out


class _Copier:
    """A shallow copy of a module tree in which only the modules on the paths to replaced
    children are copied (their other children, parameters and buffers are shared)."""

    def __init__(self, model: nn.Module):
        self.copy = self._shallow(model)
        self.copies = {"": self.copy}

    @staticmethod
    def _shallow(m: nn.Module) -> nn.Module:
        c = copy.copy(m)
        c._modules = dict(m._modules)
        return c

    def module(self, path: str) -> nn.Module:
        if path not in self.copies:
            parent, _, leaf = path.rpartition(".")
            p = self.module(parent)
            self.copies[path] = p._modules[leaf] = self._shallow(p._modules[leaf])
        return self.copies[path]

    def replace(self, path: str, new: nn.Module) -> None:
        parent, _, leaf = path.rpartition(".")
        self.module(parent)._modules[leaf] = new
