"""The Triton decode variant (`kernels/triton_decode.py`) against a dense fp64 oracle.

Runs everywhere: without CUDA the kernels run on CPU tensors in Triton's interpreter, so
`TRITON_INTERPRET=1` is set BEFORE Triton is imported (as in tests/test_triton_kernels.py,
which explains the ordering trap). The interpreter cannot multiply bf16: bf16 cases run
only with CUDA; nothing else is skipped.

What is checked:
- decode shapes (GQA groups 1, 2, 4, MQA; Mq 1 and 3; B 1 and 2 with per-batch positions
  and left padding; windows shorter than the context; documents; D 16, 64 and 80) reach
  the decode kernel through the graph op and match the oracle (fp32 within 2e-5, fp16
  out 2e-3 / lse 1e-4, bf16 1.6e-2 / 1e-3, as tests/test_triton_kernels.py measured);
- key bounds: any key order is correct, keys outside [lo, hi) are never read, and on
  R-sharded decode tiles each program loads exactly the causal minimum of key blocks
  (COUNT_BLOCKS), fewer than the prefill kernel's every-block visit under a window;
- empty shards and queries that see no key give out 0, lse -inf, never NaN;
- the small shapes the decode kernel took over still pass through the prefill kernel
  when it is forced, so neither kernel loses coverage;
- `fxdisagg.kernels.partial_attention(..., backend="triton")` dispatches by the rule.
170 cases (the 48 bf16 ones skipped without CUDA), ~15 s on one core under the interpreter.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fxdisagg.kernels as K  # noqa: E402
from fxdisagg.kernels import triton_backend as tb  # noqa: E402
from fxdisagg.kernels import triton_decode as td  # noqa: E402
from fxdisagg.kernels.features import TileFeatures  # noqa: E402
from fxdisagg.testing import check_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not tb.INTERPRETED:
    pytest.fail("fxdisagg.kernels.triton_kernels was imported without TRITON_INTERPRET=1 on a "
                "machine without CUDA; export TRITON_INTERPRET=1 before running the tests",
                pytrace=False)

_bf16 = pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="interpreter cannot multiply bf16"))
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- oracle


def _visible(q_pos, k_pos, causal, window=None, q_doc=None, k_doc=None, k_valid=None):
    """bool [B|1, Mq, Mk]: which key each query sees (features [M] or [B, M])."""
    def rows(t):
        return t.cpu().reshape(-1, t.shape[-1])[:, :, None]

    def cols(t):
        return t.cpu().reshape(-1, t.shape[-1])[:, None, :]

    vis = torch.ones(torch.broadcast_shapes(rows(q_pos).shape, cols(k_pos).shape), dtype=torch.bool)
    if causal:
        vis = vis & (cols(k_pos) <= rows(q_pos))
    if window is not None:
        vis = vis & (rows(q_pos) - cols(k_pos) < window)
    if q_doc is not None:
        vis = vis & (rows(q_doc) == cols(k_doc))
    if k_valid is not None:
        vis = vis & cols(k_valid)
    return vis


def oracle_attention(q, k, v, q_pos, k_pos, *, scale, **feat):
    """Dense masked softmax in float64: (out [B, Hq, Mq, D], lse [B, Hq, Mq])."""
    g = q.shape[1] // k.shape[1]
    kk, vv = (t.double().cpu().repeat_interleave(g, dim=1) for t in (k, v))  # [B, Hq, Mk, D]
    s = q.double().cpu() @ kk.transpose(-1, -2) * scale  # [B, Hq, Mq, Mk]
    vis = _visible(q_pos, k_pos, **feat)[:, None]  # [B|1, 1, Mq, Mk]
    s = s.masked_fill(~vis, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing
    p = torch.where(vis, torch.exp(s - lse[..., None].clamp_min(-1e300)), 0.0)
    return p @ vv, lse


# ----------------------------------------------------------------------------- helpers


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEV)


def _dev(feat):
    return {n: (t.to(DEV) if torch.is_tensor(t) else t) for n, t in feat.items()}


@pytest.fixture
def decode_launches(monkeypatch):
    """Spies on the decode launcher that the graph op's body calls: the launches made."""
    launches, real = [], tb.launch_decode

    def spy(*args, **kwargs):
        launches.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(tb, "launch_decode", spy)
    return launches


@pytest.fixture(params=["decode", "prefill"])
def kernel(request, decode_launches, monkeypatch):
    """Which attention kernel the graph op runs: "decode" by the dispatch rule (these are
    decode shapes), "prefill" forced, so that the small shapes the decode kernel took over
    still cover the prefill kernel. (name, decode launches) for `_run_op` to assert."""
    if request.param == "prefill":
        monkeypatch.setattr(tb, "uses_decode_kernel", lambda mq, group: False)
    return request.param, decode_launches


def _run_op(kernel, q, k, v, q_pos, k_pos, dtype, *, scale=None, **feat):
    """The graph op (`tb.partial_attention`) vs the oracle; asserts which kernel ran."""
    name, launches = kernel
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_before = len(launches)
    out, lse = tb.partial_attention(q, k, v, TileFeatures(q_pos, k_pos, scale=scale, **feat))
    assert len(launches) - n_before == (1 if name == "decode" else 0)
    check_attention(out, lse, *oracle_attention(q, k, v, q_pos, k_pos, scale=scale, **feat), dtype)
    return out, lse


def _launch(q, k, v, q_pos, k_pos, *, scale, **feat):
    """The decode launcher itself, counting key blocks: (out, lse, BlockCounts)."""
    f = td.kernel_features(q, k, q_pos, k_pos, scale, **feat)
    out = torch.empty(q.shape, dtype=q.dtype, device=DEV)  # [B, Hq, Mq, D]
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=DEV)  # [B, Hq, Mq]
    return out, lse, td.launch_decode(q, k, v, out, lse, f, count_blocks=True)


# ----------------------------------------------------------------------------- decode shapes

HEADS = [(2, 2), (4, 2), (8, 2), (8, 1)]  # (Hq, Hkv): GQA groups 1, 2, 4 and MQA
KINDS = ["causal", "window", "docs"]


def _decode_features(kind, B, Mq, Mk):
    """A decode step over a cache of Mk tokens whose last Mq are the new queries. B = 2:
    [B, M] features, row 1 left-padded by 5 keys (k_valid False, positions from the first
    real token). "window": W = 9 < Mk, so the visible keys start mid-shard; "docs":
    non-causal documents of 7 tokens under a window of 12 (future keys of the same
    document stay visible), boundaries differing by row."""
    pad = torch.tensor([0, 5][:B])[:, None]  # [B, 1]
    t = torch.arange(Mk)[None]  # [1, Mk]
    k_pos = t - pad  # [B, Mk]
    q_pos = k_pos[:, Mk - Mq:] - (kind == "docs") * 2  # [B, Mq]
    feat = {"causal": kind != "docs", "window": {"window": 9, "docs": 12}.get(kind)}
    if kind == "docs":
        shift = 3 + 2 * pad  # [B, 1]
        feat["q_doc"], feat["k_doc"] = (q_pos + shift) // 7, (k_pos + shift) // 7
    if B == 2:
        feat["k_valid"] = t.expand(B, -1) >= pad
    else:  # 1-D features, shared by the batch
        q_pos, k_pos = q_pos[0], k_pos[0]
        feat = {n: (t[0] if torch.is_tensor(t) else t) for n, t in feat.items()}
    return q_pos.to(DEV), k_pos.to(DEV), _dev(feat)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("Mq", [1, 3])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "Hq{}Hkv{}".format(*h))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, _bf16])
def test_decode_matches_oracle(dtype, heads, Mq, B, kind, decode_launches):
    Hq, Hkv = heads
    case = HEADS.index(heads) + Mq + B + KINDS.index(kind)
    D = (16, 64, 80)[case % 3]  # 80: not a power of two, lanes 80..127 masked
    gen = torch.Generator().manual_seed(case)
    Mk = 37
    q = _randn((B, Hq, Mq, D), dtype, gen)
    k, v = (_randn((B, Hkv, Mk, D), dtype, gen) for _ in range(2))
    q_pos, k_pos, feat = _decode_features(kind, B, Mq, Mk)
    _run_op(("decode", decode_launches), q, k, v, q_pos, k_pos, dtype, **feat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_unsorted_keys(kernel, dtype, seed):
    """Bounds from the first to the last key that could matter hold for any key order;
    the per-block classification does the rest."""
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Mq, Mk, D = 2, 4, 2, 3, 45, 16
    q = _randn((B, Hq, Mq, D), dtype, gen)
    k, v = (_randn((B, Hkv, Mk, D), dtype, gen) for _ in range(2))
    k_pos = torch.stack([torch.randperm(60, generator=gen)[:Mk] for _ in range(B)]).to(DEV)
    q_pos = torch.tensor([[40, 47, 52], [20, 25, 30]], device=DEV)
    doc = torch.randint(0, 3, (60,), generator=gen).to(DEV)
    k_valid = (torch.rand(B, Mk, generator=gen) > 0.2).to(DEV)
    _run_op(kernel, q, k, v, q_pos, k_pos, dtype, causal=True, window=None)
    _run_op(kernel, q, k, v, q_pos, k_pos, dtype, causal=True, window=11, k_valid=k_valid)
    _run_op(kernel, q, k, v, q_pos, k_pos, dtype, causal=False, window=15,
            q_doc=doc[q_pos], k_doc=doc[k_pos])


def test_rows_without_keys_and_empty_shard(kernel):
    """Batch row 1 all padding, a query before every key, a window that excludes all,
    and Mk = 0: out 0, lse -inf, no NaN; row 0 unaffected."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Mq, Mk, D = 2, 4, 1, 2, 20, 16
    q = _randn((B, Hq, Mq, D), torch.float32, gen)
    k, v = (_randn((B, Hkv, Mk, D), torch.float32, gen) for _ in range(2))
    k_pos = torch.arange(Mk, device=DEV) + 5
    k_valid = torch.ones(B, Mk, dtype=torch.bool, device=DEV)
    k_valid[1] = False
    q_pos = torch.tensor([2, 30], device=DEV)  # query 0 precedes every key
    out, lse = _run_op(kernel, q, k, v, q_pos, k_pos, torch.float32, causal=True, k_valid=k_valid)
    assert (lse[1] == NEG_INF).all() and (lse[0, :, 0] == NEG_INF).all()
    assert (lse[0, :, 1] > NEG_INF).all()
    out, lse = _run_op(kernel, q, k, v, q_pos, k_pos, torch.float32, causal=True, window=0)
    assert (lse == NEG_INF).all() and (out == 0).all()
    e = torch.empty(0, dtype=torch.long, device=DEV)
    out, lse = tb.partial_attention(q, k[:, :, :0], v[:, :, :0],
                                    TileFeatures(q_pos, e, scale=0.25, causal=True))
    assert (out == 0).all() and (lse == NEG_INF).all()


# ----------------------------------------------------------------------------- key bounds


def _seen_span(q_pos, k_pos, **feat):
    """Per batch row, the first and one past the last key some query sees ((0, 0): none)."""
    spans = []
    for row in _visible(q_pos, k_pos, **feat).any(1):  # [Mk] per batch row
        idx = row.nonzero().flatten().tolist()
        spans.append((idx[0], idx[-1] + 1) if idx else (0, 0))
    return spans


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_bounds(seed):
    """Unsorted keys with every feature: [lo, hi) contains every key some query of the
    row sees. Sorted keys with causal, window and left padding (a decode step): exactly
    the first to the last key some query sees."""
    gen = torch.Generator().manual_seed(seed)
    B, Mq, Mk = 2, 3, 50
    q, k = torch.empty(B, 1, Mq, 16), torch.empty(B, 1, Mk, 16)
    q_pos = torch.randint(20, 60, (B, Mq), generator=gen)
    doc = torch.randint(0, 4, (70,), generator=gen)
    k_pos = torch.randperm(70, generator=gen)[:Mk]
    feat = dict(causal=True, window=13, q_doc=doc[q_pos], k_doc=doc[k_pos],
                k_valid=torch.rand(B, Mk, generator=gen) > 0.3)
    bounds = td.key_bounds(td.kernel_features(q, k, q_pos, k_pos, 1.0, **feat)).tolist()
    for (lo, hi), (first, end) in zip(bounds, _seen_span(q_pos, k_pos, **feat)):
        assert first == end or lo <= first < end <= hi

    q_pos = torch.randint(20, 60, (B, 1), generator=gen) + torch.arange(Mq)  # consecutive
    k_pos = torch.arange(Mk) + 10
    feat = dict(causal=True, window=13,
                k_valid=torch.arange(Mk) >= torch.randint(0, 30, (B, 1), generator=gen))
    bounds = td.key_bounds(td.kernel_features(q, k, q_pos, k_pos, 1.0, **feat)).tolist()
    assert [tuple(b) for b in bounds] == _seen_span(q_pos, k_pos, **feat)


def test_keys_outside_bounds_are_never_read():
    """Window and left padding: poison every key outside [lo, hi) with NaN in k and v;
    a single loaded one would leak through `p @ v`."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, Mk, D = 2, 4, 2, 100, 16
    q = _randn((B, Hq, 1, D), torch.float32, gen)
    k, v = (_randn((B, Hkv, Mk, D), torch.float32, gen) for _ in range(2))
    k_pos = torch.arange(Mk, device=DEV)
    q_pos = torch.tensor([[80], [60]], device=DEV)
    k_valid = k_pos[None] >= torch.tensor([[0], [55]], device=DEV)  # row 1 left-padded
    feat = dict(causal=True, window=30, k_valid=k_valid)
    ref = oracle_attention(q, k, v, q_pos, k_pos, scale=0.25, **feat)
    bounds = td.key_bounds(td.kernel_features(q, k, q_pos, k_pos, 0.25, True, 30, None, None, k_valid))
    assert bounds.tolist() == [[51, 81], [55, 61]]
    for b, (lo, hi) in enumerate(bounds.tolist()):
        k[b, :, :lo], v[b, :, :lo], k[b, :, hi:], v[b, :, hi:] = (float("nan"),) * 4
    out, lse, _ = _launch(q, k, v, q_pos, k_pos, scale=0.25, **feat)
    check_attention(out, lse, *ref, torch.float32)


def _rsharded_decode_tiles(N, Mq, beta, pad):
    """The runtime's decode tiles: a cache of N + Mq tokens (the step's Mq new tokens
    appended), AttnNode a of beta**2 holding tokens t with t % beta**2 == a, sorted.
    Per batch row b the first pad[b] tokens are left padding and positions count from
    the first real token. Yields (q_pos [B, Mq], k_pos [B, Mk], k_valid [B, Mk], tokens)."""
    pad = torch.tensor(pad)[:, None]  # [B, 1]
    q_pos = torch.arange(N, N + Mq)[None] - pad  # [B, Mq]
    for a in range(beta ** 2):
        tok = torch.arange(N + Mq)[a::beta ** 2]  # node a's sorted shard
        yield q_pos.to(DEV), (tok[None] - pad).to(DEV), (tok[None] >= pad).to(DEV), tok.to(DEV)


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("Mq", [1, 3])
@pytest.mark.parametrize("beta", [2, 3])
def test_rsharded_decode_loads_the_causal_minimum(beta, Mq, window):
    """Each program loads cdiv(#keys from the first to the last visible one, BLOCK_N) key
    blocks, computed here from the oracle's visibility: the causal minimum. With the
    window the visible keys start mid-shard, and the prefill kernel, which visits every
    block of the shard, would load more."""
    gen = torch.Generator().manual_seed(beta * 10 + Mq)
    N, Hq, Hkv, D = 150, 8, 2, 16
    q = _randn((2, Hq, Mq, D), torch.float32, gen)
    cache_k, cache_v = (_randn((2, Hkv, N + Mq, D), torch.float32, gen) for _ in range(2))
    loaded = every_block = 0
    for q_pos, k_pos, k_valid, tok in _rsharded_decode_tiles(N, Mq, beta, pad=[0, 20]):
        k, v = cache_k[:, :, tok], cache_v[:, :, tok]
        feat = dict(causal=True, window=window, k_valid=k_valid)
        out, lse, counts = _launch(q, k, v, q_pos, k_pos, scale=0.25, **feat)
        check_attention(out, lse, *oracle_attention(q, k, v, q_pos, k_pos, scale=0.25, **feat), torch.float32)
        for b, (first, end) in enumerate(_seen_span(q_pos, k_pos, **feat)):
            assert (counts.loaded[b] == math.ceil((end - first) / counts.block_n)).all(), (b, counts)
        loaded += int(counts.loaded.sum())
        every_block += counts.loaded.numel() * math.ceil(len(tok) / counts.block_n)
    if window is not None:  # the prefill kernel visits every block of every shard
        assert loaded < every_block


# ----------------------------------------------------------------------------- launcher, API


def test_several_row_blocks_and_strided_inputs():
    """The launcher also takes more than 64 packed rows (several row blocks per kv head;
    the dispatch sends those to the prefill kernel) and [B, M, H, D] views."""
    gen = torch.Generator().manual_seed(6)
    B, Hq, Hkv, Mq, Mk, D = 1, 4, 1, 20, 33, 24
    q = _randn((B, Mq, Hq, D), torch.float32, gen).transpose(1, 2)
    kv = _randn((B, Mk, 2 * Hkv, D), torch.float32, gen).transpose(1, 2)
    k, v = kv[:, :Hkv], kv[:, Hkv:]
    q_pos, k_pos = torch.arange(13, 33, device=DEV), torch.arange(Mk, device=DEV)
    out, lse, counts = _launch(q, k, v, q_pos, k_pos, scale=0.3, causal=True, window=10)
    assert counts.loaded.shape == (B, Hkv, 2)
    check_attention(out, lse, *oracle_attention(q, k, v, q_pos, k_pos, scale=0.3, causal=True, window=10),
           torch.float32)


@pytest.mark.parametrize("Mq,decode", [(1, True), (16, True), (17, False)])
def test_public_api_dispatches_by_the_rule(decode_launches, Mq, decode):
    """`fxdisagg.kernels.partial_attention(..., backend="triton")` with GROUP = 4: the
    decode kernel while GROUP * Mq <= 64, the prefill kernel above (must not fire)."""
    gen = torch.Generator().manual_seed(Mq)
    q = _randn((2, 8, Mq, 16), torch.float32, gen)
    k, v = (_randn((2, 2, 40, 16), torch.float32, gen) for _ in range(2))
    q_pos, k_pos = torch.arange(40 - Mq, 40, device=DEV), torch.arange(40, device=DEV)
    out, lse = K.partial_attention(q, k, v, q_pos, k_pos, causal=True, window=25, backend="triton")
    assert len(decode_launches) == int(decode) and td.uses_decode_kernel(Mq, 4) == decode
    check_attention(out, lse, *oracle_attention(q, k, v, q_pos, k_pos, scale=0.25, causal=True, window=25),
           torch.float32)
