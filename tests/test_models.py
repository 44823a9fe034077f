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


def _modernbert(local_attention: int = 8):
    """An encoder alternating global and two-sided local attention (|q - k| <= 4)."""
    import transformers as tf
    torch.manual_seed(0)
    config = tf.ModernBertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 global_attn_every_n_layers=2, local_attention=local_attention,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 cls_token_id=1, sep_token_id=2)
    return tf.ModernBertModel._from_config(config, attn_implementation="sdpa").eval()


def _exact_at(model, family: str, lengths, kernel: str):
    """The model at (2, 2) on ``kernel``, exact at each length with left padding."""
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess", kernel=kernel)
    for n in lengths:
        kw = inputs(family, 2, n, padding=True)
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL, n
    return dm


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_two_sided_local_window_encoder(kernel):
    dm = _exact_at(_modernbert(), "bert", (7, 23), kernel)
    assert dm.counts["classify_masks.two-sided window"] == 1
    assert "two-sided window |q - k| < 5" in dm.explain()


def test_a_far_mask_is_refused_not_taken_for_a_window():
    """|q - k| >= w (only distant keys) is not a window: refused, never replaced."""
    from transformers import masking_utils
    model = _modernbert()
    real = masking_utils.sliding_window_bidirectional_overlay

    def far(sliding_window):
        def inner(batch_idx, head_idx, q_idx, kv_idx):
            return abs(q_idx - kv_idx) >= sliding_window
        return inner

    masking_utils.sliding_window_bidirectional_overlay = far
    try:
        with pytest.raises(fxdisagg.UnsupportedMaskError, match="layer 1"):
            fxdisagg.compile(model, 2, 2, example_inputs=inputs("bert", 2, 12, padding=True),
                             launch="inprocess")
    finally:
        masking_utils.sliding_window_bidirectional_overlay = real


def _gemma2(softcap: float):
    import transformers as tf
    torch.manual_seed(0)
    config = tf.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, sliding_window=8, attn_logit_softcapping=softcap)
    return tf.Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_logit_soft_capping(kernel):
    """Gemma 2's tanh(s / c) * c between the MatMul and the SoftMax, with a cap small
    enough to bend most scores: exact on every backend, and visible in explain()."""
    dm = _exact_at(_gemma2(softcap=0.5), "llama", (6, 21), kernel)
    assert "logit soft-capping 0.5" in dm.explain()


def test_a_tanh_that_is_not_soft_capping_is_refused(monkeypatch):
    """tanh(s / c1) * c2 with c1 != c2 is not the feature: refused, never approximated."""
    import transformers.models.gemma2.modeling_gemma2 as g2

    def skewed(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               softcap=None, **kwargs):
        scores = torch.matmul(query, g2.repeat_kv(key, module.num_key_value_groups).transpose(2, 3))
        scores = torch.tanh(scores * scaling / softcap) * (2 * softcap)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, g2.repeat_kv(value, module.num_key_value_groups))
        return out.transpose(1, 2).contiguous(), probs

    monkeypatch.setattr(g2, "eager_attention_forward", skewed)
    with pytest.raises(fxdisagg.PatternError, match="not as soft-capping"):
        fxdisagg.compile(_gemma2(softcap=0.5), 2, 2, example_inputs=inputs("llama", 2, 9),
                         launch="inprocess")


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_alibi(kernel):
    """Bloom: heads folded into the batch dim, ALiBi fused as baddbmm(alibi, q, k^T) with
    positions (cumsum(mask) - 1) * mask, left padding: exact on every backend."""
    dm = _exact_at(tiny_model("bloom"), "bloom", (6, 21), kernel)
    assert dm.counts["classify_masks.alibi"] == 2
    assert "ALiBi (slopes 0.25 .. 0.00391)" in dm.explain()


def test_alibi_needs_each_row_s_tokens_in_one_run():
    """Bloom's positions count a row's ones: a hole in the mask would shift the keys after
    it, which token-index ALiBi does not. Refused before any worker runs."""
    model = tiny_model("bloom")
    kw = inputs("bloom", 2, 12, padding=True)
    dm = fxdisagg.compile(model, 2, 2, launch="inprocess", example_inputs=kw)
    kw["attention_mask"][0, 5] = 0
    with pytest.raises(fxdisagg.InputError, match="row 0 has holes"):
        dm(**kw)
    assert dm.runtime is None
    kw["attention_mask"][0, :6] = 0       # left padding again: one run
    assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL


def test_a_bias_that_is_not_alibi_is_refused(monkeypatch):
    """slope * p^2 is a per-(head, key) term but not ALiBi: refused, never approximated."""
    import transformers.models.bloom.modeling_bloom as bloom

    def squared(attention_mask, num_heads, dtype):
        b, n = attention_mask.shape
        slopes = bloom._get_alibi_slopes(num_heads, attention_mask.device)
        p = ((attention_mask.cumsum(-1) - 1) * attention_mask)[:, None, :]
        return (slopes[..., None] * p * p).reshape(b * num_heads, 1, n).to(dtype)

    monkeypatch.setattr(bloom, "build_alibi_tensor", squared)
    with pytest.raises(fxdisagg.UnsupportedMaskError, match="layer 0.*ALiBi positions"):
        fxdisagg.compile(tiny_model("bloom"), 2, 2, example_inputs=inputs("bloom", 2, 9, padding=True),
                         launch="inprocess")
