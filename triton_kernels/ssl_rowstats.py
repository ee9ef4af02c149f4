"""Fused Triton kernels of the self-supervised row-statistics contract (``ltcl_fused/engine/ssl_contract.py``).

Notation (contract): anchors A [M, D], columns C [N, D], ``g_ij = <A_i, C_j>``, ``s_ij = inv_tau·g_ij``;
``set(i)`` = the columns j ≠ self (unless INCL_SELF), ≠ partner(i) (if EXCL_PARTNER) and kept by the
element filter on g (FILTER: 0 none, 1 "both" ``lower <= |g| <= upper``, 2 "low" ``|g| >= lower``).

Kernels (every variant is a compile-time constant):

``ssl_fwd_kernel``     per row block, a sweep over column tiles (S recomputed by ``tl.dot`` over D
                       chunks, never stored): K2 = one or two online LSEs of ``c_k s`` over the set,
                       the positive's logit and ``pos_in``. STRIP instead stores the block's masked
                       similarity strip ``V = s on the set, +inf elsewhere`` and the set sizes (the
                       first step of the Bayesian path).
``ssl_bayes_kernel``   Bayesian weighting pass over a strip ``V`` and its row-sorted copy: each
                       element's exact count ``#{k ∈ set(i): s_ik <= s_ij}`` by binary lifting in the
                       sorted row (⌈log2 N⌉ + 1 gathers; ties count as <=), ``ω(u)``, then either the
                       weighted LSE (forward) or the strip of ``G = ∂/∂S`` (BWD).
``ssl_bwd_da_kernel``  dA = inv_tau·G C, row-parallel;  ``ssl_bwd_dc_kernel``  dC = inv_tau·Gᵀ A,
                       column-parallel. G is formed in registers from the recomputed S tile, or
                       (G_STRIP, the Bayesian path) loaded from the strip of the weighting pass.
                       Deterministic: every output row is owned by one program (no atomics).
``ssl_bwd_sym_kernel`` the symmetric case (C is A, self_offset = 0, unit weights): dX = inv_tau·(G + Gᵀ) X,
                       row-parallel, one recomputed S tile for both halves (2 GEMM-equivalents, not 4).

Only ``tl.exp``/``tl.log``/``tl.sqrt`` are used, so the same code runs under the Triton interpreter.
The tile helpers (``_s_tile``, ``_mma``, ``_log1p``) are imported from ``rowstats.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .rowstats import _block, _gy_step, _param, _resident_rows, _s_tile, _slab, _split_range, _write_rows

INF = tl.constexpr(float("inf"))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _ssl_masks(rows, cols, rmask, cmask, g, part, self_offset, lower, upper, FILTER: tl.constexpr,
               EXCL_PARTNER: tl.constexpr, INCL_SELF: tl.constexpr):
    """(in_set, is_partner) of a tile; every argument already broadcast to 2-D (g = raw dot product)."""
    valid = rmask & cmask
    is_p = valid & (cols == part)
    in_set = valid
    if not INCL_SELF:
        in_set = in_set & ((cols != rows + self_offset) | (self_offset < 0))
    if EXCL_PARTNER:
        in_set = in_set & (cols != part)
    if FILTER != 0:  # on a = min(|g|, 1); NaN compares false and is kept
        ag = tl.abs(g)
        ag = tl.where(ag > 1.0, 1.0, ag)
        drop = ag < lower
        if FILTER == 1:
            drop = drop | (ag > upper)
        in_set = in_set & (drop == 0)
    return in_set, is_p


@triton.jit
def _lse_update(m, acc, x):
    """One tile of an online log-sum-exp along axis 1 (x = −inf off the set); returns (max, Σ exp(x − max))."""
    nm = tl.maximum(m, tl.max(x, 1))
    nms = tl.where(nm == -INF, 0.0, nm)
    acc = acc * tl.exp(m - nms) + tl.sum(tl.exp(x - nms[:, None]), 1)
    return nm, acc


@triton.jit
def _lse_final(m, acc):
    return tl.where(acc > 0.0, tl.where(acc > 0.0, m, 0.0) + tl.log(acc), -INF)


@triton.jit
def _live(lse, coef):
    """(lse with −inf replaced by 0, coefficient zeroed where lse = −inf): a dead term contributes exactly 0."""
    dead = lse == -INF
    return tl.where(dead, 0.0, lse), tl.where(dead, 0.0, coef)


@triton.jit
def _ssl_grad(s, in_set, is_p, cpos, l0, k0, c0, l1, k1, c1, K2: tl.constexpr):
    """G of the backward contract on a tile (unit weights): Σ_k 1[set] coef_k c_k exp(c_k s − lse_k) + 1[partner] cpos."""
    g = tl.where(is_p, cpos, 0.0)
    live0 = in_set & (k0 != 0.0)
    g += tl.where(live0, (k0 * c0) * tl.exp(tl.where(live0, c0 * s - l0, -INF)), 0.0)
    if K2:
        live1 = in_set & (k1 != 0.0)
        g += tl.where(live1, (k1 * c1) * tl.exp(tl.where(live1, c1 * s - l1, -INF)), 0.0)
    return g


@triton.jit
def _ssl_params(p_inv_tau, p_c0, p_c1, p_lower, p_upper, ACC: tl.constexpr):
    """The float parameters of a launch (``ssl_ops._params``): (inv_tau, c0, c1, lower, upper) in ACC."""
    return _param(p_inv_tau, ACC), _param(p_c0, ACC), _param(p_c1, ACC), _param(p_lower, ACC), _param(p_upper, ACC)


@triton.jit
def _ssl_row_stats(PARTNER, LSE, COEF, CPOS, ri, rmask, M, K2: tl.constexpr):
    """The backward inputs of rows ``ri`` as vectors: (partner, lse_0, coef_0, lse_1, coef_1, cpos), a dead term
    (lse = −inf) with lse 0 and coefficient 0 (``_live``); LSE/COEF [K2 + 1, M] (row stride M). Without K2 the
    second term repeats the first (unused)."""
    part = tl.load(PARTNER + ri, mask=rmask, other=-1)
    l0, k0 = _live(tl.load(LSE + ri, mask=rmask, other=0.0), tl.load(COEF + ri, mask=rmask, other=0.0))
    l1 = l0
    k1 = k0
    if K2:
        l1, k1 = _live(tl.load(LSE + M + ri, mask=rmask, other=0.0), tl.load(COEF + M + ri, mask=rmask, other=0.0))
    cpos = tl.load(CPOS + ri, mask=rmask, other=0.0)
    return part, l0, k0, l1, k1, cpos


@triton.jit
def _ssl_grad_tile(gd, own, other, own_mask, other_mask, part, l0, k0, l1, k1, cpos, self_offset, inv_tau, c0, c1,
                   lower, upper, SAX: tl.constexpr, K2: tl.constexpr, FILTER: tl.constexpr,
                   EXCL_PARTNER: tl.constexpr, INCL_SELF: tl.constexpr):
    """G = ∂/∂S on a tile of raw dot products ``gd`` (``_ssl_masks``, ``_ssl_grad``). The statistic-owning rows
    (2-D ``own``/``own_mask``, their vectors of ``_ssl_row_stats``) lie along tile axis 1 − SAX, the other index
    (``other``/``other_mask``) along axis SAX: SAX = 1 for a [rows, columns] tile (dA), 0 for a [columns, rows]
    one (dC, and the transposed half of the symmetric kernel)."""
    in_set, is_p = _ssl_masks(own, other, own_mask, other_mask, gd, tl.expand_dims(part, SAX), self_offset, lower,
                              upper, FILTER, EXCL_PARTNER, INCL_SELF)
    return _ssl_grad(gd * inv_tau, in_set, is_p, tl.expand_dims(cpos, SAX), tl.expand_dims(l0, SAX),
                     tl.expand_dims(k0, SAX), c0, tl.expand_dims(l1, SAX), tl.expand_dims(k1, SAX), c1, K2)


@triton.jit
def _bayes_logw(cnt, nset, bb, a4, b, al, al1, h1, h2, hden, tm, tp):
    """log ω(u), u = cnt / nset (SPEC.md section 5, the operations in the order of ``bayes_omega``); −inf where ω = 0.

    The constants (``ssl_ops._params``): b·b, 4a, b, α, 1−α, α(1−β), (1−α)β, den_htn, τ⁻, τ⁺.
    """
    u = cnt / nset
    x = 2.0 * u / (b + tl.sqrt(bb + a4 * u))  # = (−b + sqrt(b² + 4au))/(2a) without the cancellation
    phi1 = 2.0 * (1.0 - x)
    phi2 = 2.0 * x
    psi_tn = al * phi1 + al1 * phi2
    psi_fn = al1 * phi1 + al * phi2
    psi_htn = (h1 * phi1 + h2 * phi2) / hden
    w = psi_htn / (tm * psi_tn + tp * psi_fn)
    return tl.where(w > 0.0, tl.log(tl.where(w > 0.0, w, 1.0)), -INF)


# ----------------------------------------------------------------------------------------------
# forward (and the Bayesian strip)
# ----------------------------------------------------------------------------------------------
@triton.jit
def ssl_fwd_kernel(A, C, PARTNER, LSE, POS, POS_IN, V, NSET,
                   M, N, D, stride_a, stride_c, self_offset, p_inv_tau, p_c0, p_c1, p_lower, p_upper,
                   K2: tl.constexpr, FILTER: tl.constexpr, EXCL_PARTNER: tl.constexpr, INCL_SELF: tl.constexpr,
                   STRIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    """LSE [K2 + 1, M] (row stride M), POS/POS_IN [M]; with STRIP: V [M, N], NSET [M] (int32) instead of LSE."""
    ACC: tl.constexpr = POS.dtype.element_ty
    rows, rmask, ri = _block(tl.program_id(0) * BLOCK_M, BLOCK_M, M)
    inv_tau, c0, c1, lower, upper = _ssl_params(p_inv_tau, p_c0, p_c1, p_lower, p_upper, ACC)
    part = tl.load(PARTNER + ri, mask=rmask, other=-1)
    a_res = None
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        a_res = tl.load(A + ri[:, None] * stride_a + offs_d[None, :], mask=rmask[:, None] & (offs_d[None, :] < D),
                        other=0.0)
    m0 = tl.full([BLOCK_M], -INF, ACC)
    s0 = tl.zeros([BLOCK_M], ACC)
    m1 = tl.full([BLOCK_M], -INF, ACC)
    s1 = tl.zeros([BLOCK_M], ACC)
    psum = tl.zeros([BLOCK_M], ACC)
    pin = tl.zeros([BLOCK_M], ACC)
    bad = tl.zeros([BLOCK_M], ACC)  # Σ g·0: NaN iff a dot product of the row is NaN or ±inf (poisoned row)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, N, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, N)
        g = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                    SINGLE_D, PREC, UPCAST)
        in_set, is_p = _ssl_masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], g, part[:, None],
                                  self_offset, lower, upper, FILTER, EXCL_PARTNER, INCL_SELF)
        s = g * inv_tau
        bad += tl.sum(g * 0.0, 1)  # g = 0 outside the matrices
        psum += tl.sum(tl.where(is_p, s, 0.0), 1)
        pin += tl.sum(tl.where(is_p & in_set, 1.0, 0.0), 1)
        if STRIP:
            tl.store(V + ri[:, None] * N + ci[None, :], tl.where(in_set, s, INF), mask=rmask[:, None] & cmask[None, :])
            cnt += tl.sum(in_set.to(tl.int32), 1)
        else:
            m0, s0 = _lse_update(m0, s0, tl.where(in_set, c0 * s, -INF))
            if K2:
                m1, s1 = _lse_update(m1, s1, tl.where(in_set, c1 * s, -INF))
    tl.store(POS + ri, psum, mask=rmask)
    tl.store(POS_IN + ri, pin, mask=rmask)
    poisoned = bad != 0.0
    if STRIP:
        tl.store(NSET + ri, tl.where(poisoned, -1, cnt), mask=rmask)  # -1: poisoned (the weighting pass's NaN)
    else:
        tl.store(LSE + ri, tl.where(poisoned, float("nan"), _lse_final(m0, s0)), mask=rmask)
        if K2:
            tl.store(LSE + M + ri, tl.where(poisoned, float("nan"), _lse_final(m1, s1)), mask=rmask)


# ----------------------------------------------------------------------------------------------
# Bayesian weighting pass (exact ranks by binary lifting in the sorted rows of a strip)
# ----------------------------------------------------------------------------------------------
@triton.jit
def ssl_bayes_kernel(V, SRT, NSET, PARTNER, LSE, COEF, CPOS, G, M, N, top_step, n_steps, p_c, p_bb, p_a4, p_b,
                     p_al, p_al1, p_h1, p_h2, p_hden, p_tm, p_tp,
                     BWD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PART=None, n_per=0, SPLIT: tl.constexpr = False):
    """Strip rows [M, N]: V (s on the set, +inf elsewhere), SRT = V sorted along each row, NSET [M] set sizes
    (−1 for a poisoned row: its LSE is NaN).

    ``cnt_ij = #{q: SRT_iq <= V_ij}`` by binary lifting (steps top_step, top_step/2, .., 1; top_step = the
    largest power of two <= N, n_steps = log2(top_step) + 1): exact, ties counted as <=.
    Forward: LSE [M] = log Σ_set ω e^{c s}. BWD: G [M, N] = 1[set] coef c ω e^{c s − lse} + 1[partner] cpos.
    2-D grid (SPLIT, few row blocks: ops.split_plan): program (i, k) sweeps the columns [k·n_per, (k+1)·n_per)
    only; the forward then writes its partial (max, Σ exp(x − max)) to PART [2, n_split, M] (merged in k order
    by the host, ssl_ops._merge_bayes_parts), the backward its columns of G.
    """
    ACC: tl.constexpr = V.dtype.element_ty
    pid = tl.program_id(0)
    n_lo, n_hi = _split_range(N, n_per, SPLIT)
    rows, rmask, ri = _block(pid * BLOCK_M, BLOCK_M, M)
    c = _param(p_c, ACC)
    bb = _param(p_bb, ACC)
    a4 = _param(p_a4, ACC)
    b = _param(p_b, ACC)
    al = _param(p_al, ACC)
    al1 = _param(p_al1, ACC)
    h1 = _param(p_h1, ACC)
    h2 = _param(p_h2, ACC)
    hden = _param(p_hden, ACC)
    tm = _param(p_tm, ACC)
    tp = _param(p_tp, ACC)
    nset = tl.load(NSET + ri, mask=rmask, other=1).to(ACC)
    poisoned = nset < 0.0  # a NaN or ±inf dot product in the row (set by the strip pass)
    nset = tl.where(nset > 0.0, nset, 1.0)[:, None]
    roff = ri[:, None] * N
    m = tl.full([BLOCK_M], -INF, ACC)
    acc = tl.zeros([BLOCK_M], ACC)
    if BWD:
        lse, coef = _live(tl.load(LSE + ri, mask=rmask, other=0.0), tl.load(COEF + ri, mask=rmask, other=0.0))
        lse = lse[:, None]
        kc = (coef * c)[:, None]
        cpos = tl.load(CPOS + ri, mask=rmask, other=0.0)[:, None]
        part = tl.load(PARTNER + ri, mask=rmask, other=-1)[:, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, n_hi)
        mk = rmask[:, None] & cmask[None, :]
        v = tl.load(V + roff + ci[None, :], mask=mk, other=INF)
        in_set = v < INF
        cnt = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        step = top_step
        for _ in range(n_steps):
            probe = cnt + step
            ok = in_set & (probe <= N)
            q = tl.load(SRT + roff + (probe - 1).to(tl.int64), mask=ok, other=INF)
            cnt = tl.where(ok & (q <= v), probe, cnt)
            step = step // 2
        logw = tl.where(in_set, _bayes_logw(cnt.to(ACC), nset, bb, a4, b, al, al1, h1, h2, hden, tm, tp), -INF)
        live = logw > -INF
        x = tl.where(live, logw + c * tl.where(live, v, 0.0), -INF)
        if BWD:
            gt = tl.where(live & (kc != 0.0), kc * tl.exp(tl.where(live, x - lse, -INF)), 0.0)
            gt += tl.where(cols[None, :] == part, cpos, 0.0)
            tl.store(G + roff + ci[None, :], gt, mask=mk)
        else:
            m, acc = _lse_update(m, acc, x)
    if not BWD:
        if SPLIT:
            w = PART + tl.program_id(1).to(tl.int64) * M + ri
            tl.store(w, m, mask=rmask)
            tl.store(w + tl.num_programs(1).to(tl.int64) * M, acc, mask=rmask)
        else:
            tl.store(LSE + ri, tl.where(poisoned, float("nan"), _lse_final(m, acc)), mask=rmask)


# ----------------------------------------------------------------------------------------------
# backward, row-parallel part: dA_i = inv_tau · Σ_j G_ij C_j
# ----------------------------------------------------------------------------------------------
@triton.jit
def ssl_bwd_da_kernel(A, C, PARTNER, LSE, COEF, CPOS, GS, OUT,
                      M, N, D, stride_a, stride_c, self_offset, p_inv_tau, p_c0, p_c1, p_lower, p_upper,
                      K2: tl.constexpr, FILTER: tl.constexpr, EXCL_PARTNER: tl.constexpr, INCL_SELF: tl.constexpr,
                      G_STRIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    """OUT [M, D] in the accumulation dtype (cast by the host). LSE/COEF [K2 + 1, M] (row stride M), CPOS [M];
    with G_STRIP, G is read from GS [M, N] (row stride N) instead of being recomputed."""
    ACC: tl.constexpr = OUT.dtype.element_ty
    rows, rmask, ri = _block(tl.program_id(0) * BLOCK_M, BLOCK_M, M)
    inv_tau, c0, c1, lower, upper = _ssl_params(p_inv_tau, p_c0, p_c1, p_lower, p_upper, ACC)
    part, l0, k0, l1, k1, cpos = _ssl_row_stats(PARTNER, LSE, COEF, CPOS, ri, rmask, M, K2)
    a_res, acc = _resident_rows(A, ri, rmask, stride_a, D, ACC, BLOCK_M, BLOCK_D)  # (a_res unused with G_STRIP)
    for n0 in range(0, N, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, N)
        if G_STRIP:
            g = tl.load(GS + ri[:, None] * N + ci[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            gd = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                         SINGLE_D, PREC, UPCAST)
            g = _ssl_grad_tile(gd, rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], part, l0, k0, l1, k1,
                               cpos, self_offset, inv_tau, c0, c1, lower, upper, 1, K2, FILTER, EXCL_PARTNER, INCL_SELF)
        acc = _gy_step(g, C, ci, cmask, stride_c, acc, OUT, ri, rmask, n0, D, ACC, BLOCK_D, SINGLE_D, PREC, UPCAST)
    _write_rows(OUT, ri, rmask, acc, inv_tau, D, BLOCK_D, SINGLE_D)


# ----------------------------------------------------------------------------------------------
# backward, column-parallel part: dC_j = inv_tau · Σ_i G_ij A_i (the tile is formed transposed, Gᵀ)
# ----------------------------------------------------------------------------------------------
@triton.jit
def ssl_bwd_dc_kernel(A, C, PARTNER, LSE, COEF, CPOS, GS, OUT,
                      M, N, D, stride_a, stride_c, self_offset, p_inv_tau, p_c0, p_c1, p_lower, p_upper,
                      K2: tl.constexpr, FILTER: tl.constexpr, EXCL_PARTNER: tl.constexpr, INCL_SELF: tl.constexpr,
                      G_STRIP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    """OUT [N, D]: a program owns BLOCK_N columns and sweeps anchor-row tiles of BLOCK_M."""
    ACC: tl.constexpr = OUT.dtype.element_ty
    cols, cmask, ci = _block(tl.program_id(0) * BLOCK_N, BLOCK_N, N)
    inv_tau, c0, c1, lower, upper = _ssl_params(p_inv_tau, p_c0, p_c1, p_lower, p_upper, ACC)
    c_res, acc = _resident_rows(C, ci, cmask, stride_c, D, ACC, BLOCK_N, BLOCK_D)  # (c_res unused with G_STRIP)
    for m0 in range(0, M, BLOCK_M):
        rows, rmask, ri = _block(m0, BLOCK_M, M)
        if G_STRIP:
            g = tl.load(GS + ri[None, :] * N + ci[:, None], mask=rmask[None, :] & cmask[:, None], other=0.0)
        else:
            part, l0, k0, l1, k1, cpos = _ssl_row_stats(PARTNER, LSE, COEF, CPOS, ri, rmask, M, K2)
            gd = _s_tile(C, A, ci, ri, cmask, rmask, D, stride_c, stride_a, c_res, ACC, BLOCK_N, BLOCK_M, BLOCK_D,
                         SINGLE_D, PREC, UPCAST)
            g = _ssl_grad_tile(gd, rows[None, :], cols[:, None], rmask[None, :], cmask[:, None], part, l0, k0, l1, k1,
                               cpos, self_offset, inv_tau, c0, c1, lower, upper, 0, K2, FILTER, EXCL_PARTNER, INCL_SELF)
        acc = _gy_step(g, A, ri, rmask, stride_a, acc, OUT, ci, cmask, m0, D, ACC, BLOCK_D, SINGLE_D, PREC, UPCAST)
    _write_rows(OUT, ci, cmask, acc, inv_tau, D, BLOCK_D, SINGLE_D)


# ----------------------------------------------------------------------------------------------
# backward, symmetric case (the anchors are the columns: C is A, self_offset = 0; unit weights)
# ----------------------------------------------------------------------------------------------
# dX_i = inv_tau · Σ_j (G_ij + G_ji) X_j   (program = BLOCK_M rows i, sweep over column tiles j of BLOCK_N), with
# G_ij = Σ_k 1[j∈set(i)] coef_ki c_k exp(c_k s_ij − lse_ki) + 1[j = partner(i)] cpos_i. S is symmetric (and so is
# the filter on g), so one recomputed tile s_ij = s_ji serves both halves: G_ij from rows i's (lse, coef, cpos,
# partner) as in dA, G_ji from rows j's as in dC (row j's masks: self i = j, partner(j) = i), by the same
# ``_ssl_grad_tile``. Two GEMM-equivalents (S, (G + Gᵀ) X) instead of four; every output row is owned by one
# program (deterministic, no atomics). OUT: [N, D] in the accumulation dtype (cast by the host). Split sweep (SPLIT,
# few row blocks, ``ops.sym_grid``): program (I, k) sweeps the column range k only, into slab k of OUT [n_split, N, D].
@triton.jit
def ssl_bwd_sym_kernel(X, PARTNER, LSE, COEF, CPOS, OUT, N, D, stride_x, p_inv_tau, p_c0, p_c1, p_lower, p_upper,
                       n_per, K2: tl.constexpr, FILTER: tl.constexpr, EXCL_PARTNER: tl.constexpr,
                       INCL_SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False,
                       SPLIT: tl.constexpr = False):
    ACC: tl.constexpr = OUT.dtype.element_ty
    n_lo, n_hi = _split_range(N, n_per, SPLIT)
    rows, rmask, ri = _block(tl.program_id(0) * BLOCK_M, BLOCK_M, N)
    inv_tau, c0, c1, lower, upper = _ssl_params(p_inv_tau, p_c0, p_c1, p_lower, p_upper, ACC)
    part_i, l0_i, k0_i, l1_i, k1_i, cpos_i = _ssl_row_stats(PARTNER, LSE, COEF, CPOS, ri, rmask, N, K2)
    # self_offset = 0 as a tensor (the interpreter of Triton 3.3 cannot mask with a Python bool)
    zero = tl.zeros([1, 1], tl.int32)
    x_res, acc = _resident_rows(X, ri, rmask, stride_x, D, ACC, BLOCK_M, BLOCK_D)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, N)
        gd = _s_tile(X, X, ri, ci, rmask, cmask, D, stride_x, stride_x, x_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                     SINGLE_D, PREC, UPCAST)
        g = _ssl_grad_tile(gd, rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], part_i, l0_i, k0_i, l1_i,
                           k1_i, cpos_i, zero, inv_tau, c0, c1, lower, upper, 1, K2, FILTER, EXCL_PARTNER, INCL_SELF)
        part_j, l0_j, k0_j, l1_j, k1_j, cpos_j = _ssl_row_stats(PARTNER, LSE, COEF, CPOS, ci, cmask, N, K2)
        g += _ssl_grad_tile(gd, cols[None, :], rows[:, None], cmask[None, :], rmask[:, None], part_j, l0_j, k0_j, l1_j,
                            k1_j, cpos_j, zero, inv_tau, c0, c1, lower, upper, 0, K2, FILTER, EXCL_PARTNER, INCL_SELF)
        acc = _gy_step(g, X, ci, cmask, stride_x, acc, _slab(OUT, N, D, SPLIT), ri, rmask, n0 - n_lo, D, ACC, BLOCK_D,
                       SINGLE_D, PREC, UPCAST)
    _write_rows(_slab(OUT, N, D, SPLIT), ri, rmask, acc, inv_tau, D, BLOCK_D, SINGLE_D)
