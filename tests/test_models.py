"""End to end, in one process: real HF models compiled into CompNode and AttnNode programs
match the unmodified model (fp32: 1e-4 relative to the output's scale; padding excluded)."""

import pytest
import torch

import fxdisagg
from fxdisagg.testing import inputs, reference, rel_error, tiny_model

FP32_TOL = 1e-4
GRID = [(1, 1), (2, 2), (3, 2), (2, 3), (1, 4)]
LENGTHS = [1, 7, 64, 129]
CASES = [("llama", "sdpa"), ("gpt2", "sdpa"), ("gpt2", "eager"), ("bert", "sdpa"),
         ("mistral", "sdpa"), ("qwen2", "sdpa")]


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("alpha,beta", GRID)
@pytest.mark.parametrize("family,attn", CASES)
def test_inprocess_exact(models, family, attn, alpha, beta, batch):
    model = models.setdefault((family, attn), tiny_model(family, attn=attn))
    dm = fxdisagg.compile(model, alpha, beta, example_inputs=inputs(family, batch, 16),
                          launch="inprocess")
    for n in LENGTHS:
        kw = inputs(family, batch, n)
        out = dm(**kw)
        with torch.no_grad():
            assert type(out) is type(model(**kw)), "the HF output type is kept"
        err = rel_error(out[0], reference(model, kw), kw)
        assert err <= FP32_TOL, f"{family}/{attn} alpha={alpha} beta={beta} B={batch} N={n}: {err:.2e}"
        assert dm.traffic == dm.expected_traffic(n, batch), "the schedule predicts the traffic"
    assert len(dm._compiled) == 1, "one capture must serve every length"


def test_padding_left_and_right_llama():
    model = tiny_model("llama")
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess")
    for left in (True, False):
        kw = inputs("llama", 2, 23, padding=True)
        if not left:
            kw["attention_mask"] = kw["attention_mask"].flip(-1)
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL


def test_eager_mistral_with_padding_and_window():
    model = tiny_model("mistral", attn="eager")
    dm = fxdisagg.compile(model, 3, 2, launch="inprocess")
    kw = inputs("mistral", 2, 40, padding=True)
    assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL
    assert dm.counts["classify_masks.window"] == 2


def test_bf16_llama_within_twice_eager_bf16_error():
    fp32 = tiny_model("llama")
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    kw = inputs("llama", 2, 64)
    golden = reference(fp32, kw)
    eager_err = rel_error(reference(bf16, kw).float(), golden, kw)
    dm = fxdisagg.compile(bf16, 2, 2, launch="inprocess")
    ours_err = rel_error(dm(**kw)[0].float(), golden, kw)
    assert ours_err <= 2 * eager_err, (ours_err, eager_err)


def test_plan_follows_last_length():
    dm = fxdisagg.compile(tiny_model("llama"), 2, 2, example_inputs=inputs("llama", 1, 16),
                          launch="inprocess")
    assert dm.plan.n_tokens == 16
    dm(**inputs("llama", 1, 9))
    assert dm.plan.n_tokens == 9
    assert "CompNode 1" in str(dm.plan)
