"""The older HF spelling of a causal mask: a constant ``[1, 1, max, max]`` bool buffer read at
``[:N, :N]`` and applied with ``where(mask, scores, finfo.min)`` (GPT-Neo). A lower
triangle is causal, a band of the last W keys a sliding window; any other buffer is
refused, never taken for causal."""

import pytest
import torch
from torch import nn

import fxdisagg
from fxdisagg.testing import rel_error, reference

FP32_TOL = 1e-4
MAX = 64


class BufferMaskedAttention(nn.Module):
    """One attention layer over embeddings, masked by ``bias[:, :, :N, :N]``."""

    def __init__(self, bias: torch.Tensor, vocab: int = 32, dim: int = 16, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.emb = heads, nn.Embedding(vocab, dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, vocab)
        self.register_buffer("bias", bias.view(1, 1, MAX, MAX), persistent=False)

    def forward(self, input_ids):
        b, n = input_ids.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.emb(input_ids)).chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        fill = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype)
        scores = torch.where(self.bias[:, :, :n, :n], scores, fill)
        probs = scores.softmax(-1)
        return (self.out((probs @ v).transpose(1, 2).reshape(b, n, -1)),)


def _tril(window=None):
    m = torch.ones(MAX, MAX, dtype=torch.bool).tril()
    return m if window is None else m & ~m.tril(-window)


def _compile(model, n=20):
    kw = {"input_ids": torch.randint(0, 32, (2, n), generator=torch.Generator().manual_seed(1))}
    dm = fxdisagg.compile(model, 2, 2, example_inputs=kw, launch="inprocess", max_len=MAX)
    return dm, kw


@pytest.mark.parametrize("window", [None, 5])
def test_a_lower_triangle_is_causal_and_a_band_a_window(window):
    model = BufferMaskedAttention(_tril(window)).eval()
    dm, kw = _compile(model)
    assert dm.counts["classify_masks.causal"] == 1
    assert dm.counts.get("classify_masks.window", 0) == (window is not None)
    assert ("sliding window 5" in dm.explain()) == (window is not None)
    for n in (1, 7, 20, MAX - 1):    # reading the whole buffer (N = MAX) is guarded: capture's bound
        kw = {"input_ids": torch.randint(0, 32, (2, n), generator=torch.Generator().manual_seed(n))}
        assert rel_error(dm(**kw)[0], reference(model, kw), kw) <= FP32_TOL, n


@pytest.mark.parametrize("buffer", [
    torch.ones(MAX, MAX, dtype=torch.bool).triu(),                  # keys after the query
    _tril() & (torch.arange(MAX) % 2 == 0),                          # every other key
])
def test_any_other_buffer_is_refused(buffer):
    with pytest.raises(fxdisagg.UnsupportedMaskError, match="could not be classified"):
        _compile(BufferMaskedAttention(buffer).eval())
