"""Triton jit bodies for partial attention and expsum-merge.

Only device code lives here. The host side (shape/dtype/device checks, output
allocation, grids, autotune configs, `torch.library.triton_op` registration) is in
`triton_backend.py`; never launch these kernels directly.

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
def partial_attention_fwd_kernel(
    Q, K, V,  # [B, Hq, Mq, D], [B, Hkv, Mk, D], [B, Hkv, Mk, D]; any strides
    QPOS, KPOS,  # int64 [B or 1, Mq], [B or 1, Mk]; last dim contiguous
    QDOC, KDOC,  # int64, same layout as positions (dummies when HAS_DOC is False)
    KVALID,  # uint8 [B or 1, Mk] (dummy when HAS_VALID is False); 0 = padding key
    OUT,  # [B, Hq, Mq, D], dtype of Q
    LSE,  # fp32 [B, Hq, Mq], natural log
    qk_scale_log2,  # softmax scale * log2(e): scores are kept in base 2
    window,  # W: key visible only if q_pos - k_pos < W (used when HAS_WINDOW)
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
    HAS_DOC: tl.constexpr,
    HAS_VALID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else the default
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program = one block of BLOCK_M query rows of one (batch, query head).

    Key blocks are classified from the min/max of the actual per-token features of the
    query block and the key block, so skipping is exact for any positions:
    - skip: no (query, key) pair of the tile can be visible (causal: min k_pos > max
      q_pos; window: max k_pos <= min q_pos - W; documents: disjoint id ranges; every
      key padding). R-sharded shards are sorted, so this removes the upper triangle.
    - full: every pair is visible and the block is in bounds: no element mask.
    - partial: the element mask is evaluated and applied.
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
    offs_nb = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Mq
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    q_pos = tl.load(QPOS + b64 * stride_qpb + offs_m, mask=m_ok, other=0)  # [BLOCK_M]
    q_pos_min = tl.min(tl.where(m_ok, q_pos, _POS_BIG), axis=0)
    q_pos_max = tl.max(tl.where(m_ok, q_pos, -_POS_BIG), axis=0)
    if HAS_DOC:
        q_doc = tl.load(QDOC + b64 * stride_qdb + offs_m, mask=m_ok, other=0)
        q_doc_min = tl.min(tl.where(m_ok, q_doc, _POS_BIG), axis=0)
        q_doc_max = tl.max(tl.where(m_ok, q_doc, -_POS_BIG), axis=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start_n in range(0, Mk, BLOCK_N):
        offs_n = start_n + offs_nb
        n_ok = offs_n < Mk
        k_pos = tl.load(KPOS + b64 * stride_kpb + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
        k_pos_min = tl.min(tl.where(n_ok, k_pos, _POS_BIG), axis=0)
        k_pos_max = tl.max(tl.where(n_ok, k_pos, -_POS_BIG), axis=0)

        # Block classification from min/max features (scalars).
        any_visible = start_n < Mk
        need_mask = start_n + BLOCK_N > Mk
        if IS_CAUSAL:
            any_visible = any_visible & (k_pos_min <= q_pos_max)
            need_mask = need_mask | (k_pos_max > q_pos_min)
        if HAS_WINDOW:
            any_visible = any_visible & (q_pos_min - k_pos_max < window)
            need_mask = need_mask | (q_pos_max - k_pos_min >= window)
        if HAS_DOC:
            k_doc = tl.load(KDOC + b64 * stride_kdb + offs_n, mask=n_ok, other=0)
            k_doc_min = tl.min(tl.where(n_ok, k_doc, _POS_BIG), axis=0)
            k_doc_max = tl.max(tl.where(n_ok, k_doc, -_POS_BIG), axis=0)
            any_visible = any_visible & (k_doc_min <= q_doc_max) & (k_doc_max >= q_doc_min)
            need_mask = need_mask | (k_doc_min != k_doc_max) | (q_doc_min != q_doc_max)
            need_mask = need_mask | (k_doc_min != q_doc_min)
        if HAS_VALID:
            k_ok = tl.load(KVALID + b64 * stride_kvb + offs_n, mask=n_ok, other=0) != 0
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
            if need_mask:
                vis = n_ok[None, :] & m_ok[:, None]
                if IS_CAUSAL:
                    vis = vis & (k_pos[None, :] <= q_pos[:, None])
                if HAS_WINDOW:
                    vis = vis & (q_pos[:, None] - k_pos[None, :] < window)
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

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows without keys: acc == 0 -> out == 0
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))

    o_base = OUT + b64 * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    l_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh
    tl.store(l_base + offs_m * stride_lm, lse, mask=m_ok)


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
