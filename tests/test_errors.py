"""A negative test for every error a user can meet, and the rewrite counts of the passes,
including where a rewrite must not fire."""

import pytest
import torch

import fxdisagg
from fxdisagg.capture import capture
from fxdisagg.errors import (ConfigError, InferenceOnlyError, InputError, PatternError,
                             TokenLocalityError, UnsupportedMaskError, WorkerError)
from fxdisagg.passes.classify_masks import classify_masks
from fxdisagg.passes.find_attention import find_attention
from fxdisagg.passes.fold_repeat_kv import fold_repeat_kv
from fxdisagg.passes.partition import partition
from fxdisagg.passes.split_attention import split_attention
from fxdisagg.config import Config
from fxdisagg.pipeline import PassContext, run_passes
from fxdisagg.testing import inputs, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("kw", [dict(alpha=0), dict(beta=0), dict(alpha="2"), dict(tp=0),
                                dict(tp="2"), dict(sharding="diagonal"), dict(launch="ssh"),
                                dict(kernel="cuda"), dict(bogus=1)])
def test_invalid_options(llama, kw):
    args = dict(alpha=1, beta=1, launch="inprocess") | kw
    with pytest.raises(ConfigError):
        fxdisagg.compile(llama, **args)


def test_training_mode_refused():
    model = tiny_model("llama").train()
    with pytest.raises(InferenceOnlyError, match="eval"):
        fxdisagg.compile(model, 1, 1, launch="inprocess")


def test_requires_grad_input_refused(llama):
    dm = fxdisagg.compile(llama, 1, 1, launch="inprocess")
    emb = torch.randn(1, 4, 64, requires_grad=True)
    with pytest.raises(InferenceOnlyError):
        dm(inputs_embeds=emb)


def test_inputs_outside_the_capture(llama):
    dm = fxdisagg.compile(llama, 2, 2, example_inputs=inputs("llama", 1, 8), launch="inprocess",
                          max_len=32)
    with pytest.raises(InputError, match="outside the captured range"):
        dm(**inputs("llama", 1, 33))
    with pytest.raises(InputError, match="not token-indexed inputs"):
        dm(**inputs("llama", 1, 8), labels=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(InputError, match="differs from the captured"):
        dm(**inputs("llama", 1, 8), use_cache=True)


def _graph(model, kw):
    cap = capture(model, kw, max_len=64)
    return cap, PassContext(seq=cap.seq, config=Config(beta=2))


def test_counts_and_no_dense_mask_left():
    model = tiny_model("mistral", attn="eager")
    cap, ctx = _graph(model, inputs("mistral", 2, 12, padding=True))
    gm = run_passes(cap.gm, [find_attention, fold_repeat_kv, classify_masks, split_attention], ctx)
    assert ctx.counts["find_attention.eager"] == 2
    assert ctx.counts["fold_repeat_kv.folded"] == 4
    assert ctx.counts["classify_masks.window"] == 2 and ctx.counts["classify_masks.padding"] == 2
    assert ctx.counts["split_attention.partials"] == 4
    assert "softmax" not in gm.code and "scaled_dot_product" not in gm.code


def test_rewrites_that_must_not_fire():
    """BERT is MHA with a padding-only mask: no GQA fold, no causal, no window."""
    cap, ctx = _graph(tiny_model("bert"), inputs("bert", 2, 12))
    run_passes(cap.gm, [find_attention, fold_repeat_kv, classify_masks], ctx)
    assert ctx.counts.get("fold_repeat_kv.folded", 0) == 0
    assert ctx.counts.get("classify_masks.causal", 0) == 0
    assert ctx.counts.get("classify_masks.window", 0) == 0
    assert ctx.counts["classify_masks.padding"] == 2


class _WeirdMaskAttention(torch.nn.Module):
    """Attention with a query-dependent (not per-key) mask: must be refused, not guessed."""

    def forward(self, input_ids):
        x = input_ids.float()[..., None].expand(-1, -1, 8)[:, None]  # [B, 1, N, 8]
        n = input_ids.shape[1]
        pos = torch.arange(n)
        mask = (pos[:, None] % 2 == 0) | (pos[None, :] <= pos[:, None])  # or: not a conjunction
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask)


class _CumsumOverTokens(torch.nn.Module):
    """A scan over tokens of an activation before attention: not token-local. (A scan of
    the integer inputs alone would be a replicated prologue, which is allowed.)"""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(1, 8)

    def forward(self, input_ids):
        x = self.proj(input_ids.float()[..., None]).cumsum(1)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


class _ScoresScaledByData(torch.nn.Module):
    def forward(self, input_ids):
        x = input_ids.float()[..., None].expand(-1, -1, 8)[:, None]
        s = (x @ x.transpose(-1, -2)) * x.mean()
        return torch.softmax(s, dim=-1) @ x


def _run_passes(module, passes):
    cap = capture(module.eval(), {"input_ids": torch.randint(0, 9, (1, 8))}, max_len=64)
    return run_passes(cap.gm, passes, PassContext(seq=cap.seq, config=Config(beta=2)))


def test_unclassifiable_mask_refused_naming_the_layer():
    with pytest.raises(UnsupportedMaskError, match="layer 0"):
        _run_passes(_WeirdMaskAttention(), [find_attention, classify_masks])


def test_scan_over_tokens_on_a_compnode_refused():
    with pytest.raises(TokenLocalityError, match="cumsum"):
        _run_passes(_CumsumOverTokens(), [find_attention, classify_masks, split_attention, partition])


def test_attention_like_pattern_that_does_not_match_is_an_error():
    with pytest.raises(PatternError, match="non-constant"):
        _run_passes(_ScoresScaledByData(), [find_attention])


def test_worker_error_names_role_and_layer(llama, monkeypatch):
    dm = fxdisagg.compile(llama, 2, 2, launch="inprocess")
    import fxdisagg.kernels.api as kapi

    def boom(*a, **k):
        raise RuntimeError("injected")
    monkeypatch.setattr(kapi, "partial_attention", boom)
    with pytest.raises(WorkerError, match=r"AttnNode .* layer 0.*injected"):
        dm(**inputs("llama", 1, 8))


class _GlobalMaxNormalised(torch.nn.Module):
    """x / max|x| over every token: a reduction with no dim is over the token dim too."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(1, 8)

    def forward(self, input_ids):
        x = self.proj(input_ids.float()[..., None])
        x = (x / x.abs().amax())[:, None]
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


def test_reduction_over_all_dims_is_not_token_local():
    with pytest.raises(TokenLocalityError, match="amax"):
        _run_passes(_GlobalMaxNormalised(), [find_attention, classify_masks, split_attention, partition])


def test_fp16_eager_mask_is_classified():
    """HF fills fp16 additive masks with finfo(fp16).min = -65504, not -3.4e38."""
    cap, ctx = _graph(tiny_model("llama", attn="eager", dtype=torch.float16), inputs("llama", 1, 12))
    run_passes(cap.gm, [find_attention, fold_repeat_kv, classify_masks], ctx)
    assert ctx.counts["classify_masks.causal"] == 2
