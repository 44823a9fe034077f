"""eliminate_common_subexpressions: what it merges, what it must not, and that the merged
graph computes what the model does."""

import operator

import pytest
import torch
import torch.fx as fx

from fxdisagg.api import PASSES
from fxdisagg.capture import capture
from fxdisagg.config import Config
from fxdisagg.ir import OPS
from fxdisagg.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from fxdisagg.pipeline import PassContext, run_passes
from fxdisagg.testing import inputs, reference, rel_error, tiny_model

aten = torch.ops.aten


def _cse(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    ctx = PassContext(seq=None)
    gm = eliminate_common_subexpressions(gm, ctx)
    gm.recompile()
    return gm, ctx.counts.get("eliminate_common_subexpressions.merged", 0)


def _graph(build) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return fx.GraphModule(torch.nn.Module(), g)


def test_equal_pure_ops_merge_and_their_users_follow():
    def build(g, x):
        a = g.call_function(aten.unsqueeze.default, (x, 1))
        b = g.call_function(aten.unsqueeze.default, (x, 1))
        return (g.call_function(aten.add.Tensor, (a, b)),
                g.call_function(aten.add.Tensor, (b, a)))    # (a + a) and (a + a) after
    gm, merged = _cse(_graph(build))
    assert merged == 2
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == \
        [aten.unsqueeze.default, aten.add.Tensor]


@pytest.mark.parametrize("second", [1.0, True], ids=["float", "bool"])
def test_scalars_of_another_type_are_other_arguments(second):
    """1 == 1.0 == True in Python; mul(x, 1) and mul(x, 1.0) differ in result dtype."""
    def build(g, x):
        return (g.call_function(aten.mul.Tensor, (x, 1)), g.call_function(aten.mul.Tensor, (x, second)))
    gm, merged = _cse(_graph(build))
    assert merged == 0
    x = torch.arange(3)
    a, b = gm(x)
    assert a.dtype == torch.int64 and b.dtype == torch.mul(x, second).dtype


def test_random_mutating_and_fxdisagg_ops_are_never_merged():
    def build(g, x):
        return (g.call_function(aten.rand_like.default, (x,)), g.call_function(aten.rand_like.default, (x,)),
                g.call_function(aten.add_.Tensor, (x, 1)), g.call_function(aten.add_.Tensor, (x, 1)),
                g.call_function(OPS.take_shard, (x, 0, 0, 2, "r")),
                g.call_function(OPS.take_shard, (x, 0, 0, 2, "r")))
    gm, merged = _cse(_graph(build))
    assert merged == 0
    a, b, *_ = gm(torch.zeros(4))
    assert not torch.equal(a, b)


def test_getitem_of_one_value_merges():
    def build(g, x):
        parts = g.call_function(aten.split.Tensor, (x, 2))
        return (g.call_function(operator.getitem, (parts, 0)), g.call_function(operator.getitem, (parts, 0)),
                g.call_function(operator.getitem, (parts, 1)))
    gm, merged = _cse(_graph(build))
    assert merged == 1


def test_a_llama_computes_its_rotary_views_once_and_stays_exact():
    """HF's Llama unsqueezes cos and sin in every layer: 2 per layer after the first merge
    (and the pipeline's graph still matches the unmodified model)."""
    layers = 4
    model = tiny_model("llama", layers=layers)
    kw = inputs("llama", 1, 12)
    cap = capture(model, kw, max_len=64)
    ctx = PassContext(seq=cap.seq, config=Config(alpha=2, beta=2))
    gm = run_passes(cap.gm, PASSES, ctx)
    assert ctx.counts["eliminate_common_subexpressions.merged"] >= 2 * (layers - 1)
    unsqueezes = [n for n in gm.graph.nodes if n.target is aten.unsqueeze.default]
    assert len({(n.args[0], n.args[1]) for n in unsqueezes}) == len(unsqueezes)
    with torch.no_grad():
        out = gm(kw["input_ids"])[0]
    assert rel_error(out, reference(model, kw), kw) < 1e-5
