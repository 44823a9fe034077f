"""fxdisagg.ir: typed argument views, node creation; SDPA variants parsed by schema name."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fxdisagg import ir
from fxdisagg.errors import PatternError
from fxdisagg.ir import OPS, args_of, make_node, set_args
from fxdisagg.passes.find_attention import find_attention, sdpa_args
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
CUDNN = aten._scaled_dot_product_cudnn_attention.default


def _placeholders(g: fx.Graph, *names: str) -> list[fx.Node]:
    return [g.placeholder(n) for n in names]


# -- args_of -------------------------------------------------------------------------------------
def test_args_of_fills_defaults_and_reads_kwargs():
    g = fx.Graph()
    q, k, v = _placeholders(g, "q", "k", "v")
    n = g.call_function(SDPA, (q, k, v), {"is_causal": True, "scale": 0.5})
    assert args_of(n) == {"query": q, "key": k, "value": v, "attn_mask": None, "dropout_p": 0.0,
                          "is_causal": True, "scale": 0.5, "enable_gqa": False}


def test_args_of_optional_without_default_is_none():
    g = fx.Graph()
    q, k, v = _placeholders(g, "q", "k", "v")
    n = g.call_function(OPS.attention, (q, k, v), {"scale": 0.25, "causal": False})
    a = args_of(n)
    assert a["mask"] is None and a["window"] is None and a["k_valid"] is None
    assert (a["q"], a["k"], a["v"], a["scale"], a["causal"]) == (q, k, v, 0.25, False)


def test_args_of_refuses_a_target_without_schema():
    g = fx.Graph()
    (x,) = _placeholders(g, "x")
    n = g.call_function(operator.getitem, (x, 0))
    with pytest.raises(TypeError, match="has no schema"):
        args_of(n)


# -- set_args ------------------------------------------------------------------------------------
def _attention(g: fx.Graph):
    q, k, v, mask, pos = _placeholders(g, "q", "k", "v", "mask", "pos")
    n = g.call_function(OPS.attention, (q, k, v, mask, None, None, None, None, None, 0.5, False, None))
    return n, q, k, v, mask, pos


def test_set_args_rewrites_by_name_in_schema_order():
    g = fx.Graph()
    n, q, k, v, mask, pos = _attention(g)
    set_args(n, mask=None, q_pos=pos, k_pos=pos, causal=True, window=4)
    assert n.args == (q, k, v, None, pos, pos, None, None, None, 0.5, True, 4, None, None, None)  # window_ahead, softcap, alibi
    assert n.kwargs == {}
    assert not mask.users and set(pos.users) == {n}


def test_set_args_writes_kwarg_only_arguments_as_kwargs():
    g = fx.Graph()
    q, k, v = _placeholders(g, "q", "k", "v")
    n = g.call_function(SDPA, (q, k, v))
    set_args(n, scale=0.125, is_causal=True)
    assert n.args == (q, k, v, None, 0.0, True)
    assert n.kwargs == {"scale": 0.125, "enable_gqa": False}
    assert args_of(n)["scale"] == 0.125


def test_set_args_rejects_unknown_names():
    g = fx.Graph()
    n, *_ = _attention(g)
    before = n.args
    with pytest.raises(TypeError, match=r"has no arguments \['attn_mask'\].*'mask'"):
        set_args(n, attn_mask=None)
    assert n.args == before


# -- make_node -----------------------------------------------------------------------------------
def test_make_node_sets_val_provenance_and_inherits_from_like():
    g = fx.Graph()
    (x,) = _placeholders(g, "x")
    like = g.call_function(aten.neg.default, (x,))
    like.meta.update({"stack_trace": "File model.py, line 3", ir.ROLE: "comp", ir.STAGE: 2})
    v = torch.empty(2, 3)
    n = make_node(g, aten.relu.default, (like,), val=v, created_by="test_pass", like=like,
                  layer=5, name="my_relu")
    assert n.target is aten.relu.default and n.args == (like,) and n.name == "my_relu"
    assert n.meta[ir.VAL] is v
    assert n.meta[ir.CREATED_BY] == "test_pass"
    assert n.meta[ir.LAYER] == 5
    assert n.meta[ir.ROLE] == "comp" and n.meta[ir.STAGE] == 2
    assert n.meta["stack_trace"] == "File model.py, line 3"


def test_make_node_without_like_has_only_what_it_was_given():
    g = fx.Graph()
    (x,) = _placeholders(g, "x")
    n = make_node(g, aten.relu.default, (x,), val=None, created_by="p", stage=1)
    assert n.meta == {ir.VAL: None, ir.CREATED_BY: "p", ir.STAGE: 1}


# -- SDPA variants by schema name (find_attention) -----------------------------------------------
def _variant(op, *args, **kwargs):
    g = fx.Graph()
    q, k, v, m = _placeholders(g, "q", "k", "v", "m")
    names = {"q": q, "k": k, "v": v, "m": m}
    node = g.call_function(op, tuple(names.get(a, a) for a in args),
                           {key: names.get(a, a) for key, a in kwargs.items()})
    return node, names


@pytest.mark.parametrize("op, args, kwargs, mask", [
    (SDPA, ("q", "k", "v", "m", 0.0, True), {"scale": 0.5}, "m"),
    (aten._scaled_dot_product_flash_attention_for_cpu.default, ("q", "k", "v", 0.0, True),
     {"attn_mask": "m", "scale": 0.5}, "m"),
    (aten._scaled_dot_product_flash_attention.default, ("q", "k", "v", 0.0, True, False),
     {"scale": 0.5}, None),
    (aten._scaled_dot_product_efficient_attention.default, ("q", "k", "v", "m", False, 0.0, True),
     {"scale": 0.5}, "m"),
    (CUDNN, ("q", "k", "v", "m", False, 0.0, True, False), {"scale": 0.5}, "m"),
])
def test_sdpa_args_every_variant(op, args, kwargs, mask):
    node, n = _variant(op, *args, **kwargs)
    a = sdpa_args(node)
    assert (a["q"], a["k"], a["v"]) == (n["q"], n["k"], n["v"])
    assert a["mask"] is (n[mask] if mask else None)
    assert (a["dropout_p"], a["causal"], a["scale"]) == (0.0, True, 0.5)


def _cudnn_graph(dropout_p: float):
    """q, k, v [1, 4, N, 16] and an additive bias [1, 1, N, N] with N symbolic, into the
    cuDNN fused SDPA (compute_log_sumexp=True, so a positional misread would also be causal)."""
    env = ShapeEnv()
    n = env.create_symintnode(env.create_symbol(7, ConstantSource("N")), hint=7)
    with FakeTensorMode(shape_env=env):
        fq, fk, fv = (torch.empty(1, 4, n, 16) for _ in range(3))
        fbias = torch.zeros(1, 1, n, n)
    g = fx.Graph()
    q, k, v, bias = _placeholders(g, "q", "k", "v", "bias")
    for node, fake in zip((q, k, v, bias), (fq, fk, fv, fbias)):
        node.meta["val"] = fake
    extra = (dropout_p,) if dropout_p else ()
    fused = g.call_function(CUDNN, (q, k, v, bias, True, *extra))
    out = g.call_function(operator.getitem, (fused, 0))
    out.meta["val"] = fq.new_empty(fq.shape)
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g), bias, n.node.expr


def test_find_attention_reads_cudnn_attn_bias_as_the_mask():
    gm, bias, seq = _cudnn_graph(dropout_p=0.0)
    ctx = PassContext(seq=seq)
    find_attention(gm, ctx)
    (att,) = gm.graph.find_nodes(op="call_function", target=OPS.attention)
    a = args_of(att)
    assert a["mask"] is bias
    assert a["causal"] is False
    assert a["scale"] == pytest.approx(0.25)  # 1 / sqrt(16)
    assert att.meta[ir.CREATED_BY] == "find_attention"
    assert ctx.counts == {"find_attention.fused_sdpa": 1}
    assert not gm.graph.find_nodes(op="call_function", target=CUDNN)


def test_find_attention_refuses_cudnn_dropout():
    gm, _, seq = _cudnn_graph(dropout_p=0.1)
    ctx = PassContext(seq=seq)
    with pytest.raises(PatternError, match="dropout_p=0.1"):
        find_attention(gm, ctx)
    assert ctx.counts == {}
