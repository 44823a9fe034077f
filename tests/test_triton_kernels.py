"""Triton kernels (`kernels/triton_backend.py`) against a dense fp64 oracle.

Runs everywhere: on a machine without CUDA the kernels run on CPU tensors in Triton's
interpreter. `@triton.jit` decides compiled-vs-interpreted when the kernels module is
imported, so this module sets `TRITON_INTERPRET=1` (only when CUDA is absent, and only if
the variable is not already set) BEFORE importing it. If another test module imported
`fxdisagg.kernels.triton_kernels` earlier in the same process without the variable, the
kernels are compiled-only and this module fails at collection with a message saying so;
CPU test runs should export `TRITON_INTERPRET=1` (Makefile/CI) so that nothing depends on
collection order.

The interpreter cannot multiply bf16, so bf16 cases run only with CUDA. The oracle is
written here (15 lines of dense masked softmax in float64), independent of the other
backends. Tolerances, measured against the fp64 oracle on these shapes (inputs rounded
to the test dtype first, so only kernel error is measured):
    fp32: out and lse within 2e-5 (observed <= ~1e-6)
    fp16: out within 2e-3 (p and out are rounded to fp16), lse within 1e-4
    bf16: out within 1.6e-2, lse within 1e-3
Shapes stay tiny (M <= 40 except one 160-key case, D <= 32 except one D=128 case with
M <= 9, B <= 2, H <= 4).

Two attention kernels: the graph op picks the decode kernel when GROUP * Mq <= 64
(`triton_decode.uses_decode_kernel`), which covers most shapes here, else the prefill
kernel. So that neither loses coverage, every partial-attention case runs twice, through
the `kernel` fixture: "prefill" and "decode" force the choice (the op body reads
`triton_backend.uses_decode_kernel`, patched here), and a spy on both launchers asserts
that the forced kernel, and only it, was launched. Exceptions: the two SHAPES with
GROUP * Mq > 64 (GQA 2 x Mq 33, GQA 4 x Mq 17), which the decode kernel is not meant for,
run on the prefill kernel only; empty shards launch no kernel at all (asserted), so they
run once; so do the merge tests on random partials and the argument errors.
320 cases (80 bf16 ones skipped without CUDA), ~35 s on one core under the interpreter.

One module on purpose (~490 lines): the interpreter set-up above must precede every
Triton import, and the cases share the oracle and the tile builders.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from fxdisagg.errors import KernelError  # noqa: E402
from fxdisagg.kernels import triton_backend as tb  # noqa: E402
from fxdisagg.kernels import triton_decode as td  # noqa: E402
from fxdisagg.kernels.features import TileFeatures  # noqa: E402
from fxdisagg.testing import check_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not tb.INTERPRETED:
    pytest.fail(
        "fxdisagg.kernels.triton_kernels was imported without TRITON_INTERPRET=1 on a "
        "machine without CUDA; export TRITON_INTERPRET=1 before running the tests",
        pytrace=False,
    )

_bf16 = pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="interpreter cannot multiply bf16")
)
DTYPES = [torch.float32, torch.float16, _bf16]
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- oracle


def oracle_attention(q, k, v, q_pos, k_pos, *, scale, causal, window=None,
                     q_doc=None, k_doc=None, k_valid=None, window_ahead=None, softcap=None,
                     alibi=None):
    """Dense masked softmax in float64. Returns (out [B,Hq,Mq,D], lse [B,Hq,Mq])."""
    B, Hq, Mq, D = q.shape
    g = Hq // k.shape[1]
    kk = k.double().cpu().repeat_interleave(g, dim=1)  # [B, Hq, Mk, D]
    vv = v.double().cpu().repeat_interleave(g, dim=1)
    s = q.double().cpu() @ kk.transpose(-1, -2) * scale  # [B, Hq, Mq, Mk]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap

    def rows(t):  # [Mq] | [B, Mq] -> [B, 1, Mq, 1]
        return t.cpu().expand(B, -1)[:, None, :, None]

    def cols(t):  # [Mk] | [B, Mk] -> [B, 1, 1, Mk]
        return t.cpu().expand(B, -1)[:, None, None, :]

    if alibi is not None:  # per-head slope times the key's distance ahead of the query
        s = s + alibi.double().cpu()[None, :, None, None] * (cols(k_pos) - rows(q_pos))
    vis = torch.ones(s.shape, dtype=torch.bool)
    if causal:
        vis &= cols(k_pos) <= rows(q_pos)
    if window is not None:
        vis &= rows(q_pos) - cols(k_pos) < window
    if window_ahead is not None:
        vis &= cols(k_pos) - rows(q_pos) < window_ahead
    if q_doc is not None:
        vis &= rows(q_doc) == cols(k_doc)
    if k_valid is not None:
        vis &= cols(k_valid)
    s = s.masked_fill(~vis, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing
    p = torch.where(vis, torch.exp(s - lse[..., None].clamp_min(-1e300)), 0.0)
    return p @ vv, lse


def oracle_merge(outs, lses):
    """fp64 expsum-merge: lse = logsumexp_p, out = sum_p exp(lse_p - lse) out_p."""
    lses = lses.double().cpu()
    lse = torch.logsumexp(lses, dim=0)
    w = torch.where(lses == NEG_INF, 0.0, torch.exp(lses - lse.clamp_min(-1e300)))
    return (w[..., None] * outs.double().cpu()).sum(0), lse


# ----------------------------------------------------------------------------- helpers


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEV)


def _shard(N, beta, i):
    """R-sharding: the sorted positions t < N with t mod beta == i (maybe empty)."""
    return torch.arange(N, device=DEV)[i::beta]


def _attention(q, k, v, q_pos, k_pos, **feat):
    """The triton launcher, with the tile's features given as keywords of `TileFeatures`."""
    return tb.partial_attention(q, k, v, TileFeatures(q_pos, k_pos, **feat))


KERNELS = ("prefill", "decode")


@pytest.fixture
def launches(monkeypatch):
    """Spies on the two launchers that the graph op's body calls (it looks them up in
    `triton_backend`'s globals on every call): the names of the kernels launched."""
    seen = []
    for name, attr in (("prefill", "_launch_prefill"), ("decode", "launch_decode")):
        def spy(*args, _real=getattr(tb, attr), _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(tb, attr, spy)
    return seen


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch, launches):
    """Forces the attention kernel of every launch in the test: "decode" or "prefill",
    by patching the dispatch rule where `_partial_attention_impl` reads it. After the
    test, asserts that the forced kernel ran and the other never did."""
    forced = request.param
    monkeypatch.setattr(tb, "uses_decode_kernel", lambda mq, group: forced == "decode")
    yield forced
    assert launches, f"forced {forced!r} but no attention kernel was launched"
    assert set(launches) == {forced}, f"forced {forced!r}, launched {sorted(set(launches))}"


def _run_both(q, k, v, q_pos, k_pos, dtype, **feat):
    scale = feat.pop("scale", 1.0 / math.sqrt(q.shape[-1]))
    out, lse = _attention(q, k, v, q_pos, k_pos, scale=scale, **feat)
    ref_out, ref_lse = oracle_attention(q, k, v, q_pos, k_pos, scale=scale, **feat)
    check_attention(out, lse, ref_out, ref_lse, dtype)
    return out, lse, ref_lse


# ----------------------------------------------------------------------------- partial attention

# (B, Hq, Hkv, Mq, Mk, D): N=1, lengths that divide no block size, GQA 1/2/4, MQA,
# head dims that need padding (8, 24) and one large head dim.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 2, 2, 7, 33, 16),
    (1, 4, 2, 33, 7, 32),
    (2, 4, 1, 17, 40, 32),
    (1, 4, 4, 40, 24, 8),
    (2, 2, 1, 9, 9, 24),
    (1, 2, 1, 5, 9, 128),
]
FEATURES = ["none", "causal", "window", "two_sided", "softcap", "alibi", "docs", "valid", "all"]


def _features(kind, B, Hq, Mq, Mk, gen):
    """Per-token features for one case. Queries are the last Mq positions of the key range
    (Mq > Mk puts some queries before every key: fully masked rows under causal). B = 2
    cases use [B, M] tensors, B = 1 cases 1-D ones."""
    q_pos = torch.arange(Mq) + (Mk - Mq)
    k_pos = torch.arange(Mk)
    if B == 2:  # per-batch positions: batch 1 shifted by 3
        q_pos = torch.stack([q_pos, q_pos + 3])
        k_pos = torch.stack([k_pos, k_pos + 3])
    feat = {"causal": kind != "none" and kind != "all", "window": None}
    if kind == "window":
        feat["window"] = 5
    if kind == "two_sided":  # |q - k| < 4, bidirectional (local attention of encoders)
        feat.update(causal=False, window=4, window_ahead=4)
    if kind == "softcap":  # Gemma 2's logit soft-capping, small enough to bend the scores
        feat["softcap"] = 1.5
    if kind == "alibi":  # Bloom's slopes 2^(-8h/H), steep enough to bend every row
        feat["alibi"] = torch.tensor([2.0 ** (-8 * (h + 1) / Hq) for h in range(Hq)])
    if kind in ("docs", "all"):  # packed sequences of 6 tokens, boundaries differ by batch
        feat["q_doc"] = (q_pos + 2) // 6
        feat["k_doc"] = (k_pos + 2) // 6
    if kind in ("valid", "all"):
        k_valid = torch.rand(B, Mk, generator=gen) > 0.25
        if B == 2:
            k_valid[1] = False  # every key of batch 1 is padding: fully masked rows
        feat["k_valid"] = k_valid if B == 2 else k_valid[0]
    if kind == "all":
        feat["window"] = 7  # non-causal window: future keys stay visible
    feat = {n: (t.to(DEV) if torch.is_tensor(t) else t) for n, t in feat.items()}
    return q_pos.to(DEV), k_pos.to(DEV), feat


def _shape_kernels():
    """(shape, kernel) pairs: both kernels where the decode kernel is meant for the shape
    (GROUP * Mq <= td.MAX_PACKED_ROWS), the prefill kernel only above."""
    for s in SHAPES:
        B, Hq, Hkv, Mq, Mk, D = s
        for name in (KERNELS if td.uses_decode_kernel(Mq, Hq // Hkv) else ("prefill",)):
            yield pytest.param(s, name, id="B{}Hq{}Hkv{}Mq{}Mk{}D{}".format(*s) + "-" + name)


@pytest.mark.parametrize("kind", FEATURES)
@pytest.mark.parametrize("shape,kernel", list(_shape_kernels()), indirect=["kernel"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_attention_matches_oracle(dtype, shape, kernel, kind):
    B, Hq, Hkv, Mq, Mk, D = shape
    gen = torch.Generator().manual_seed(10 * SHAPES.index(shape) + FEATURES.index(kind))
    q = _randn((B, Hq, Mq, D), dtype, gen)
    k = _randn((B, Hkv, Mk, D), dtype, gen)
    v = _randn((B, Hkv, Mk, D), dtype, gen)
    q_pos, k_pos, feat = _features(kind, B, Hq, Mq, Mk, gen)
    _run_both(q, k, v, q_pos, k_pos, dtype, **feat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs_and_custom_scale(dtype, kernel):
    """[B, M, H, D] activations viewed as [B, H, M, D] (the layout after the qkv
    projection), k/v sliced out of a wider tensor: kernels read strides, never copy."""
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hkv, M, D = 2, 4, 2, 19, 16
    q = _randn((B, M, Hq, D), dtype, gen).transpose(1, 2)
    kv = _randn((B, M, 2 * Hkv, D + 8), dtype, gen).transpose(1, 2)
    k, v = kv[:, :Hkv, :, :D], kv[:, Hkv:, :, 8:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    pos = torch.arange(M, device=DEV)
    _run_both(q, k, v, pos, pos, dtype, causal=True, window=None, scale=0.37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unsorted_positions(dtype, seed, kernel):
    """Block skipping uses min/max of the actual positions, so it stays exact for any order."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Mq, Mk, D = 1, 2, 37, 35, 16
    q = _randn((B, H, Mq, D), dtype, gen)
    k = _randn((B, H, Mk, D), dtype, gen)
    v = _randn((B, H, Mk, D), dtype, gen)
    q_pos = torch.randperm(40, generator=gen)[:Mq].to(DEV)
    k_pos = torch.randperm(40, generator=gen)[:Mk].to(DEV)
    doc = torch.randint(0, 3, (40,), generator=gen).to(DEV)
    _run_both(q, k, v, q_pos, k_pos, dtype, causal=True, window=None)
    _run_both(q, k, v, q_pos, k_pos, dtype, causal=True, window=9)
    _run_both(q, k, v, q_pos, k_pos, dtype, causal=False, window=None,
              q_doc=doc[q_pos], k_doc=doc[k_pos])


@pytest.mark.parametrize("beta", [2, 3])
@pytest.mark.parametrize("N", [1, 7, 33, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rsharded_tiles(dtype, N, beta, kernel):
    """Every tile (i, j) of an R-sharded grid: q_pos = a*beta + i, k_pos = b*beta + j,
    with i >= j (lower triangle incl. diagonal) and i < j (strict: row 0 sees nothing);
    N < beta gives empty shards (Mq = 0 or Mk = 0)."""
    gen = torch.Generator().manual_seed(N * 10 + beta)
    B, Hq, Hkv, D = 1, 2, 1, 16
    q = _randn((B, Hq, N, D), dtype, gen)
    k = _randn((B, Hkv, N, D), dtype, gen)
    v = _randn((B, Hkv, N, D), dtype, gen)
    for i in range(beta):
        qi = _shard(N, beta, i)
        for j in range(beta):
            kj = _shard(N, beta, j)
            for window in (None, 6):
                out, lse, ref_lse = _run_both(q[:, :, qi], k[:, :, kj], v[:, :, kj], qi, kj,
                                              dtype, causal=True, window=window)
                if i < j and len(qi):
                    assert (lse[..., 0] == NEG_INF).all()  # row 0 of a strict triangle


@pytest.mark.parametrize("beta", [2, 3])
@pytest.mark.parametrize("N", [7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rsharded_grid_plus_merge_equals_full_causal(dtype, N, beta, kernel):
    """beta x beta partials + triton merge, scattered back to token order, equal full
    causal attention over the N tokens."""
    gen = torch.Generator().manual_seed(N + beta)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = _randn((B, Hq, N, D), dtype, gen)
    k = _randn((B, Hkv, N, D), dtype, gen)
    v = _randn((B, Hkv, N, D), dtype, gen)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, N, device=DEV)
    scale = D ** -0.5
    for i in range(beta):
        qi = _shard(N, beta, i)
        partials = [
            _attention(q[:, :, qi], k[:, :, kj], v[:, :, kj], qi, kj,
                       scale=scale, causal=True, window=None)
            for kj in (_shard(N, beta, j) for j in range(beta))
        ]
        o_i, l_i = tb.expsum_merge(torch.stack([p[0] for p in partials]),
                                   torch.stack([p[1] for p in partials]))
        out[:, :, qi], lse[:, :, qi] = o_i, l_i
    pos = torch.arange(N, device=DEV)
    ref_out, ref_lse = oracle_attention(q, k, v, pos, pos, scale=scale, causal=True)
    check_attention(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows(dtype, kernel):
    """All keys padding, disjoint documents, a window that excludes everything: out 0,
    lse -inf, no NaN."""
    gen = torch.Generator().manual_seed(3)
    B, H, M, D = 2, 2, 20, 16
    q, k, v = (_randn((B, H, M, D), dtype, gen) for _ in range(3))
    pos = torch.arange(M, device=DEV)
    cases = [
        dict(causal=True, window=None, k_valid=torch.zeros(M, dtype=torch.bool, device=DEV)),
        dict(causal=False, window=None, q_doc=torch.zeros(M, dtype=torch.long, device=DEV),
             k_doc=torch.ones(M, dtype=torch.long, device=DEV)),
        dict(causal=True, window=0),
    ]
    for feat in cases:
        out, lse, _ = _run_both(q, k, v, pos, pos, dtype, **feat)
        assert (lse == NEG_INF).all() and (out == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_empty_shards(causal, launches):
    """Mk = 0 or Mq = 0 is answered by the op body without launching either kernel
    (asserted), so it is not run per kernel."""
    gen = torch.Generator().manual_seed(4)
    D = 16
    e = torch.empty(0, dtype=torch.long, device=DEV)
    # Mk = 0: every row fully masked
    q = _randn((2, 2, 5, D), torch.float32, gen)
    kv0 = _randn((2, 1, 0, D), torch.float32, gen)
    out, lse = _attention(q, kv0, kv0, torch.arange(5, device=DEV), e,
                          scale=0.25, causal=causal, window=None)
    assert out.shape == (2, 2, 5, D) and (out == 0).all() and (lse == NEG_INF).all()
    # Mq = 0: empty outputs
    q0 = _randn((2, 2, 0, D), torch.float32, gen)
    kv = _randn((2, 1, 5, D), torch.float32, gen)
    out, lse = _attention(q0, kv, kv, e, torch.arange(5, device=DEV),
                          scale=0.25, causal=causal, window=None)
    assert out.shape == (2, 2, 0, D) and lse.shape == (2, 2, 0)
    assert launches == []


def test_skipped_key_blocks_are_never_read(kernel):
    """Keys strictly after every query sit in blocks that must be skipped: poison them
    with NaN and check nothing leaks. Positions 128.. start a new block for every
    BLOCK_N in {16, 32, 64, 128}, so this holds for every config of the prefill kernel;
    the decode kernel's key bounds end at key 16, before them."""
    gen = torch.Generator().manual_seed(5)
    D, Mq, Mk = 16, 16, 160
    q = _randn((1, 1, Mq, D), torch.float32, gen)
    k = _randn((1, 1, Mk, D), torch.float32, gen)
    v = _randn((1, 1, Mk, D), torch.float32, gen)
    ref_out, ref_lse = oracle_attention(q, k, v, torch.arange(Mq), torch.arange(Mk),
                                        scale=0.25, causal=True)
    k[:, :, 128:], v[:, :, 128:] = float("nan"), float("nan")
    out, lse = _attention(q, k, v, torch.arange(Mq, device=DEV),
                          torch.arange(Mk, device=DEV), scale=0.25, causal=True,
                          window=None)
    check_attention(out, lse, ref_out, ref_lse, torch.float32)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 3, 33, 24)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expsum_merge_matches_oracle(dtype, shape, P):
    """Random partials with -inf entries: single partials, and rows where every partial
    is -inf (out 0, lse -inf). Partial outputs of -inf rows hold garbage (NaN) that must
    never reach the result."""
    gen = torch.Generator().manual_seed(P)
    B, H, M, D = shape
    outs = _randn((P, B, H, M, D), dtype, gen)
    lses = (3 * torch.randn((P, B, H, M), generator=gen)).to(DEV)
    drop = torch.rand((P, B, H, M), generator=gen) < 0.3
    drop[:, :, :, 0] = True  # row 0: every partial -inf
    lses[drop.to(DEV)] = NEG_INF
    ref_out, ref_lse = oracle_merge(torch.where(drop[..., None].to(DEV), 0.0, outs.float()), lses)
    outs[drop.to(DEV)] = float("nan")
    out, lse = tb.expsum_merge(outs, lses)
    check_attention(out, lse, ref_out, ref_lse, dtype)


def test_expsum_merge_non_contiguous_and_empty():
    gen = torch.Generator().manual_seed(7)
    P, B, H, M, D = 3, 2, 2, 9, 16
    outs = _randn((B, H, M, P, D), torch.float32, gen).permute(3, 0, 1, 2, 4)  # [P,B,H,M,D]
    lses = torch.randn((B, H, P, M), generator=gen).to(DEV).permute(2, 0, 1, 3)
    out, lse = tb.expsum_merge(outs, lses)
    check_attention(out, lse, *oracle_merge(outs, lses), torch.float32)
    out, lse = tb.expsum_merge(outs[:0], lses[:0])  # P = 0: nothing to merge
    assert (out == 0).all() and (lse == NEG_INF).all()
    out, lse = tb.expsum_merge(outs[:, :, :, :0], lses[:, :, :, :0])  # M = 0
    assert out.shape == (B, H, 0, D) and lse.shape == (B, H, 0)


def test_merge_of_split_keys_equals_one_call(kernel):
    """Splitting the keys of one causal call into 3 chunks and merging reproduces it."""
    gen = torch.Generator().manual_seed(8)
    B, H, M, D = 1, 2, 30, 16
    q, k, v = (_randn((B, H, M, D), torch.float32, gen) for _ in range(3))
    pos = torch.arange(M, device=DEV)
    full = _attention(q, k, v, pos, pos, scale=0.25, causal=True, window=None)
    parts = [_attention(q, k[:, :, c], v[:, :, c], pos, pos[c], scale=0.25,
                        causal=True, window=None)
             for c in (slice(0, 7), slice(7, 20), slice(20, 30))]
    out, lse = tb.expsum_merge(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    torch.testing.assert_close(out, full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full[1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- ops and errors


def test_graph_ops_are_registered_and_traceable(kernel):
    """The launchers go through named ops that make_fx records as single nodes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    assert hasattr(torch.ops.fxdisagg, "triton_partial_attention")
    assert hasattr(torch.ops.fxdisagg, "triton_expsum_merge")
    gen = torch.Generator().manual_seed(9)
    q, k, v = (_randn((1, 2, 8, 16), torch.float32, gen) for _ in range(3))
    pos = torch.arange(8, device=DEV)

    def f(q, k, v, pos):
        o, l = _attention(q, k, v, pos, pos, scale=0.25, causal=True, window=None)
        return tb.expsum_merge(o[None], l[None])

    gm = make_fx(f, tracing_mode="fake")(q, k, v, pos)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.fxdisagg.triton_partial_attention.default in targets
    assert torch.ops.fxdisagg.triton_expsum_merge.default in targets
    out, lse = gm(q, k, v, pos)
    ref_out, ref_lse = oracle_attention(q, k, v, pos, pos, scale=0.25, causal=True)
    check_attention(out, lse, ref_out, ref_lse, torch.float32)


def test_bad_arguments_raise_kernel_error():
    q = torch.zeros(1, 3, 4, 16, device=DEV)
    kv = torch.zeros(1, 2, 4, 16, device=DEV)
    pos = torch.arange(4, device=DEV)
    with pytest.raises(KernelError, match="multiple of kv heads"):
        _attention(q, kv, kv, pos, pos, scale=1.0, causal=True, window=None)
    with pytest.raises(KernelError, match="share dtype"):
        _attention(q[:, :2], kv.half(), kv.half(), pos, pos, scale=1.0,
                   causal=True, window=None)
    with pytest.raises(KernelError, match="q_pos"):
        _attention(q[:, :2], kv, kv, pos[:3], pos, scale=1.0, causal=True, window=None)
    with pytest.raises(KernelError, match="k_pos must be torch.int64"):
        _attention(q[:, :2], kv, kv, pos, pos.int(), scale=1.0, causal=True, window=None)
    with pytest.raises(KernelError, match="lses"):
        tb.expsum_merge(torch.zeros(2, 1, 1, 4, 16, device=DEV), torch.zeros(2, 1, 1, 4, device=DEV).half())


def test_public_api_dispatches_to_triton(kernel):
    """`fxdisagg.kernels.partial_attention(..., backend="triton")` reaches these kernels."""
    import fxdisagg.kernels as K

    gen = torch.Generator().manual_seed(10)
    q = _randn((1, 4, 11, 16), torch.float32, gen)
    k, v = (_randn((1, 2, 13, 16), torch.float32, gen) for _ in range(2))
    q_pos, k_pos = torch.arange(2, 13, device=DEV), torch.arange(13, device=DEV)
    out, lse = K.partial_attention(q, k, v, q_pos, k_pos, causal=True, window=4, backend="triton")
    ref_out, ref_lse = oracle_attention(q, k, v, q_pos, k_pos, scale=0.25, causal=True, window=4)
    check_attention(out, lse, ref_out, ref_lse, torch.float32)
    m_out, m_lse = K.expsum_merge(out[None], lse[None], backend="triton")
    check_attention(m_out, m_lse, ref_out, ref_lse, torch.float32)
