"""The Plan on its own: placement, balance, exchange index sets."""

import pytest
import torch

from fxdisagg.errors import ConfigError
from fxdisagg.plan import Plan


@pytest.mark.parametrize("strategy", ["r", "contiguous", "zigzag"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 129])
@pytest.mark.parametrize("alpha,beta", [(1, 1), (2, 2), (3, 2), (2, 3), (1, 4)])
def test_every_token_in_exactly_one_compnode_and_one_shard(strategy, n, alpha, beta):
    plan = Plan.build(n, alpha, beta, strategy)
    for sets in (plan.comp_tokens, plan.shard_tokens):
        everything = torch.cat(sets)
        assert sorted(everything.tolist()) == list(range(n))
        assert all(bool((s[1:] > s[:-1]).all()) for s in sets if len(s) > 1)  # sorted
    sizes = [len(s) for s in plan.shard_tokens]
    if strategy == "r":
        assert max(sizes) - min(sizes) <= 1


def test_seed_figure_index_sets():
    """The seed figure's sets, 1-based there: [1,2,8,9] on a CompNode, [1,3,8,10] on a shard
    are exactly 'chunks of beta dealt round-robin' and 'stripes of stride beta'."""
    plan = Plan.build(12, 3, 2)
    assert plan.comp_tokens[0].tolist()[:2] == [0, 1] and plan.comp_tokens[0].tolist()[2:4] == [6, 7]
    assert plan.shard_tokens[0].tolist()[:4] == [0, 2, 4, 6]


def test_r_sharding_balances_causal_work():
    r = Plan.build(4096, 2, 4).balance()
    contiguous = Plan.build(4096, 2, 4, "contiguous").balance()
    assert r <= 1.01
    assert contiguous > 1.9  # near 2 - 1/beta: printed beside R in Plan.summary()


def test_exchange_index_sets_roundtrip():
    plan = Plan.build(29, 3, 2)
    for i in range(plan.beta):
        arrived = torch.cat([plan.comp_tokens[c][plan.local_rows(c, i)] for c in range(plan.alpha)])
        assert torch.equal(arrived[plan.arrival_order(i)], plan.shard_tokens[i])
        for c in range(plan.alpha):
            assert torch.equal(plan.shard_tokens[i][plan.reply_rows(i, c)],
                               plan.comp_tokens[c][plan.local_rows(c, i)])


def test_empty_shards_when_n_below_beta():
    plan = Plan.build(2, 2, 4)
    assert [len(s) for s in plan.shard_tokens] == [1, 1, 0, 0]
    assert len(plan.comp_tokens[1]) == 0
    assert plan.causal_work().sum() == 3


def test_ring_comparison_is_reported_beside_the_schedule_bytes():
    plan = Plan.build(256, 2, 2)
    ring = dict(batch=1, kv_heads=4, head_dim=32, elem_bytes=4)
    assert plan.ring_layer_bytes(**ring) == 5 * 256 * 2 * 4 * 32 * 4
    text = plan.summary(traffic={"dispatch": 1234567, "return": 89}, ring=ring)
    assert "dispatch 1,234,567  return 89" in text and "ring attention on 6 devices" in text


def test_plans_compare_and_hash_by_what_they_are_built_from():
    a, b = Plan.build(29, 3, 2), Plan.build(29, 3, 2)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Plan.build(29, 3, 2, "zigzag") and a != Plan.build(30, 3, 2)


@pytest.mark.parametrize("bad", [dict(alpha=0), dict(beta=-1), dict(alpha=1.5), dict(strategy="x")])
def test_invalid_plan_arguments(bad):
    args = dict(n_tokens=8, alpha=1, beta=1, strategy="r") | bad
    with pytest.raises(ConfigError):
        Plan.build(**args)


def test_cli_prints_and_draws_the_plan(tmp_path, capsys):
    from fxdisagg.cli import main
    assert main(["plan", "--tokens", "12", "--alpha", "2", "--beta", "2", "--dump-dir", str(tmp_path)]) == 0
    assert "CompNode 0: 6 tokens [0, 1, 4, 5, 8, 9]" in capsys.readouterr().out
    assert "AttnNode (1, 0)" in (tmp_path / "plan.dot").read_text()
