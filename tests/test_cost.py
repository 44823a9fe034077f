"""The cost model against hand-computed cases, the planner's pick, and alpha="auto".

A toy machine makes every case compute- or link-bound with round numbers: 1,000 FLOP/s,
HBM so fast that bytes never bind, NVLink 100 B/s. The toy model: hidden 8, 2 query heads
and 1 kv head of dim 4, MLP 16 wide: 2*8*8 + 2*8*4 + 3*8*16 = 576 linear weights a layer.
"""

import pytest

import fxdisagg
from fxdisagg import cost
from fxdisagg.errors import ConfigError
from fxdisagg.testing import inputs, tiny_model

TOY = cost.Hardware("toy", flops=1e3, hbm=1e12, nvlink=1e2, network=1e1, per_node=8, memory=1e9)
SHAPE = cost.ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16)


def test_shape_counts_the_weights_of_a_layer():
    assert SHAPE.linear_params == 576
    assert cost.ModelShape.of(tiny_model("llama").config) == cost.ModelShape(
        hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128)
    assert cost.ModelShape.of(tiny_model("gpt2").config).kv_heads == 4


def test_disaggregated_layer_by_hand():
    """N=8 at (1, 2): the CompNode's 8 tokens, R-shards [0,2,4,6] and [1,3,5,7] whose tiles
    hold 10, 6, 10, 10 causal pairs; links: the CompNode sends 8 rows x 2 copies x (2 + 2)
    heads x 4 x 2 B = 512 B and gets 8 x 2 x 2 x (8 + 4) = 384 B back."""
    c = cost.disaggregated(SHAPE, TOY, 8, 1, 2)
    assert c.compute == pytest.approx(2 * 8 * 576 / 1e3)           # 9.216 s
    assert c.attention == pytest.approx(4 * 10 * 2 * 4 / 1e3)       # 0.32 s
    assert c.comm == pytest.approx((512 + 384) / 1e2)                # 8.96 s
    assert c.overlapped == pytest.approx(9.216) and c.serial == pytest.approx(9.216 + 0.32 + 8.96)


def test_alternatives_by_hand():
    ring = cost.ring_zigzag(SHAPE, TOY, 8, 4)       # 2 tokens each, 36/4 pairs, 3 kv blocks in
    assert (ring.compute, ring.attention) == (pytest.approx(2.304), pytest.approx(0.288))
    assert ring.comm == pytest.approx(3 * 2 * 2 * 4 * 2 / 1e2)
    assert ring.overlapped == pytest.approx(2.304 + 0.96)
    one = cost.one_device(SHAPE, TOY, 8)
    assert one.overlapped == pytest.approx(2 * 8 * 576 / 1e3 + 4 * 36 * 2 * 4 / 1e3)
    assert "divisible" in cost.ulysses(SHAPE, TOY, 8, 2).note    # 1 kv head over 2 devices


def test_planner_picks_the_grid_of_least_time():
    """5 devices: (4, 1) costs max(2.304, 1.152, 4.48) s, (1, 2) 9.216 s."""
    assert cost.grids(5) == [(4, 1), (1, 2)]
    assert cost.disaggregated(SHAPE, TOY, 8, 4, 1).overlapped == pytest.approx(4.48)
    assert cost.pick_grid(SHAPE, TOY, 8, 5) == (4, 1)
    text = cost.table(SHAPE, TOY, 8, 5)
    assert "fxdisagg (4, 1)" in text.splitlines()[-2] and text.splitlines()[-2].endswith("<- picked")


def test_auto_grid_in_compile_and_its_errors():
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, "auto", "auto", devices=5, hw="h100", launch="inprocess")
    shape = cost.ModelShape.of(model.config)
    assert (dm.alpha, dm.beta) == cost.pick_grid(shape, cost.HARDWARE["h100"],
                                                 model.config.max_position_embeddings, 5)
    with pytest.raises(ConfigError, match="needs devices="):
        fxdisagg.compile(model, "auto", "auto", example_inputs=inputs("llama", 1, 8))
    with pytest.raises(ConfigError, match="hw="):
        fxdisagg.compile(model, "auto", "auto", devices=5, hw="tpu")
