"""Kernels: the torch backend against the fp64 reference, expsum-merge, custom ops, errors.

Tiles are built the way the AttnNodes see them: R-sharding puts token t on attention shard
`t % beta`, so tile (i, j) has q_pos = i, i+beta, ... and k_pos = j, j+beta, ... Edge cases
that break merges are included: N not divisible by beta, N < beta (empty shards), fully
masked rows, GQA/MQA, per-batch features.

One module on purpose (~460 lines): every kernel property is checked against the same
fp64 oracle and tile builders; split by backend it would repeat them.
"""

from __future__ import annotations

import math

import pytest
import torch

from fxdisagg.errors import KernelError
from fxdisagg.kernels import api, expsum_merge, ops, partial_attention, reference, torch_cpu
from fxdisagg.kernels.features import TileFeatures

# Per-dtype tolerances, relative to the value scale (atol = tol * max(1, |ref|max)).
# fp32: accumulation-order noise of the fused kernel. fp16/bf16: rounding of the output
# (2^-11, 2^-8 relative) and of the probabilities the kernel multiplies with v.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
LSE_TOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-6}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rshard(n: int, beta: int, i: int) -> torch.Tensor:
    """Positions of attention shard i under R-sharding of [0, n)."""
    return torch.arange(i, max(i, n), beta, dtype=torch.int64)


def make_qkv(b, hq, hkv, mq, mk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, mq, d, generator=g).to(dtype)  # [B, Hq, Mq, D]
    k = torch.randn(b, hkv, mk, d, generator=g).to(dtype)  # [B, Hkv, Mk, D]
    v = torch.randn(b, hkv, mk, d, generator=g).to(dtype)
    return q, k, v


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    """Same -inf pattern, no NaN, values within the dtype's tolerance."""
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert out.is_contiguous() and lse.is_contiguous()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    scale = max(1.0, ref_out.abs().max().item()) if ref_out.numel() else 1.0
    torch.testing.assert_close(out, ref_out, atol=OUT_TOL[dtype] * scale, rtol=0)
    finite = torch.isfinite(ref_lse)
    lse_scale = max(1.0, ref_lse[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(
        lse[finite], ref_lse[finite], atol=LSE_TOL[dtype] * lse_scale, rtol=0
    )
    assert torch.all(out[torch.isneginf(ref_lse)] == 0)


def check_tile(q, k, v, q_pos, k_pos, **features):
    out, lse = partial_attention(q, k, v, q_pos, k_pos, backend="torch", **features)
    ref_out, ref_lse = partial_attention(q, k, v, q_pos, k_pos, backend="reference", **features)
    assert_matches(out, lse, ref_out, ref_lse, q.dtype)
    return out, lse


def tile_kind(q, k, q_pos, k_pos, **features):
    """The torch backend's case for this tile (the scale plays no part in it)."""
    return torch_cpu.tile_kind(q, k, TileFeatures(q_pos, k_pos, scale=1.0, **features))


# ----------------------------------------------------------------------------- causal tiles

RSHARD_CASES = [(1, 5), (2, 8), (2, 7), (3, 10), (4, 17), (4, 3), (3, 1), (5, 12)]
GQA = [(2, 2), (4, 2), (8, 2), (4, 1)]  # (Hq, Hkv): ratios 1, 2, 4 and MQA


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta,n", RSHARD_CASES)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_rsharded_causal_tiles(dtype, beta, n, hq, hkv):
    for i in range(beta):
        for j in range(beta):
            q_pos, k_pos = rshard(n, beta, i), rshard(n, beta, j)
            q, k, v = make_qkv(1, hq, hkv, len(q_pos), len(k_pos), 16, dtype, seed=i * 7 + j)
            check_tile(q, k, v, q_pos, k_pos, causal=True)


@pytest.mark.parametrize("beta,n", [(2, 8), (3, 10), (4, 17), (4, 3)])
def test_rsharded_tiles_take_triangle_paths(beta, n):
    """R-sharded causal tiles never build a dense mask: i >= j is tril(0), i < j tril(-1)."""
    for i in range(beta):
        for j in range(beta):
            q_pos, k_pos = rshard(n, beta, i), rshard(n, beta, j)
            q, k, _ = make_qkv(1, 2, 2, len(q_pos), len(k_pos), 8, torch.float32)
            kind = tile_kind(q, k, q_pos, k_pos, causal=True)
            if len(q_pos) == 0 or len(k_pos) == 0 or k_pos.min() > q_pos.max():
                assert kind == "empty"
            elif k_pos.max() <= q_pos.min():  # e.g. a 1 x 1 tile: causality masks nothing
                assert kind == "plain"
            else:
                assert kind == ("causal" if i >= j else "causal_shifted"), (i, j, kind)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta,n", [(2, 600), (3, 1000), (2, 2200)])
def test_row_blocked_triangles(dtype, beta, n, one_thread):
    """R-sharded tiles of 128..1024 rows are cut into row blocks on one thread
    (`torch_cpu._causal`): block ends that fall anywhere, the shifted triangle, more keys
    than queries, and a larger tile that stays one call, all against the fp64 reference."""
    sizes = set()
    for i, j in ((1, 0), (0, 1), (beta - 1, beta - 1)):
        q_pos, k_pos = rshard(n, beta, i), rshard(n, beta, j)
        q, k, v = make_qkv(1, 4, 2, len(q_pos), len(k_pos), 16, dtype, seed=i + 3 * j)
        assert tile_kind(q, k, q_pos, k_pos, causal=True) == ("causal" if i >= j else "causal_shifted")
        check_tile(q, k, v, q_pos, k_pos, causal=True)
        sizes.add(len(q_pos))
    blocked = [torch_cpu.row_blocked(m) for m in sizes]
    assert all(blocked) == (n < 2200) and (all(blocked) or not any(blocked))


def test_triangles_stay_one_call_on_more_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not torch_cpu.row_blocked(512)
        q_pos, k_pos = rshard(1000, 2, 1), rshard(1000, 2, 0)
        q, k, v = make_qkv(1, 4, 2, len(q_pos), len(k_pos), 16, torch.float32, seed=1)
        check_tile(q, k, v, q_pos, k_pos, causal=True)
    finally:
        torch.set_num_threads(before)


def test_contiguous_sharding_tiles():
    """Contiguous shards: keys all in the past (no mask) or all in the future (empty)."""
    q, k, v = make_qkv(1, 4, 2, 5, 6, 8, torch.float32)
    past, future = torch.arange(6), torch.arange(20, 26)
    q_pos = torch.arange(10, 15)
    assert tile_kind(q, k, q_pos, past) == "plain"
    assert tile_kind(q, k, q_pos, future) == "empty"
    check_tile(q, k, v, q_pos, past)
    out, lse = check_tile(q, k, v, q_pos, future)
    assert torch.isneginf(lse).all() and (out == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_non_causal(dtype, hq, hkv):
    q, k, v = make_qkv(2, hq, hkv, 7, 9, 16, dtype)
    q_pos, k_pos = torch.arange(7), torch.arange(9)
    assert tile_kind(q, k, q_pos, k_pos, causal=False) == "plain"
    check_tile(q, k, v, q_pos, k_pos, causal=False)


def test_unsorted_positions():
    """Correctness must not depend on sorted positions (sorting is only a fast-path hint)."""
    g = torch.Generator().manual_seed(1)
    q_pos, k_pos = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
    q, k, v = make_qkv(1, 4, 2, 12, 12, 8, torch.float32)
    for feats in [dict(causal=True), dict(causal=True, window=4), dict(causal=False, window=3)]:
        check_tile(q, k, v, q_pos, k_pos, **feats)


def test_explicit_scale_and_noncontiguous_inputs():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.float32)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, M, D] view of [B, M, Hq, D]
    check_tile(q_t, k, v, rshard(16, 2, 1), rshard(16, 2, 0), scale=0.37)


# ----------------------------------------------------------------------------- mask features


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [1, 2, 5, 100])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("i,j", [(0, 0), (0, 1), (1, 0)])
def test_window(dtype, window, causal, i, j):
    q_pos, k_pos = rshard(21, 2, i), rshard(21, 2, j)
    q, k, v = make_qkv(1, 4, 2, len(q_pos), len(k_pos), 8, dtype)
    check_tile(q, k, v, q_pos, k_pos, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("behind,ahead", [(3, 3), (1, 1), (4, 2), (None, 3), (100, 100)])
@pytest.mark.parametrize("i,j", [(0, 0), (0, 1), (1, 0)])
def test_window_ahead(dtype, behind, ahead, i, j):
    """Two-sided local windows (encoders): keys at most `ahead - 1` positions after the
    query, and with `behind` at most `behind - 1` before."""
    q_pos, k_pos = rshard(21, 2, i), rshard(21, 2, j)
    q, k, v = make_qkv(2, 4, 2, len(q_pos), len(k_pos), 8, dtype)
    check_tile(q, k, v, q_pos, k_pos, causal=False, window=behind, window_ahead=ahead)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_softcap_takes_the_exact_path(dtype, causal):
    """Soft-capping has no flash kernel: the tile goes to the dense path, still exact."""
    q_pos, k_pos = rshard(19, 2, 1), rshard(19, 2, 0)
    q, k, v = make_qkv(2, 4, 2, len(q_pos), len(k_pos), 8, dtype)
    q = q * 4  # large scores, so the cap bends them
    assert tile_kind(q, k, q_pos, k_pos, causal=causal, softcap=2.0) == "math"
    out, lse = check_tile(q, k, v, q_pos, k_pos, causal=causal, softcap=2.0)
    plain, _ = partial_attention(q, k, v, q_pos, k_pos, causal=causal, backend="reference")
    assert not torch.allclose(out.float(), plain.float(), atol=1e-3), "the cap changes the result"


def bloom_slopes(h: int) -> torch.Tensor:
    """ALiBi slopes as Bloom computes them for a power-of-two head count."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_alibi_tiles_merge_to_hf_bias(dtype, causal, hq, hkv):
    """ALiBi tiles of an R-sharded sequence with left padding, merged, equal one dense
    softmax with the bias as HF's Bloom writes it (`slope * p`, p counting only the
    row's valid keys): the relative bias of the kernels shifts each row by a constant."""
    n, beta, pad = 13, 3, 4
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :pad] = False
    slopes = bloom_slopes(hq)
    q, k, v = make_qkv(2, hq, hkv, n, n, 8, dtype, seed=3)
    q = q * 2  # sharper scores: the bias must be right, not drowned
    hf_pos = (valid.cumsum(-1) - 1) * valid  # [B, N], Bloom's build_alibi_tensor
    scores = q.double() @ reference.expand_kv_heads(k.double(), hq).transpose(-1, -2) / math.sqrt(8)
    scores = scores + slopes.double()[None, :, None, None] * hf_pos[:, None, None, :].double()
    pos = torch.arange(n)
    vis = valid[:, None, None, :] & ((pos[None, :] <= pos[:, None]) if causal else True)
    probs = scores.masked_fill(~vis, float("-inf")).softmax(-1).nan_to_num(0.0)  # 0: no key
    want = probs @ reference.expand_kv_heads(v.double(), hq)
    for i in range(beta):
        q_pos = rshard(n, beta, i)
        parts = [partial_attention(q[:, :, q_pos], k[:, :, k_pos], v[:, :, k_pos], q_pos, k_pos,
                                   causal=causal, k_valid=valid[:, k_pos], alibi=slopes)
                 for k_pos in (rshard(n, beta, j) for j in range(beta))]
        assert tile_kind(q, k, pos, pos, causal=causal, alibi=slopes) == "masked"
        out, _ = expsum_merge([o for o, _ in parts], [l for _, l in parts], backend="torch")
        torch.testing.assert_close(out.double(), want[:, :, q_pos], atol=OUT_TOL[dtype] * 4, rtol=0)
        check_tile(q[:, :, q_pos], k, v, q_pos, pos, causal=causal, k_valid=valid, alibi=slopes)


def test_alibi_slopes_are_checked():
    q, k, v = make_qkv(1, 4, 4, 3, 3, 8, torch.float32)
    pos = torch.arange(3)
    with pytest.raises(KernelError, match="one slope per query head"):
        partial_attention(q, k, v, pos, pos, alibi=[0.5, 0.25])


def test_window_ahead_visibility_is_the_two_sided_rule():
    q_pos, k_pos = torch.arange(9), torch.tensor([0, 3, 4, 5, 8])
    vis = reference.visibility(q_pos, k_pos, causal=False, window=3, window_ahead=3)[0]
    assert torch.equal(vis, (q_pos[:, None] - k_pos[None, :]).abs() < 3)


def padded_batch(n: int, pad: int, side: str):
    """B=2 batch, row 1 padded by `pad` tokens on `side`; HF-style positions skip the pad."""
    valid = torch.ones(2, n, dtype=torch.bool)
    pos = torch.arange(n).repeat(2, 1)  # [B, N]
    if side == "left":
        valid[1, :pad] = False
        pos[1] = torch.arange(n) - pad  # pads get negative positions: they see only pads
    else:
        valid[1, n - pad:] = False
    return pos, valid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)])
def test_padding_rsharded(dtype, side, hq, hkv):
    n, beta = 11, 3
    pos, valid = padded_batch(n, 4, side)
    for i in range(beta):
        for j in range(beta):
            qi, kj = rshard(n, beta, i), rshard(n, beta, j)
            q, k, v = make_qkv(2, hq, hkv, len(qi), len(kj), 8, dtype, seed=i + 3 * j)
            check_tile(q, k, v, pos[:, qi], pos[:, kj], causal=True, k_valid=valid[:, kj])


def test_padding_fully_masked_rows():
    """Left padding with causal: the pad query at position 0 sees only invalid keys."""
    pos, valid = padded_batch(6, 3, "left")
    q, k, v = make_qkv(2, 2, 2, 6, 6, 8, torch.float32)
    out, lse = check_tile(q, k, v, pos, pos, causal=True, k_valid=valid)
    assert torch.isneginf(lse[1, :, 0]).all() and (out[1, :, 0] == 0).all()
    assert tile_kind(q, k, pos, pos, k_valid=valid) == "masked"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("mq", [1, 3])
def test_decode_tiles_of_a_padded_batch(dtype, hq, hkv, mq):
    """A decode step (mq=1) or chunk (mq=3) over an AttnNode's cache slice: every key is in
    the queries' past, some are left padding, one batch row has no valid key at all.
    Only padding masks, so the tile takes the key-row mask ("padded"), never "masked"."""
    b, mk, past = 3, 9, 40
    k_pos = torch.arange(mk) * 4 + 1                     # slice (0, 1) of beta = 2's cache
    q_pos = torch.arange(past, past + mq)
    valid = torch.ones(b, mk, dtype=torch.bool)
    valid[1, :4] = False                                   # left padding of row 1
    valid[2] = False                                       # row 2: all of this slice is padding
    q, k, v = make_qkv(b, hq, hkv, mq, mk, 8, dtype, seed=5)
    assert tile_kind(q, k, q_pos, k_pos, causal=True, k_valid=valid) == "padded"
    out, lse = check_tile(q, k, v, q_pos, k_pos, causal=True, k_valid=valid)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()
    check_tile(q, k, v, q_pos, k_pos, causal=False, k_valid=valid[0])  # [Mk] validity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True])
def test_documents(dtype, per_batch):
    """Packed sequences: doc ids per token; positions restart per document (or not)."""
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    n = len(doc)
    pos = torch.arange(n)
    if per_batch:
        doc = torch.stack([doc, torch.zeros(n, dtype=torch.int64)])  # [B, N]
        pos = pos.repeat(2, 1)
    q, k, v = make_qkv(2, 4, 2, n, n, 8, dtype)
    check_tile(q, k, v, pos, pos, causal=True, q_doc=doc, k_doc=doc)
    for i, j in [(0, 1), (1, 0), (2, 2)]:
        qi, kj = rshard(n, 3, i), rshard(n, 3, j)
        qs, ks, vs = q[:, :, qi], k[:, :, kj], v[:, :, kj]
        check_tile(qs, ks, vs, pos[..., qi], pos[..., kj], q_doc=doc[..., qi], k_doc=doc[..., kj])


def test_all_features_per_batch_positions():
    g = torch.Generator().manual_seed(3)
    b, mq, mk = 3, 9, 10
    q_pos = torch.randint(0, 20, (b, mq), generator=g)
    k_pos = torch.randint(0, 20, (b, mk), generator=g)
    q_doc = torch.randint(0, 2, (b, mq), generator=g)
    k_doc = torch.randint(0, 2, (b, mk), generator=g)
    valid = torch.rand(b, mk, generator=g) > 0.3
    q, k, v = make_qkv(b, 4, 2, mq, mk, 8, torch.float32)
    check_tile(q, k, v, q_pos, k_pos, causal=True, window=6, q_doc=q_doc, k_doc=k_doc, k_valid=valid)


def test_no_valid_key_at_all():
    q, k, v = make_qkv(1, 2, 1, 4, 5, 8, torch.float32)
    valid = torch.zeros(5, dtype=torch.bool)
    out, lse = check_tile(q, k, v, torch.arange(4), torch.arange(5), causal=False, k_valid=valid)
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_redundant_features_are_dropped():
    """All-valid keys, one document, a window wider than the tile: still the triangle path."""
    q_pos, k_pos = rshard(16, 2, 0), rshard(16, 2, 1)
    q, k, _ = make_qkv(1, 2, 2, 8, 8, 8, torch.float32)
    doc = torch.full((8,), 4)
    kind = tile_kind(
        q, k, q_pos, k_pos, window=64, q_doc=doc, k_doc=doc, k_valid=torch.ones(8, dtype=torch.bool)
    )
    assert kind == "causal_shifted"


# ----------------------------------------------------------------------------- empty shards


@pytest.mark.parametrize("mq,mk", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_shards(mq, mk, backend):
    q, k, v = make_qkv(2, 4, 2, mq, mk, 8, torch.float32)
    out, lse = partial_attention(q, k, v, torch.arange(mq), torch.arange(mk), backend=backend)
    assert out.shape == (2, 4, mq, 8) and lse.shape == (2, 4, mq)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_default_scale_and_backend():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 16, torch.float32)
    pos = torch.arange(4)
    out, lse = partial_attention(q, k, v, pos, pos)
    ref_out, ref_lse = partial_attention(
        q, k, v, pos, pos, scale=1 / math.sqrt(16), backend="reference"
    )
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)
    assert api.resolve_backend(None, q.device, "x") == "torch"


def test_math_path_matches_reference():
    """The off-CPU formulation, exercised on CPU through its entry point."""
    q, k, v = make_qkv(2, 4, 2, 6, 7, 8, torch.float32)
    q_pos, k_pos = torch.arange(6) + 1, torch.arange(7)
    valid = torch.tensor([True, False, True, True, True, True, False])
    f = TileFeatures(q_pos, k_pos, scale=0.3, causal=True, window=3, k_valid=valid)
    out, lse = torch_cpu._math(q, k, v, f)
    ref_out, ref_lse = reference.partial_attention(q, k, v, f)
    assert_matches(out, lse, ref_out, ref_lse, torch.float32)


# ----------------------------------------------------------------------------- merge


def random_partials(p, shape, dtype, seed=0, neg_inf_rows=True):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(p, *shape, generator=g).to(dtype)  # [P, B, H, M, D]
    lses = torch.randn(p, *shape[:-1], generator=g) * 5  # [P, B, H, M]
    if neg_inf_rows:
        drop = torch.rand(lses.shape, generator=g) < 0.3
        lses[drop] = float("-inf")
        outs[drop] = 0
        lses[:, :, :, 0] = float("-inf")  # a row masked in every partial
        outs[:, :, :, 0] = 0
    return outs, lses


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2, 3, 5])
def test_expsum_merge(dtype, p):
    outs, lses = random_partials(p, (2, 3, 6, 8), dtype, seed=p)
    out, lse = expsum_merge(outs, lses, backend="torch")
    ref_out, ref_lse = expsum_merge(outs, lses, backend="reference")
    assert_matches(out, lse, ref_out, ref_lse, dtype)
    assert torch.isneginf(lse[:, :, 0]).all() and (out[:, :, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [1, 3])
def test_expsum_merge_sequences(dtype, p):
    """A list of P partials (separately received messages) merges like the stacked tensor."""
    outs, lses = random_partials(p, (1, 2, 5, 4), dtype, seed=10 + p)
    stacked = expsum_merge(outs, lses, backend="torch")
    listed = expsum_merge(list(outs), list(lses), backend="torch")
    ref = expsum_merge(list(outs), list(lses), backend="reference")
    assert torch.equal(stacked[0], listed[0]) and torch.equal(stacked[1], listed[1])
    assert_matches(*listed, *ref, dtype)


def test_expsum_merge_never_aliases_inputs():
    outs, lses = random_partials(1, (1, 2, 3, 4), torch.float32, neg_inf_rows=False)
    out, lse = expsum_merge(outs, lses)
    assert out.data_ptr() != outs.data_ptr() and lse.data_ptr() != lses.data_ptr()
    torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_expsum_merge_all_neg_inf():
    outs = torch.zeros(3, 1, 2, 4, 8)
    lses = torch.full((3, 1, 2, 4), float("-inf"))
    out, lse = expsum_merge(outs, lses)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("beta", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 16, 33])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_rsharded_merge_equals_full_causal(beta, n, hq, hkv):
    """beta x beta partials merged per query shard = causal attention on the whole sequence."""
    q, k, v = make_qkv(1, hq, hkv, n, n, 16, torch.float32, seed=n)
    pos = torch.arange(n)
    full_out, full_lse = partial_attention(q, k, v, pos, pos, scale=0.25, backend="reference")
    for i in range(beta):
        qi = rshard(n, beta, i)
        parts = [
            partial_attention(
                q[:, :, qi], k[:, :, kj], v[:, :, kj], qi, kj, scale=0.25, backend="torch"
            )
            for kj in (rshard(n, beta, j) for j in range(beta))
        ]
        outs = torch.stack([o for o, _ in parts])  # [beta, B, Hq, Mq, D]
        lses = torch.stack([l for _, l in parts])  # [beta, B, Hq, Mq]
        out, lse = expsum_merge(outs, lses)
        assert_matches(out, lse, full_out[:, :, qi], full_lse[:, :, qi], torch.float32)


# ----------------------------------------------------------------------------- custom ops


def test_opcheck_partial_attention():
    q, k, v = make_qkv(2, 4, 2, 5, 6, 8, torch.float32)
    q_pos, k_pos = rshard(11, 2, 1), rshard(12, 2, 0)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, 0] = False
    op = torch.ops.fxdisagg.partial_attention
    torch.library.opcheck(op, (q, k, v, q_pos, k_pos, None, None, None, 0.3, True, None, ""))
    doc = torch.zeros(5, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    args = (q, k, v, q_pos, k_pos, doc[0], doc[1], valid, 0.3, True, 4, "torch")
    torch.library.opcheck(op, args)


def test_opcheck_expsum_merge():
    outs, lses = random_partials(3, (1, 2, 4, 8), torch.float32)
    torch.library.opcheck(torch.ops.fxdisagg.expsum_merge, (outs, lses, ""))


def test_op_matches_api_and_is_traceable():
    q, k, v = make_qkv(1, 4, 2, 6, 6, 8, torch.float32)
    pos = torch.arange(6)
    out, lse = torch.ops.fxdisagg.partial_attention(q, k, v, pos, pos, None, None, None, 0.5, True, None, "")
    ref = partial_attention(q, k, v, pos, pos, scale=0.5)
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
    assert ops.partial_attention is not None

    class Tile(torch.nn.Module):
        def forward(self, q, k, v, pos):
            o, l = torch.ops.fxdisagg.partial_attention(q, k, v, pos, pos, None, None, None, 0.5, True, None, "")
            return torch.ops.fxdisagg.expsum_merge(o[None], l[None], "")

    m = torch.export.Dim("m", min=2, max=64)
    ep = torch.export.export(Tile(), (q, k, v, pos), dynamic_shapes=({2: m}, {2: m}, {2: m}, {0: m}))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fxdisagg.partial_attention.default" in targets
    assert "fxdisagg.expsum_merge.default" in targets
    q2, k2, v2 = make_qkv(1, 4, 2, 9, 9, 8, torch.float32)
    out2, _ = ep.module()(q2, k2, v2, torch.arange(9))
    torch.testing.assert_close(out2, partial_attention(q2, k2, v2, torch.arange(9), torch.arange(9), scale=0.5)[0])


# ----------------------------------------------------------------------------- errors


def _ok():
    q, k, v = make_qkv(1, 4, 2, 3, 5, 8, torch.float32)
    return dict(q=q, k=k, v=v, q_pos=torch.arange(3), k_pos=torch.arange(5))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(k=a["k"][:, :1].expand(1, 3, 5, 8), v=a["v"][:, :1].expand(1, 3, 5, 8)), "multiple"),
        (lambda a: a.update(q_pos=a["q_pos"].float()), "q_pos must have dtype"),
        (lambda a: a.update(k_pos=a["k_pos"].int()), "k_pos must have dtype"),
        (lambda a: a.update(q_pos=torch.arange(4)), r"q_pos must have shape \[3\]"),
        (lambda a: a.update(k_pos=torch.arange(5).repeat(2, 1)), "k_pos must have shape"),
        (lambda a: a.update(v=a["v"][:, :, :4]), "same shape"),
        (lambda a: a.update(k=a["k"][..., :4], v=a["v"][..., :4]), "head dims"),
        (lambda a: a.update(q=a["q"][0]), "4-D"),
        (lambda a: a.update(q=a["q"].double()), "share a dtype"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), "must be one of"),
        (lambda a: a.update(k=a["k"].expand(2, 2, 5, 8), v=a["v"].expand(2, 2, 5, 8)), "batch"),
        (lambda a: a.update(q_doc=torch.zeros(3, dtype=torch.int64)), "together"),
        (lambda a: a.update(q_doc=torch.zeros(3, dtype=torch.int64), k_doc=torch.zeros(4, dtype=torch.int64)), "k_doc"),
        (lambda a: a.update(k_valid=torch.ones(5)), "k_valid must have dtype"),
        (lambda a: a.update(window=2.5), "window"),
        (lambda a: a.update(backend="cuda"), "unknown backend"),
    ],
)
def test_partial_attention_errors(change, match):
    args = _ok()
    change(args)
    with pytest.raises(KernelError, match=match):
        partial_attention(**args)


def test_shape_errors_describe_tensors():
    """Messages name the op and describe tensors by shape/dtype/device, never by values."""
    a = _ok()
    with pytest.raises(KernelError) as info:
        partial_attention(a["q"], a["k"], a["v"][:, :, :4], a["q_pos"], a["k_pos"])
    msg = str(info.value)
    assert msg.startswith("partial_attention:") and "Tensor(shape=(1, 2, 4, 8)" in msg


@pytest.mark.parametrize(
    "outs,lses,backend,match",
    [
        (torch.zeros(2, 1, 2, 3, 4), torch.zeros(2, 1, 2, 3), "fast", "unknown backend"),
        (torch.zeros(2, 1, 2, 3, 4), torch.zeros(2, 1, 2, 4), None, "matching outs"),
        (torch.zeros(2, 1, 2, 3, 4), torch.zeros(2, 1, 2, 3, dtype=torch.float64), None, "float32"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3), None, "5-D"),
        (torch.zeros(0, 1, 2, 3, 4), torch.zeros(0, 1, 2, 3), None, "at least one"),
    ],
)
def test_expsum_merge_errors(outs, lses, backend, match):
    with pytest.raises(KernelError, match=match):
        expsum_merge(outs, lses, backend=backend)


@pytest.mark.parametrize(
    "outs,lses,match",
    [
        ([torch.zeros(1, 2, 3, 4)], [torch.zeros(1, 2, 3)] * 2, "1 outs but 2 lses"),
        ([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 2, 3)] * 2, "partials must be"),
        ([torch.zeros(1, 2, 3, 4)], torch.zeros(1, 1, 2, 3), "both"),
        ([], [], "P >= 1"),
        ([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4).double()], [torch.zeros(1, 2, 3)] * 2, "share a dtype"),
    ],
)
def test_expsum_merge_sequence_errors(outs, lses, match):
    with pytest.raises(KernelError, match=match):
        expsum_merge(outs, lses)


def test_error_lists_backends():
    a = _ok()
    with pytest.raises(KernelError, match="'torch', 'reference', 'triton'"):
        partial_attention(a["q"], a["k"], a["v"], a["q_pos"], a["k_pos"], backend="nope")
