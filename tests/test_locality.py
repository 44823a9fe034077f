"""Token locality by DTensor's sharding rules (`fxdisagg.locality`): ops `partition` has no
dim rule for are accepted when they keep tokens apart and refused when they mix them.
Each case edits a real Llama's first MLP, so the op sits between two attentions."""

import pytest
import torch

import fxdisagg
from fxdisagg.testing import inputs, reference, rel_error, tiny_model


def _with_mlp_extra(extra):
    model = tiny_model("llama", layers=2)
    mlp = model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda x: forward(x) + extra(x)
    return model


TOKEN_LOCAL = {
    # a router: top-2 of a per-token score over the hidden dim, gathered back per token
    "topk_gather": lambda x: x.gather(-1, x.topk(2, dim=-1).indices).sum(-1, keepdim=True),
    # a sort within each token's features
    "sort_features": lambda x: x.sort(dim=-1).values * 0.5,
    # an index_add into the same tokens
    "index_add": lambda x: torch.zeros_like(x).index_add(-1, torch.arange(4), x[..., :4]),
    # repeat_interleave over the feature dim, folded back
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=-1)[..., ::2],
}

TOKEN_MIXING = {
    "cumsum_tokens": lambda x: x.cumsum(1),
    "sort_tokens": lambda x: x.sort(dim=1).values,
    "flip_tokens": lambda x: x.flip(1),
    "roll_tokens": lambda x: x.roll(1, dims=1),
}


@pytest.mark.parametrize("name", sorted(TOKEN_LOCAL))
def test_token_local_ops_run_on_comp_nodes_exactly(name):
    model = _with_mlp_extra(TOKEN_LOCAL[name])
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess")
    for n in (9, 16):
        kw = inputs("llama", 2, n, padding=True)
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= 1e-4, (name, n)


@pytest.mark.parametrize("name", sorted(TOKEN_MIXING))
def test_token_mixing_ops_are_refused_naming_the_node(name):
    model = _with_mlp_extra(TOKEN_MIXING[name])
    with pytest.raises(fxdisagg.TokenLocalityError, match=r"partition: node '\w+'.*runs on a "
                                                          r"CompNode but"):
        fxdisagg.compile(model, 2, 2, example_inputs=inputs("llama", 2, 9), launch="inprocess")


def _sort_and_unsort_tokens(x):
    """Token-local overall (a permutation of the tokens and its inverse) but no rule can
    prove it: the sort reads every token."""
    order = x[..., :1].argsort(dim=1).expand_as(x)
    return torch.zeros_like(x).scatter(1, order, x.gather(1, order)) * 0.5


def test_a_module_declared_token_local_runs_on_comp_nodes():
    model = _with_mlp_extra(_sort_and_unsort_tokens)
    kw = inputs("llama", 2, 11, padding=True)
    with pytest.raises(fxdisagg.TokenLocalityError):
        fxdisagg.compile(model, 2, 2, example_inputs=kw, launch="inprocess")
    dm = fxdisagg.compile(model, 2, 2, example_inputs=kw, launch="inprocess", verify=True,
                          token_local=["model.layers.*.mlp"])
    assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= 1e-4
    assert dm.counts["partition.declared_token_local"] > 0


def test_a_wrong_declaration_is_caught_by_verify_at_its_layer():
    model = _with_mlp_extra(TOKEN_MIXING["flip_tokens"])
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess", verify=True, token_local="LlamaMLP")
    with pytest.raises(fxdisagg.VerifyError, match="after layer 0"):
        dm(**inputs("llama", 2, 11, padding=True))
