"""Property: R-sharded partial attention + expsum-merge == attention over all keys.

For random sequence lengths, shard counts and mask features, the keys are split into beta
R-shards (token t -> shard t % beta), the torch backend computes one partial per shard,
expsum_merge combines them, and the result must equal the fp64 reference over all keys
(same visibility rule, `reference.visibility`). Examples are tiny so that the file runs in
well under a minute on one core.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdisagg.kernels import expsum_merge, partial_attention

TOL = 2e-5


@st.composite
def problems(draw):
    """A random attention problem with per-token features, as plain tensors."""
    n = draw(st.integers(0, 20))
    b = draw(st.integers(1, 2))
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    feats = dict(causal=draw(st.booleans()), window=draw(st.none() | st.integers(1, 8)))
    plain_causal = draw(st.booleans())  # half the examples: the R-sharding triangle paths
    if plain_causal:
        feats = dict(causal=True, window=None)
    per_batch = draw(st.booleans())
    rows = b if per_batch else 1
    pos = torch.arange(n).repeat(rows, 1)  # [rows, N]
    if draw(st.booleans()):  # explicit, non-contiguous positions
        pos = torch.cumsum(torch.randint(1, 3, (rows, n), generator=g), dim=1)
    if not plain_causal and draw(st.booleans()):  # packed documents
        doc = torch.cumsum((torch.rand(rows, n, generator=g) < 0.25).long(), dim=1)
        feats.update(q_doc=doc, k_doc=doc)
    padding = "none" if plain_causal else draw(st.sampled_from(["none", "left", "right", "random"]))
    if padding != "none":
        r = torch.rand(rows, n, generator=g)
        if padding == "random":
            valid = r > 0.3
        else:
            cut = (r[:, :1] * (n + 1)).long()  # [rows, 1] pad length per batch row
            idx = torch.arange(n)
            valid = idx >= cut if padding == "left" else idx < n - cut
        feats["k_valid"] = valid
    if not per_batch:
        pos = pos[0]
        feats = {key: (val[0] if torch.is_tensor(val) else val) for key, val in feats.items()}
    q = torch.randn(b, hq, n, d, generator=g)  # [B, Hq, N, D]
    k = torch.randn(b, hkv, n, d, generator=g)  # [B, Hkv, N, D]
    v = torch.randn(b, hkv, n, d, generator=g)
    return q, k, v, pos, feats


def shard_keys(k, v, pos, feats, beta, j):
    """Key shard j of beta (R-sharding): tokens j, j+beta, ..."""
    idx = torch.arange(j, max(j, k.shape[2]), beta)
    kf = {"causal": feats["causal"], "window": feats["window"]}
    if "q_doc" in feats:
        kf.update(q_doc=feats["q_doc"], k_doc=feats["k_doc"][..., idx])
    if "k_valid" in feats:
        kf["k_valid"] = feats["k_valid"][..., idx]
    return k[:, :, idx], v[:, :, idx], pos[..., idx], kf


def check_merge_equals_full(q, k, v, pos, feats, beta, query_idx):
    """Partials over beta key shards, merged, against the reference over all keys."""
    qq = q[:, :, query_idx]
    q_pos = pos[..., query_idx]
    qf = dict(feats)
    if "q_doc" in feats:
        qf["q_doc"] = feats["q_doc"][..., query_idx]
    parts = []
    for j in range(beta):
        kj, vj, k_pos, kf = shard_keys(k, v, pos, qf, beta, j)
        parts.append(partial_attention(qq, kj, vj, q_pos, k_pos, backend="torch", **kf))
    outs = torch.stack([o for o, _ in parts])  # [beta, B, Hq, Mq, D]
    lses = torch.stack([l for _, l in parts])  # [beta, B, Hq, Mq]
    out, lse = expsum_merge(outs, lses, backend="torch")
    scale = q.shape[-1] ** -0.5
    ref_out, ref_lse = partial_attention(qq, k, v, q_pos, pos, scale=scale, backend="reference", **qf)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=0)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=TOL * 10, rtol=1e-5)
    assert torch.all(out[~finite] == 0)


@settings(max_examples=250, deadline=None)
@given(problems(), st.integers(1, 5), st.data())
def test_rsharded_keys_merge_to_full_attention(problem, beta, data):
    q, k, v, pos, feats = problem
    n = q.shape[2]
    i = data.draw(st.integers(0, beta - 1), label="query shard")
    query_idx = torch.arange(i, max(i, n), beta)  # the queries of shard i (maybe empty)
    check_merge_equals_full(q, k, v, pos, feats, beta, query_idx)
