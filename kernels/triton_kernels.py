"""Triton jit bodies for partial attention and expsum-merge.

Only device code lives here. The host side (shape/dtype/device checks, output
allocation, grids, autotune configs, `torch.library.triton_op` registration) is in
`triton_backend.py`, and for the decode variant in `triton_decode.py`; never launch these
kernels directly. One module (~440 lines) on purpose: it is the device code of both
kernels, and every feature (causal, windows ahead and behind, soft-capping, ALiBi,
documents, padding) is spelled once, in `_attend_key_block`, which both inline; split, the
kernels would read apart from the one definition they are made of.

Two attention kernels share the per-key-block work (`_attend_key_block`: classify the block
from min/max features, skip it, or run one online-softmax step with or without an element
mask): `partial_attention_fwd_kernel` (one program per query row block and query head,
every key block of the shard visited) and `partial_attention_decode_kernel` (the query
heads of a kv head packed into the rows, keys visited only within host-computed bounds).

Numerical conventions (see `api.py`):
- softmax statistics are fp32 and kept in base 2 inside the kernels (`exp2`/`log2` are
  the fast hardware ops); every lse that leaves a kernel is converted to the NATURAL log
  (`lse_e = lse_2 * ln 2`), the convention of the rest of fxdisagg.
- a query row that sees no key has `out = 0`, `lse = -inf`; nothing here produces NaN
  for it: the running max is replaced by 0 while it is still -inf, so `exp2(-inf - 0)`
  gives 0 instead of `exp2(-inf + inf) = NaN`.

Whether these functions run compiled or in Triton's CPU interpreter is decided when this
module is imported (`@triton.jit` reads `TRITON_INTERPRET` at decoration time).
"""

import triton
import triton.language as tl

# Sentinel for min/max reductions over the valid lanes of a block. Every block we reduce
# holds at least one valid lane, so a sentinel never survives a reduction and never
# enters arithmetic (2**62 keeps `a - b` of two real positions far from overflow).
_POS_BIG = tl.constexpr(4611686018427387904)  # 2**62
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _query_features(QPOS_ROW, QDOC_ROW, offs_q, m_ok, HAS_DOC: tl.constexpr):
    """Positions and document ids of a block of query rows (`offs_q` indexes the batch
    row's features; repeated indices are fine), with min/max over the valid rows: the
    inputs of the key-block classification. Without documents the doc values are the
    positions (never read)."""
    q_pos = tl.load(QPOS_ROW + offs_q, mask=m_ok, other=0)  # [BLOCK_M]
    q_pos_min = tl.min(tl.where(m_ok, q_pos, _POS_BIG), axis=0)
    q_pos_max = tl.max(tl.where(m_ok, q_pos, -_POS_BIG), axis=0)
    q_doc = q_pos
    q_doc_min = q_pos_min
    q_doc_max = q_pos_max
    if HAS_DOC:
        q_doc = tl.load(QDOC_ROW + offs_q, mask=m_ok, other=0)
        q_doc_min = tl.min(tl.where(m_ok, q_doc, _POS_BIG), axis=0)
        q_doc_max = tl.max(tl.where(m_ok, q_doc, -_POS_BIG), axis=0)
    return q_pos, q_pos_min, q_pos_max, q_doc, q_doc_min, q_doc_max


@triton.jit
def _tanh(x):
    """tanh from exp2, stable for any x (the interpreter and every target have exp2)."""
    x = x.to(tl.float32)
    t = tl.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|), in (0, 1]
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _attend_key_block(
    acc, l_i, m_i,  # running state: fp32 [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M] (base 2)
    q, m_ok,  # [BLOCK_M, BLOCK_D] query tile, [BLOCK_M] valid rows
    q_pos, q_pos_min, q_pos_max, q_doc, q_doc_min, q_doc_max,  # from _query_features
    k_base, v_base,  # K/V of this (batch, kv head)
    KPOS_ROW, KDOC_ROW, KVALID_ROW,  # this batch row's key features
    start_n, n_end,  # keys [start_n, min(start_n + BLOCK_N, n_end)) of the shard
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_d, d_ok, qk_scale_log2, window, window_ahead, softcap,
    slope,  # fp32 [BLOCK_M]: each row's ALiBi slope (read when HAS_ALIBI)
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_WINDOW_AHEAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DOC: tl.constexpr,
    HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key block of the online softmax: returns `(acc, l_i, m_i, loaded)`, loaded = 1
    when k/v were read. Shared by both attention kernels.

    The block is classified from the min/max of the actual per-token features of the query
    block and the key block, so skipping is exact for any positions:
    - skip: no (query, key) pair can be visible (causal: min k_pos > max q_pos; window:
      max k_pos <= min q_pos - W; window ahead: min k_pos >= max q_pos + A; documents: disjoint id ranges; every key padding);
    - full: every pair is visible and the block is in bounds: no element mask;
    - partial: the element mask is evaluated and applied.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    k_pos = tl.load(KPOS_ROW + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
    k_pos_min = tl.min(tl.where(n_ok, k_pos, _POS_BIG), axis=0)
    k_pos_max = tl.max(tl.where(n_ok, k_pos, -_POS_BIG), axis=0)

    any_visible = start_n < n_end
    need_mask = start_n + BLOCK_N > n_end
    if IS_CAUSAL:
        any_visible = any_visible & (k_pos_min <= q_pos_max)
        need_mask = need_mask | (k_pos_max > q_pos_min)
    if HAS_WINDOW:
        any_visible = any_visible & (q_pos_min - k_pos_max < window)
        need_mask = need_mask | (q_pos_max - k_pos_min >= window)
    if HAS_WINDOW_AHEAD:
        any_visible = any_visible & (k_pos_min - q_pos_max < window_ahead)
        need_mask = need_mask | (k_pos_max - q_pos_min >= window_ahead)
    if HAS_DOC:
        k_doc = tl.load(KDOC_ROW + offs_n, mask=n_ok, other=0)
        k_doc_min = tl.min(tl.where(n_ok, k_doc, _POS_BIG), axis=0)
        k_doc_max = tl.max(tl.where(n_ok, k_doc, -_POS_BIG), axis=0)
        any_visible = any_visible & (k_doc_min <= q_doc_max) & (k_doc_max >= q_doc_min)
        need_mask = need_mask | (k_doc_min != k_doc_max) | (q_doc_min != q_doc_max)
        need_mask = need_mask | (k_doc_min != q_doc_min)
    if HAS_VALID:
        k_ok = tl.load(KVALID_ROW + offs_n, mask=n_ok, other=0) != 0
        n_valid = tl.sum(k_ok.to(tl.int32), axis=0)
        any_visible = any_visible & (n_valid > 0)
        need_mask = need_mask | (n_valid < BLOCK_N)

    if any_visible:
        k_t = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP:  # softcap * tanh(s / softcap) on the natural-log scores, back to base 2
            cap = softcap * 1.4426950408889634  # the cap in base-2 units
            s = _tanh(s / cap) * cap
        if HAS_ALIBI:  # slope * (k_pos - q_pos), in base-2 units; visibility is unchanged
            rel = (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
            s = s + (slope * _LOG2E)[:, None] * rel
        if need_mask:
            vis = n_ok[None, :] & m_ok[:, None]
            if IS_CAUSAL:
                vis = vis & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                vis = vis & (q_pos[:, None] - k_pos[None, :] < window)
            if HAS_WINDOW_AHEAD:
                vis = vis & (k_pos[None, :] - q_pos[:, None] < window_ahead)
            if HAS_DOC:
                vis = vis & (k_doc[None, :] == q_doc[:, None])
            if HAS_VALID:
                vis = vis & k_ok[None, :]
            s = tl.where(vis, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked-so-far rows
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i, any_visible.to(tl.int32)


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """`(out fp32 [BLOCK_M, BLOCK_D], lse natural log [BLOCK_M])` from the running state;
    rows without keys (l_i == 0, acc == 0) give out 0, lse -inf."""
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    return acc / l_safe[:, None], lse


@triton.jit
def partial_attention_fwd_kernel(
    Q, K, V,  # [B, Hq, Mq, D], [B, Hkv, Mk, D], [B, Hkv, Mk, D]; any strides
    QPOS, KPOS,  # int64 [B or 1, Mq], [B or 1, Mk]; last dim contiguous
    QDOC, KDOC,  # int64, same layout as positions (dummies when HAS_DOC is False)
    KVALID,  # uint8 [B or 1, Mk] (dummy when HAS_VALID is False); 0 = padding key
    ALIBI,  # fp32 [Hq]: ALiBi slope per query head (dummy when HAS_ALIBI is False)
    OUT,  # [B, Hq, Mq, D], dtype of Q
    LSE,  # fp32 [B, Hq, Mq], natural log
    qk_scale_log2,  # softmax scale * log2(e): scores are kept in base 2
    window,  # W: key visible only if q_pos - k_pos < W (used when HAS_WINDOW)
    window_ahead,  # A: key visible only if k_pos - q_pos < A (used when HAS_WINDOW_AHEAD)
    softcap,  # C: scores s become C * tanh(s / C) (used when HAS_SOFTCAP)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_qpb, stride_kpb, stride_qdb, stride_kdb, stride_kvb,  # 0 for 1-D features
    Hq, Mq, Mk,
    GROUP,  # Hq // Hkv: query head h reads kv head h // GROUP (GQA/MQA, no expansion)
    MQ_BUCKET, MK_BUCKET,  # unused in the body: autotune keys only
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= max(D, 16); lanes >= D are masked
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_WINDOW_AHEAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_VALID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else the default
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = one block of BLOCK_M query rows of one (batch, query head).

    Visits every key block of the shard and classifies it (`_attend_key_block`): skipped
    blocks cost their feature loads only. R-sharded shards are sorted, so skipping removes
    the upper triangle. Short query blocks (decode) use `partial_attention_decode_kernel`.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)

    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Mq
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos, q_pos_min, q_pos_max, q_doc, q_doc_min, q_doc_max = _query_features(
        QPOS + b64 * stride_qpb, QDOC + b64 * stride_qdb, offs_m, m_ok, HAS_DOC)

    slope = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope += tl.load(ALIBI + h)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Mk, BLOCK_N):
        acc, l_i, m_i, _ = _attend_key_block(
            acc, l_i, m_i, q, m_ok, q_pos, q_pos_min, q_pos_max, q_doc, q_doc_min, q_doc_max,
            k_base, v_base,
            KPOS + b64 * stride_kpb, KDOC + b64 * stride_kdb, KVALID + b64 * stride_kvb,
            start_n, Mk, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_d, d_ok, qk_scale_log2, window, window_ahead, softcap, slope,
            IS_CAUSAL, HAS_WINDOW, HAS_WINDOW_AHEAD, HAS_SOFTCAP, HAS_ALIBI, HAS_DOC, HAS_VALID,
            DOT_PRECISION, BLOCK_N)
    out, lse = _finish_rows(acc, l_i, m_i)

    o_base = OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    l_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh
    tl.store(l_base + offs_m * stride_lm, lse, mask=m_ok)


@triton.jit
def partial_attention_decode_kernel(
    Q, K, V, QPOS, KPOS, QDOC, KDOC, KVALID, ALIBI, OUT, LSE,  # as partial_attention_fwd_kernel
    KBOUNDS,  # int32 [B or 1, 2]: (lo, hi) per batch row; keys outside [lo, hi) are
              # visible to no query of the row (any superset of the visible keys is correct)
    NBLOCKS,  # int32 [B * Hkv, cdiv(GROUP * Mq, BLOCK_M)]: key blocks loaded per program,
              # written only when COUNT_BLOCKS (dummy otherwise)
    qk_scale_log2, window, window_ahead, softcap,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_qpb, stride_kpb, stride_qdb, stride_kdb, stride_kvb,  # 0 for 1-D features
    stride_bb,  # KBOUNDS batch stride: 0 when shared by the batch
    Hkv, Mq,
    GROUP,  # Hq // Hkv
    MK_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_WINDOW_AHEAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DOC: tl.constexpr,
    HAS_VALID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COUNT_BLOCKS: tl.constexpr,  # write NBLOCKS (tests, instrumentation); off: no cost
    BLOCK_M: tl.constexpr,  # >= 16 (tl.dot), chosen by the host from GROUP * Mq
    BLOCK_N: tl.constexpr,
):
    """One program = one block of BLOCK_M packed rows of one (batch, kv head).

    The GROUP query heads that read this kv head are packed into the rows, query-major:
    packed row r is query index r // GROUP of query head hk * GROUP + r % GROUP. So k/v
    blocks are loaded once for the whole group (flash-decoding, FlashInfer), and a row
    block holds consecutive queries, which keeps the per-block classification tight when
    Mq > 1 (chunked prefill). The key loop covers only [lo, hi) of the batch row, in
    blocks starting at lo (not aligned to BLOCK_N), and still classifies every block, so
    loose bounds cost time, never correctness.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // Hkv).to(tl.int64)
    hk = pid_bh % Hkv

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows
    m_ok = offs_r < GROUP * Mq
    offs_q = offs_r // GROUP  # query index
    head = (hk * GROUP + offs_r % GROUP).to(tl.int64)  # query head, int64 offsets
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        Q + b64 * stride_qb + head[:, None] * stride_qh + offs_q[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos, q_pos_min, q_pos_max, q_doc, q_doc_min, q_doc_max = _query_features(
        QPOS + b64 * stride_qpb, QDOC + b64 * stride_qdb, offs_q, m_ok, HAS_DOC)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    slope = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + head, mask=m_ok, other=0.0)
    lo = tl.load(KBOUNDS + b64 * stride_bb)
    hi = tl.load(KBOUNDS + b64 * stride_bb + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if COUNT_BLOCKS:
        n_loaded = 0
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i, loaded = _attend_key_block(
            acc, l_i, m_i, q, m_ok, q_pos, q_pos_min, q_pos_max, q_doc, q_doc_min, q_doc_max,
            k_base, v_base,
            KPOS + b64 * stride_kpb, KDOC + b64 * stride_kdb, KVALID + b64 * stride_kvb,
            start_n, hi, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_d, d_ok, qk_scale_log2, window, window_ahead, softcap, slope,
            IS_CAUSAL, HAS_WINDOW, HAS_WINDOW_AHEAD, HAS_SOFTCAP, HAS_ALIBI, HAS_DOC, HAS_VALID,
            DOT_PRECISION, BLOCK_N)
        if COUNT_BLOCKS:
            n_loaded += loaded
    out, lse = _finish_rows(acc, l_i, m_i)

    tl.store(
        OUT + b64 * stride_ob + head[:, None] * stride_oh + offs_q[:, None] * stride_om
        + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b64 * stride_lb + head * stride_lh + offs_q * stride_lm, lse, mask=m_ok)
    if COUNT_BLOCKS:
        tl.store(NBLOCKS + pid_bh * tl.num_programs(0) + pid_m, n_loaded)


@triton.jit
def expsum_merge_kernel(
    OUTS,  # [P, B, H, M, D]; any strides
    LSES,  # fp32 [P, B, H, M], natural log
    OUT,  # [B, H, M, D], dtype of OUTS
    LSE,  # fp32 [B, H, M], natural log
    stride_op, stride_ob, stride_oh, stride_om, stride_od,
    stride_lp, stride_lb, stride_lh, stride_lm,
    stride_yb, stride_yh, stride_ym, stride_yd,
    stride_zb, stride_zh, stride_zm,
    P, H, M,
    M_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One program = BLOCK_M rows of one (batch, head).

    Two loops over the P partials: the first reads only the lses (4 bytes per row and
    partial) to find the max, the second reads every partial output once and accumulates
    the weighted sum, so each output byte is read exactly once (bandwidth-bound).
    A partial with lse = -inf has weight exactly 0 and its output is never added (it
    could be garbage); a row where every partial is -inf gets out = 0, lse = -inf.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < HEAD_DIM

    # Pointers advance by one partial per iteration: 64-bit pointer arithmetic, so P times
    # the partial stride never overflows int32.
    lse_base = LSES + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm
    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lse_ptr = lse_base
    for _ in range(0, P):
        lse_p = tl.load(lse_ptr, mask=m_ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse_p)
        lse_ptr += stride_lp
    lse_max_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    out_ptr = (OUTS + b64 * stride_ob + h64 * stride_oh
               + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    lse_ptr = lse_base
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    for _ in range(0, P):
        lse_p = tl.load(lse_ptr, mask=m_ok, other=float("-inf"))
        w = tl.exp2((lse_p - lse_max_safe) * _LOG2E)  # [BLOCK_M]; 0 for -inf partials
        o_p = tl.load(out_ptr, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.where(w[:, None] > 0.0, w[:, None] * o_p.to(tl.float32), 0.0)
        w_sum += w
        lse_ptr += stride_lp
        out_ptr += stride_op

    has = w_sum > 0.0
    w_safe = tl.where(has, w_sum, 1.0)
    out = acc / w_safe[:, None]
    lse = tl.where(has, lse_max_safe + tl.log(w_safe), float("-inf"))

    y_base = OUT + b64 * stride_yb + h64 * stride_yh
    tl.store(
        y_base + offs_m[:, None] * stride_ym + offs_d[None, :] * stride_yd,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b64 * stride_zb + h64 * stride_zh + offs_m * stride_zm, lse, mask=m_ok)
