"""Fused Triton kernels of the row-statistics engine (``ltcl_fused/engine/contract.py``).

Notation (SPEC.md / contract): anchors A [M, D], columns C [N, D], ``s_ij = inv_tau·<A_i, C_j>``,
``b_ij = bias_same[j]`` if j ∈ P(i) else ``bias_other[j]`` (0 without bias), self column
``j == i + self_offset`` removed when ``self_offset >= 0``, ``log p_ij = s_ij + b_ij − lse_i``.

One forward kernel (online masked LSE + positive sum; FOCAL adds a second sweep for the focal sums)
and one backward family (dA row-parallel, dC column-parallel) with compile-time variants:
HAS_BIAS, FOCAL, GAMMA_ZERO, SINGLE_D (D fits in one BLOCK_D chunk: operands/accumulators stay in
registers; otherwise D is swept in BLOCK_D chunks and the dA/dC rows owned by a program are
accumulated in an fp32/fp64 workspace, read-modify-write by that program only: deterministic, no
atomics). S tiles are never stored: they are recomputed by ``tl.dot`` over D chunks.

The kernels use only ``tl.exp``/``tl.log`` (expm1/log1p are built with Kahan's tricks) so that the
very same code runs under the Triton interpreter (where libdevice is unavailable) and on the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# elementwise helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _expm1(x):
    """exp(x) − 1, accurate near 0 (Kahan: (u − 1)·x / log u)."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * (x / tl.log(u))))


@triton.jit
def _log1p(y):
    """log(1 + y), accurate near 0 (Kahan: log(u)·y / (u − 1))."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _log1mexp(x):
    """log(1 − exp(x)) for x <= 0 (−inf at x = 0)."""
    return tl.where(x > -LN2, tl.log(-_expm1(x)), _log1p(-tl.exp(x)))


@triton.jit
def _focal_terms(logp, gamma, GAMMA_ZERO: tl.constexpr):
    """(f⁺, f⁻, u⁺, u⁻)(p) of the contract from log p <= 0, elementwise."""
    p = tl.exp(logp)
    l1mp = _log1mexp(logp)
    if GAMMA_ZERO:
        fpos = -logp
        upos = tl.full(logp.shape, -1.0, logp.dtype)
    else:
        neg = logp < 0
        fpos = tl.where(neg, -tl.exp(gamma * l1mp) * logp, 0.0)
        inner = gamma * p * logp + _expm1(logp)
        upos = tl.where(neg, tl.exp((gamma - 1.0) * l1mp) * inner, 0.0)
    fneg = -l1mp
    uneg = tl.exp(logp - l1mp)
    return fpos, fneg, upos, uneg


@triton.jit
def _masks(rows, cols, rmask, cmask, alab, clab, self_offset):
    """valid (j ∈ A(i)), pos (j ∈ P(i)), neg (j ∈ N(i)); all arguments already broadcast to 2-D."""
    valid = rmask & cmask & ((cols != rows + self_offset) | (self_offset < 0))
    same = alab == clab
    return valid, valid & same, valid & (alab != clab)


@triton.jit
def _mma(x, y, acc, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """x @ y (+ acc) accumulated in ACC. UPCAST (interpreter only: its bf16 tl.dot is wrong) multiplies
    the same bf16 values in fp32, which is exact, so the numerics match the bf16 tensor-core path."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _s_tile(X, Y, xi, yi, xmask, ymask, D, stride_x, stride_y, x_res, ACC: tl.constexpr,
            BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """<X_i, Y_j> for a [BLOCK_X, BLOCK_Y] tile (xi, yi int64 row indices), accumulated in ACC.

    With SINGLE_D, ``x_res`` is the resident X tile [BLOCK_X, BLOCK_D] loaded by the caller.
    """
    offs_d = tl.arange(0, BLOCK_D)
    if SINGLE_D:
        y = tl.load(Y + yi[:, None] * stride_y + offs_d[None, :], mask=ymask[:, None] & (offs_d[None, :] < D),
                    other=0.0)
        acc = _mma(x_res, tl.trans(y), None, ACC, PREC, UPCAST)
    else:
        acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            dm = dd[None, :] < D
            x = tl.load(X + xi[:, None] * stride_x + dd[None, :], mask=xmask[:, None] & dm, other=0.0)
            y = tl.load(Y + yi[:, None] * stride_y + dd[None, :], mask=ymask[:, None] & dm, other=0.0)
            acc = _mma(x, tl.trans(y), acc, ACC, PREC, UPCAST)
    return acc


@triton.jit
def _grad_tile(s, valid, pos, neg, bs, bo, lse_safe, cpos, cposf, cneg, r, gamma,
               HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr):
    """G_ij = 1[P](cpos_i + cposf_i u⁺_ij) + 1[N] cneg_i u⁻_ij − r_i p_ij, 0 off A(i); 2-D broadcast args.

    A term with a zero coefficient contributes exactly 0 (u⁻ = inf at p = 1 never meets a 0).
    """
    if HAS_BIAS:
        sb = s + tl.where(pos, bs, bo)
    else:
        sb = s
    logp = tl.minimum(tl.where(valid, sb - lse_safe, -1.0), 0.0)
    p = tl.exp(logp)
    g = tl.where(pos, cpos, 0.0) - r * p
    if FOCAL:
        _fp, _fn, up, un = _focal_terms(logp, gamma, GAMMA_ZERO)
        g += tl.where(pos & (cposf != 0.0), cposf * up, 0.0)
        g += tl.where(neg & (cneg != 0.0), cneg * un, 0.0)
    return tl.where(valid, g, 0.0)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
# Per anchor row i (program = BLOCK_M rows, sweep over column tiles of BLOCK_N):
#   pass 1: lse_i = log Σ_{j∈A(i)} exp(s_ij + b_ij)   (online: running max m_i and sum l_i)
#           pos_sum_i = Σ_{j∈P(i)} s_ij
#   pass 2 (FOCAL): with log p_ij = s_ij + b_ij − lse_i,
#           fpos_i = Σ_P f⁺(p_ij), fneg_i = Σ_N f⁻(p_ij), upos_i = Σ_P u⁺(p_ij), uneg_i = Σ_N u⁻(p_ij)
@triton.jit
def rowstats_fwd_kernel(A, C, ALAB, CLAB, BS, BO, PARAMS, LSE, POS, FPOS, FNEG, UPOS, UNEG,
                        M, N, D, stride_a, stride_c, self_offset,
                        HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    ACC: tl.constexpr = LSE.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ri = rows.to(tl.int64)
    inv_tau = tl.load(PARAMS)
    gamma = tl.load(PARAMS + 1)
    alab = tl.load(ALAB + ri, mask=rmask, other=-1)
    a_res = None
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        a_res = tl.load(A + ri[:, None] * stride_a + offs_d[None, :], mask=rmask[:, None] & (offs_d[None, :] < D),
                        other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    psum = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ci = cols.to(tl.int64)
        clab = tl.load(CLAB + ci, mask=cmask, other=-1)
        s = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                    SINGLE_D, PREC, UPCAST) * inv_tau
        valid, pos, neg = _masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], alab[:, None],
                                 clab[None, :], self_offset)
        if HAS_BIAS:
            bs = tl.load(BS + ci, mask=cmask, other=0.0)
            bo = tl.load(BO + ci, mask=cmask, other=0.0)
            sb = s + tl.where(pos, bs[None, :], bo[None, :])
        else:
            sb = s
        sb = tl.where(valid, sb, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sb, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sb - m_safe[:, None]), 1)
        m_i = m_new
        psum += tl.sum(tl.where(pos, s, 0.0), 1)
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_i)  # −inf for an empty row
    tl.store(LSE + ri, lse, mask=rmask)
    tl.store(POS + ri, psum, mask=rmask)
    if FOCAL:
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        fpos = tl.zeros([BLOCK_M], ACC)
        fneg = tl.zeros([BLOCK_M], ACC)
        upos = tl.zeros([BLOCK_M], ACC)
        uneg = tl.zeros([BLOCK_M], ACC)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            ci = cols.to(tl.int64)
            clab = tl.load(CLAB + ci, mask=cmask, other=-1)
            s = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N,
                        BLOCK_D, SINGLE_D, PREC, UPCAST) * inv_tau
            valid, pos, neg = _masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], alab[:, None],
                                     clab[None, :], self_offset)
            if HAS_BIAS:
                bs = tl.load(BS + ci, mask=cmask, other=0.0)
                bo = tl.load(BO + ci, mask=cmask, other=0.0)
                sb = s + tl.where(pos, bs[None, :], bo[None, :])
            else:
                sb = s
            logp = tl.minimum(tl.where(valid, sb - lse_safe[:, None], -1.0), 0.0)
            fp, fn, up, un = _focal_terms(logp, gamma, GAMMA_ZERO)
            fpos += tl.sum(tl.where(pos, fp, 0.0), 1)
            fneg += tl.sum(tl.where(neg, fn, 0.0), 1)
            upos += tl.sum(tl.where(pos, up, 0.0), 1)
            uneg += tl.sum(tl.where(neg, un, 0.0), 1)
        tl.store(FPOS + ri, fpos, mask=rmask)
        tl.store(FNEG + ri, fneg, mask=rmask)
        tl.store(UPOS + ri, upos, mask=rmask)
        tl.store(UNEG + ri, uneg, mask=rmask)


# ----------------------------------------------------------------------------------------------
# backward, row-parallel part
# ----------------------------------------------------------------------------------------------
# dA_i = inv_tau · Σ_j G_ij C_j   (program = BLOCK_M anchor rows, sweep over column tiles; S recomputed)
#   G_ij = 1[P](cpos_i + cposf_i u⁺_ij) + 1[N] cneg_i u⁻_ij − r_i p_ij
# Output OUT: [M, D] in the accumulation dtype (fp32/fp64), cast by the host.
@triton.jit
def rowstats_bwd_da_kernel(A, C, ALAB, CLAB, BS, BO, PARAMS, LSE, CPOS, CPOSF, CNEG, R, OUT,
                           M, N, D, stride_a, stride_c, self_offset,
                           HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    ACC: tl.constexpr = OUT.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ri = rows.to(tl.int64)
    inv_tau = tl.load(PARAMS)
    gamma = tl.load(PARAMS + 1)
    alab = tl.load(ALAB + ri, mask=rmask, other=-1)
    lse = tl.load(LSE + ri, mask=rmask, other=0.0)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)[:, None]
    cpos = tl.load(CPOS + ri, mask=rmask, other=0.0)[:, None]
    r = tl.load(R + ri, mask=rmask, other=0.0)[:, None]
    if FOCAL:
        cposf = tl.load(CPOSF + ri, mask=rmask, other=0.0)[:, None]
        cneg = tl.load(CNEG + ri, mask=rmask, other=0.0)[:, None]
    else:
        cposf = cpos
        cneg = cpos
    offs_d = tl.arange(0, BLOCK_D)
    a_res = None
    acc = None
    if SINGLE_D:
        a_res = tl.load(A + ri[:, None] * stride_a + offs_d[None, :], mask=rmask[:, None] & (offs_d[None, :] < D),
                        other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ci = cols.to(tl.int64)
        clab = tl.load(CLAB + ci, mask=cmask, other=-1)
        s = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                    SINGLE_D, PREC, UPCAST) * inv_tau
        valid, pos, neg = _masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], alab[:, None],
                                 clab[None, :], self_offset)
        bs = s
        bo = s
        if HAS_BIAS:
            bs = tl.load(BS + ci, mask=cmask, other=0.0)[None, :]
            bo = tl.load(BO + ci, mask=cmask, other=0.0)[None, :]
        g = _grad_tile(s, valid, pos, neg, bs, bo, lse_safe, cpos, cposf, cneg, r, gamma,
                       HAS_BIAS, FOCAL, GAMMA_ZERO)
        if SINGLE_D:
            c = tl.load(C + ci[:, None] * stride_c + offs_d[None, :], mask=cmask[:, None] & (offs_d[None, :] < D),
                        other=0.0)
            acc = _mma(g.to(c.dtype), c, acc, ACC, PREC, UPCAST)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dm = dd[None, :] < D
                c = tl.load(C + ci[:, None] * stride_c + dd[None, :], mask=cmask[:, None] & dm, other=0.0)
                part = _mma(g.to(c.dtype), c, None, ACC, PREC, UPCAST)
                optr = OUT + ri[:, None] * D + dd[None, :]
                om = rmask[:, None] & dm
                prev = tl.load(optr, mask=om & (n0 > 0), other=0.0)
                tl.store(optr, prev + part, mask=om)
            tl.debug_barrier()
    if SINGLE_D:
        tl.store(OUT + ri[:, None] * D + offs_d[None, :], acc * inv_tau, mask=rmask[:, None] & (offs_d[None, :] < D))
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            optr = OUT + ri[:, None] * D + dd[None, :]
            om = rmask[:, None] & (dd[None, :] < D)
            tl.store(optr, tl.load(optr, mask=om, other=0.0) * inv_tau, mask=om)


# ----------------------------------------------------------------------------------------------
# backward, column-parallel part
# ----------------------------------------------------------------------------------------------
# dC_j = inv_tau · Σ_i G_ij A_i   (program = BLOCK_N columns, sweep over anchor-row tiles of BLOCK_M;
# the tile is formed transposed, Gᵀ [BLOCK_N, BLOCK_M], from the saved per-row lse and coefficients)
@triton.jit
def rowstats_bwd_dc_kernel(A, C, ALAB, CLAB, BS, BO, PARAMS, LSE, CPOS, CPOSF, CNEG, R, OUT,
                           M, N, D, stride_a, stride_c, self_offset,
                           HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    ACC: tl.constexpr = OUT.dtype.element_ty
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ci = cols.to(tl.int64)
    inv_tau = tl.load(PARAMS)
    gamma = tl.load(PARAMS + 1)
    clab = tl.load(CLAB + ci, mask=cmask, other=-1)[:, None]
    bs = inv_tau
    bo = inv_tau
    if HAS_BIAS:
        bs = tl.load(BS + ci, mask=cmask, other=0.0)[:, None]
        bo = tl.load(BO + ci, mask=cmask, other=0.0)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    c_res = None
    acc = None
    if SINGLE_D:
        c_res = tl.load(C + ci[:, None] * stride_c + offs_d[None, :], mask=cmask[:, None] & (offs_d[None, :] < D),
                        other=0.0)
        acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        ri = rows.to(tl.int64)
        alab = tl.load(ALAB + ri, mask=rmask, other=-1)[None, :]
        lse = tl.load(LSE + ri, mask=rmask, other=0.0)
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)[None, :]
        cpos = tl.load(CPOS + ri, mask=rmask, other=0.0)[None, :]
        r = tl.load(R + ri, mask=rmask, other=0.0)[None, :]
        if FOCAL:
            cposf = tl.load(CPOSF + ri, mask=rmask, other=0.0)[None, :]
            cneg = tl.load(CNEG + ri, mask=rmask, other=0.0)[None, :]
        else:
            cposf = cpos
            cneg = cpos
        # sᵀ tile [BLOCK_N, BLOCK_M]
        s = _s_tile(C, A, ci, ri, cmask, rmask, D, stride_c, stride_a, c_res, ACC, BLOCK_N, BLOCK_M, BLOCK_D,
                    SINGLE_D, PREC, UPCAST) * inv_tau
        valid, pos, neg = _masks(rows[None, :], cols[:, None], rmask[None, :], cmask[:, None], alab, clab,
                                 self_offset)
        g = _grad_tile(s, valid, pos, neg, bs, bo, lse_safe, cpos, cposf, cneg, r, gamma,
                       HAS_BIAS, FOCAL, GAMMA_ZERO)
        if SINGLE_D:
            a = tl.load(A + ri[:, None] * stride_a + offs_d[None, :], mask=rmask[:, None] & (offs_d[None, :] < D),
                        other=0.0)
            acc = _mma(g.to(a.dtype), a, acc, ACC, PREC, UPCAST)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                dm = dd[None, :] < D
                a = tl.load(A + ri[:, None] * stride_a + dd[None, :], mask=rmask[:, None] & dm, other=0.0)
                part = _mma(g.to(a.dtype), a, None, ACC, PREC, UPCAST)
                optr = OUT + ci[:, None] * D + dd[None, :]
                om = cmask[:, None] & dm
                prev = tl.load(optr, mask=om & (m0 > 0), other=0.0)
                tl.store(optr, prev + part, mask=om)
            tl.debug_barrier()
    if SINGLE_D:
        tl.store(OUT + ci[:, None] * D + offs_d[None, :], acc * inv_tau, mask=cmask[:, None] & (offs_d[None, :] < D))
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            optr = OUT + ci[:, None] * D + dd[None, :]
            om = cmask[:, None] & (dd[None, :] < D)
            tl.store(optr, tl.load(optr, mask=om, other=0.0) * inv_tau, mask=om)
