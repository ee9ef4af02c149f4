"""Fused Triton kernels of the row-statistics engine (``ltcl_fused/engine/contract.py``).

Notation (SPEC.md / contract): anchors A [M, D], columns C [N, D], ``s_ij = inv_tau·<A_i, C_j>``,
``b_ij = bias_same[j]`` if j ∈ P(i) else ``bias_other[j]`` (0 without bias), self column
``j == i + self_offset`` removed when ``self_offset >= 0``, ``log p_ij = s_ij + b_ij − lse_i`` except at
the row's dominant column ``top_i``, where log p and log(1 − p) come from ``lrest_i`` (contract v2).

One forward kernel (streaming masked LSE as (max, first argmax, the other columns' max and scaled sum)
+ positive sum; FOCAL adds a second sweep for the focal sums)
and one backward family (dA row-parallel, dC column-parallel) with compile-time variants:
HAS_BIAS, FOCAL, GAMMA_ZERO, SINGLE_D (D fits in one BLOCK_D chunk: operands/accumulators stay in
registers; otherwise D is swept in BLOCK_D chunks and the dA/dC rows owned by a program are
accumulated in an fp32/fp64 workspace, read-modify-write by that program only: deterministic, no
atomics). S tiles are never stored: they are recomputed by ``tl.dot`` over D chunks.

The kernels use only ``tl.exp``/``tl.log`` (log1p is built with Kahan's trick, log(1 − p) from one log and one
reciprocal) so that the very same code runs under the Triton interpreter (where libdevice is unavailable) and on
the GPU. Per element of a focal tile: the forward's pass 1 one exp, pass 2 one exp, one log, one reciprocal and
(γ ≠ 0) one exp; the backward the same four (``tests/test_triton_transcendentals.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: XOR mask of the fp64 parameter bit patterns (see _param and ops.kernel_param)
PARAM_XOR = tl.constexpr(0x7FFC000000000000)


# ----------------------------------------------------------------------------------------------
# elementwise helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _log1p(y):
    """log(1 + y), accurate near 0 (Kahan: log(u)·y / (u − 1))."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _softplus(z):
    """log(1 + e^z) to rounding for every z (the contract's softplus: no threshold)."""
    return tl.where(z > 0.0, z + _log1p(tl.exp(-tl.abs(z))), _log1p(tl.exp(-tl.abs(z))))


@triton.jit
def _log1m_ratio(p):
    """(log(1 − p), p/(1 − p)) of p ∈ [0, 1] with one log and one reciprocal, elementwise.

    u = fl(1 − p) and its rounding error c = (u − 1) + p are exact (Sterbenz: u ∈ [1/2, 1] for p <= 1/2, and
    1 − p is exact for p >= 1/2; the error of a sum is representable), so log(1 − p) = log(u − c) =
    log u − t − t²/2, t = c/u (|t| <= 2⁻²⁴ in fp32: the next term is far below rounding). p tiny (u = 1):
    −p exactly; p = 0: (0, 0); p = 1: (−inf, inf); NaN in, NaN out."""
    u = 1.0 - p
    inv_u = 1.0 / u
    c = (u - 1.0) + p
    t = tl.where(c == 0.0, 0.0, c * inv_u)
    return tl.log(u) - t * (1.0 + 0.5 * t), p * inv_u


@triton.jit
def _focal_tile(logp, p, gamma, GAMMA_ZERO: tl.constexpr):
    """(f⁺, f⁻, u⁺, u⁻)(p) of the contract off the dominant column (p <= 1/2), elementwise from log p and p:
    one log and one reciprocal (``_log1m_ratio``) and, for γ ≠ 0, w = (1 − p)^γ = exp(γ log(1 − p)).
    u⁺ = −w (1 + γ ρ), ρ = −p log p/(1 − p) = −log p · u⁻. The dominant column's values are row vectors
    (``_row_top_terms``) selected by the caller: a tile never evaluates the dominant-column formulas."""
    l1mp, uneg = _log1m_ratio(p)
    if GAMMA_ZERO:
        fpos = -logp
        upos = tl.full(logp.shape, -1.0, logp.dtype)
    else:
        w = tl.exp(gamma * l1mp)
        fpos = -w * logp
        upos = -w * (1.0 - gamma * (logp * uneg))
    return fpos, -l1mp, upos, uneg


@triton.jit
def _masks(rows, cols, rmask, cmask, alab, clab, self_offset):
    """valid (j ∈ A(i)), pos (j ∈ P(i)), neg (j ∈ N(i)); all arguments already broadcast to 2-D."""
    valid = rmask & cmask & ((cols != rows + self_offset) | (self_offset < 0))
    same = alab == clab
    return valid, valid & same, valid & (alab != clab)


@triton.jit
def _param(x, ACC: tl.constexpr):
    """A float parameter of the kernel (τ⁻¹, γ, …) as the host passes it (``ops.kernel_param``): fp32 kernels
    get the Python float itself (Triton types it fp32); fp64 kernels get its IEEE-754 bit pattern XOR PARAM_XOR
    as an int64 (exact, and one compiled signature for every value: see support.kernel_param)."""
    if ACC == tl.float64:
        v = (x.to(tl.int64) ^ PARAM_XOR).to(tl.float64, bitcast=True)
    else:
        v = x
    return v


@triton.jit
def _mma(x, y, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """x @ y accumulated in ACC. UPCAST (interpreter only: its bf16 tl.dot is wrong) multiplies the same
    bf16 values in fp32, which is exact, so the numerics match the bf16 tensor-core path."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _mma_acc(x, y, acc, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y in ACC (as _mma; a separate function because Triton <= 3.3 rejects a None accumulator)."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _gy_registers(g, Y, yi, ymask, stride_y, acc, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One tile's share of a backward product held in registers (SINGLE_D): ``acc + Σ_y G_oy Y_y``
    (dA: Y = C; dC: G transposed, Y = A)."""
    offs_d = tl.arange(0, BLOCK_D)
    y = tl.load(Y + yi[:, None] * stride_y + offs_d[None, :], mask=ymask[:, None] & (offs_d[None, :] < D), other=0.0)
    return _mma_acc(g.to(y.dtype), y, acc, ACC, PREC, UPCAST)


@triton.jit
def _gy_workspace(g, Y, yi, ymask, stride_y, OUT, oi, omask, t0, D, ACC: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The same share with D swept in BLOCK_D chunks: ``OUT[oi] += Σ_y G_oy Y_y`` in the fp32/fp64 workspace
    OUT, whose rows ``oi`` belong to this program only (deterministic, no atomics). ``t0`` is the swept tile's
    first index: OUT is not read on the first tile (t0 = 0; the host zero-initialises it all the same).
    Returns nothing (Triton <= 3.6 rejects a None return)."""
    # as a tensor: the interpreter of Triton 3.3 cannot mask with a Python bool
    not_first = ((oi * 0 + t0) > 0)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dm = dd[None, :] < D
        y = tl.load(Y + yi[:, None] * stride_y + dd[None, :], mask=ymask[:, None] & dm, other=0.0)
        part = _mma(g.to(y.dtype), y, ACC, PREC, UPCAST)
        optr = OUT + oi[:, None] * D + dd[None, :]
        om = omask[:, None] & dm
        prev = tl.load(optr, mask=om & not_first, other=0.0)
        tl.store(optr, prev + part, mask=om)
    tl.debug_barrier()


@triton.jit
def _resident_rows(X, xi, xmask, stride_x, D, ACC: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr):
    """(the X rows ``xi`` [BLOCK_X, BLOCK_D], a zero accumulator of that shape in ACC): what a SINGLE_D program
    keeps in registers (its resident operand of ``_s_tile`` and its output rows). With chunked D neither is
    used (``_s_tile`` sweeps D itself, ``_gy_step`` returns the accumulator unchanged) and the compiler drops
    both."""
    return _load_rows(X, xi, xmask, stride_x, D, BLOCK_D), tl.zeros([BLOCK_X, BLOCK_D], ACC)


@triton.jit
def _gy_step(g, Y, yi, ymask, stride_y, acc, OUT, oi, omask, t0, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
             SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One swept tile's share of a backward product ``Σ_y G_oy Y_y``: SINGLE_D, into the register accumulator
    (``_gy_registers``, returned); else into the workspace rows ``oi`` of OUT (``_gy_workspace``; ``acc`` is
    returned unchanged)."""
    if SINGLE_D:
        acc = _gy_registers(g, Y, yi, ymask, stride_y, acc, D, ACC, BLOCK_D, PREC, UPCAST)
    else:
        _gy_workspace(g, Y, yi, ymask, stride_y, OUT, oi, omask, t0, D, ACC, BLOCK_D, PREC, UPCAST)
    return acc


@triton.jit
def _store_rows(OUT, oi, omask, val, D, BLOCK_D: tl.constexpr):
    """``OUT[oi] = val`` for a [rows, BLOCK_D] register tile (SINGLE_D)."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(OUT + oi[:, None] * D + offs_d[None, :], val, mask=omask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _scale_rows(OUT, oi, omask, D, scale, BLOCK_D: tl.constexpr):
    """``OUT[oi] *= scale`` in place, D swept in BLOCK_D chunks (the chunked-D workspace)."""
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        optr = OUT + oi[:, None] * D + dd[None, :]
        om = omask[:, None] & (dd[None, :] < D)
        tl.store(optr, tl.load(optr, mask=om, other=0.0) * scale, mask=om)


@triton.jit
def _block(start, BLOCK: tl.constexpr, n):
    """The indices [start, start + BLOCK) of a tile: (idx, idx < n, idx as int64)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < n, idx.to(tl.int64)


@triton.jit
def _program_block(n, p_inv_tau, p_gamma, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The BLOCK rows (or columns) owned by this program, ``_block`` of program_id(0), and the kernel's float
    parameters: (idx, mask, idx int64, inv_tau, gamma)."""
    idx, mask, i64 = _block(tl.program_id(0) * BLOCK, BLOCK, n)
    return idx, mask, i64, _param(p_inv_tau, ACC), _param(p_gamma, ACC)


@triton.jit
def _split_range(N, n_per, SPLIT: tl.constexpr):
    """The column range [n_lo, n_hi) of program_id(1) in a split sweep (``ops.split_plan``: the forward's passes,
    the Bayesian weighting pass, the symmetric backward) when SPLIT, else the whole sweep [0, N)."""
    if SPLIT:
        n_lo = tl.program_id(1) * n_per
        n_hi = tl.minimum(n_lo + n_per, N)
    else:
        n_lo = 0
        n_hi = N
    return n_lo, n_hi


@triton.jit
def _slab(OUT, N, D, SPLIT: tl.constexpr):
    """Slab program_id(1) of a split backward's output [n_split, N, D] (SPLIT; else OUT itself), formed where it
    is used (with SINGLE_D only by the last store: no register held across the sweep)."""
    if SPLIT:
        OUT = OUT + tl.program_id(1).to(tl.int64) * N * D
    return OUT


@triton.jit
def _load_rows(X, xi, xmask, stride_x, D, BLOCK_D: tl.constexpr):
    """The rows ``xi`` of X as one [rows, BLOCK_D] register tile (SINGLE_D: the program's resident operand)."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(X + xi[:, None] * stride_x + offs_d[None, :], mask=xmask[:, None] & (offs_d[None, :] < D),
                   other=0.0)


@triton.jit
def _bias_pair(BS, BO, idx, mask, AX: tl.constexpr):
    """(bias_same, bias_other) of the columns ``idx`` as vectors expanded along axis AX (0: a row [1, n] of a
    [rows, columns] tile; 1: a column [n, 1] of a transposed one)."""
    bs = tl.load(BS + idx, mask=mask, other=0.0)
    bo = tl.load(BO + idx, mask=mask, other=0.0)
    return tl.expand_dims(bs, AX), tl.expand_dims(bo, AX)


@triton.jit
def _write_rows(OUT, oi, omask, acc, scale, D, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    """The backward's last step on the rows ``oi`` of OUT: ``scale · acc`` stored from registers (SINGLE_D) or the
    workspace scaled in place."""
    if SINGLE_D:
        _store_rows(OUT, oi, omask, acc * scale, D, BLOCK_D)
    else:
        _scale_rows(OUT, oi, omask, D, scale, BLOCK_D)


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
        acc = _mma(x_res, tl.trans(y), ACC, PREC, UPCAST)
    else:
        acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            dm = dd[None, :] < D
            x = tl.load(X + xi[:, None] * stride_x + dd[None, :], mask=xmask[:, None] & dm, other=0.0)
            y = tl.load(Y + yi[:, None] * stride_y + dd[None, :], mask=ymask[:, None] & dm, other=0.0)
            acc = _mma_acc(x, tl.trans(y), acc, ACC, PREC, UPCAST)
    return acc


@triton.jit
def _grad_tile(x, valid, pos, neg, is_top, lse_safe, lrest, rest, gt_pos, gt_neg, cpos, cposf, cneg, r, rt, gamma,
               FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr):
    """G of the backward contract on a tile of logits x = s + b (all other arguments broadcast to 2-D: the row's
    statistics lse, lrest, rest = e^lrest, its coefficients and G at its dominant column, ``_row_grad_top``):
    j ≠ top: 1[P](cpos + cposf u⁺) + 1[N] cneg u⁻ − r p − rt p/rest;  j = top: gt_pos (j ∈ P) or gt_neg;  0 off A(i).
    FOCAL forms e = p/rest = exp(log p − lrest) <= 1 and p = e·rest (one exp; 1/rest may overflow), then
    u⁻ and u⁺ from p (``_focal_tile``: one reciprocal, and for γ ≠ 0 one log and one exp). A term with a zero
    coefficient contributes exactly 0."""
    logp = tl.where(valid & (is_top == 0), x - lse_safe, -1.0)
    if FOCAL:
        e = tl.exp(logp - lrest)
        p = e * rest
        _fp, _fn, up, un = _focal_tile(logp, p, gamma, GAMMA_ZERO)
        g = tl.where(pos, cpos, 0.0) - r * p - tl.where(rt == 0.0, 0.0, rt * e)
        g += tl.where(pos & (cposf != 0.0), cposf * up, 0.0)
        g += tl.where(neg & (cneg != 0.0), cneg * un, 0.0)
    else:
        g = tl.where(pos, cpos, 0.0) - r * tl.exp(logp)
    g = tl.where(is_top, tl.where(pos, gt_pos, gt_neg), g)
    return tl.where(valid, g, 0.0)


@triton.jit
def _grad_tile_stats(x, valid, pos, neg, other_idx, lse_safe, top, lrest, rest, gt_pos, gt_neg, cpos, cposf, cneg,
                     r, rt, gamma, SAX: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr):
    """``_grad_tile`` with the statistics of the tile's statistic-owning rows given as vectors (``_bwd_row_stats``)
    along the tile's axis 1 − SAX: SAX = 1 for a [rows, columns] tile (dA), 0 for a [columns, rows] one (dC, and
    the transposed half of the symmetric kernel). ``other_idx``: the column index of each element (2-D)."""
    is_top = valid & (other_idx == tl.expand_dims(top, SAX))
    return _grad_tile(x, valid, pos, neg, is_top, tl.expand_dims(lse_safe, SAX), tl.expand_dims(lrest, SAX),
                      tl.expand_dims(rest, SAX), tl.expand_dims(gt_pos, SAX), tl.expand_dims(gt_neg, SAX),
                      tl.expand_dims(cpos, SAX), tl.expand_dims(cposf, SAX), tl.expand_dims(cneg, SAX),
                      tl.expand_dims(r, SAX), tl.expand_dims(rt, SAX), gamma, FOCAL, GAMMA_ZERO)


@triton.jit
def _bwd_row_stats(LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, ri, rmask, gamma, FOCAL: tl.constexpr,
                   GAMMA_ZERO: tl.constexpr):
    """The saved statistics and backward coefficients of rows ``ri`` (vectors), with G at their dominant column:
    (lse_safe, top, lrest, rest, gt_pos, gt_neg, cpos, cposf, cneg, r, rt); without FOCAL cposf/cneg/rt are
    placeholders (unused)."""
    lse = tl.load(LSE + ri, mask=rmask, other=0.0)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    top = tl.load(TOP + ri, mask=rmask, other=-1).to(tl.int32)
    lrest = tl.load(LREST + ri, mask=rmask, other=0.0)
    cpos = tl.load(CPOS + ri, mask=rmask, other=0.0)
    r = tl.load(R + ri, mask=rmask, other=0.0)
    if FOCAL:
        cposf = tl.load(CPOSF + ri, mask=rmask, other=0.0)
        cneg = tl.load(CNEG + ri, mask=rmask, other=0.0)
        rt = tl.load(RT + ri, mask=rmask, other=0.0)
    else:
        cposf = cpos
        cneg = cpos
        rt = cpos
    gt_pos, gt_neg = _row_grad_top(lrest, cpos, cposf, cneg, r, gamma, FOCAL, GAMMA_ZERO)
    return lse_safe, top, lrest, tl.exp(lrest), gt_pos, gt_neg, cpos, cposf, cneg, r, rt


@triton.jit
def _row_grad_top(lrest, cpos, cposf, cneg, r, gamma, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr):
    """G at the rows' dominant column (vectors), if it is a positive / a negative of the row:
    cpos + cposf u⁺(p) − r p  and  cneg p [|A(i)| >= 2] − r p, p and u⁺ from lrest (``_row_top_terms``)."""
    _lp, _l1mp, p_top, _fp, up_top = _row_top_terms(lrest, gamma, GAMMA_ZERO)
    gt_pos = cpos - r * p_top
    gt_neg = 0.0 - r * p_top
    if FOCAL:
        gt_pos += tl.where(cposf != 0.0, cposf * up_top, 0.0)
        gt_neg += tl.where(cneg != 0.0, cneg * tl.where(lrest > float("-inf"), p_top, 0.0), 0.0)
    return gt_pos, gt_neg


@triton.jit
def _row_top_terms(lrest, gamma, GAMMA_ZERO: tl.constexpr):
    """The row's dominant column, on row vectors: (log p, log(1 − p), p, f⁺, u⁺) with log p = −softplus(lrest),
    log(1 − p) = −softplus(−lrest) (exact even when p rounds to 1), w = (1 − p)^γ and u⁺ = −w (1 + γ ρ),
    ρ = −q log q/(1 − q) = softplus(lrest)·e^(−lrest) (→ 1 − e^lrest/2 as lrest → −inf)."""
    sp = _softplus(lrest)
    l1mp = -_softplus(-lrest)
    if GAMMA_ZERO:
        fpos = sp
        upos = tl.full(lrest.shape, -1.0, lrest.dtype)
    else:
        rho = tl.where(lrest < -20.0, 1.0 - 0.5 * tl.exp(lrest), sp * tl.exp(-tl.maximum(lrest, -20.0)))
        w = tl.exp(gamma * l1mp)
        fpos = w * sp
        upos = -w * (1.0 + gamma * rho)
    return -sp, l1mp, tl.exp(-sp), fpos, upos


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
# Per anchor row i (program = BLOCK_M rows, sweep over column tiles of BLOCK_N), x_ij = s_ij + b_ij:
#   pass 1: m_i = max_{A(i)} x_ij, top_i = first argmax, and the other columns' LSE as m2_i = their max,
#           s2_i = Σ_{A(i), j≠top} exp(x_ij − m2_i) (streamed over tiles as in the contract: a tile's top either
#           takes over, the old top joining the rest, or joins the rest itself), lrest_i = m2_i − m_i + log s2_i
#           (exact at any lead), lse_i = m_i + softplus(lrest_i), pos_sum_i = Σ_{j∈P(i)} s_ij; a row with a NaN
#           or +inf logit, or only −inf ones, gets NaN statistics (poisoned)
#   pass 2 (FOCAL): with log p_ij = x_ij − lse_i (j ≠ top) or −softplus(lrest_i) (j = top),
#           fpos_i = Σ_P f⁺(p_ij), fneg_i = Σ_N f⁻(p_ij), upos_i = Σ_P u⁺(p_ij), uneg_i = Σ_{N, j≠top} u⁻(p_ij)
@triton.jit
def _merge_top(m_i, top, m2, s2, tm, tj, tm2, ts2):
    """Streaming (m, top, m2, s2) ← merged with a later block of columns given as its (max tm, first argmax tj,
    the other columns' max tm2 and Σ exp(x − tm2) ts2; ts2 = 0 when tm2 = −inf). The block's top takes over only
    when strictly greater (the first argmax), the old top then joining the rest; otherwise the block's top joins
    the rest. Used per column tile and to merge the partials of a split sweep (the same arithmetic)."""
    better = tm > m_i
    jm = tl.where(better, m_i, tm)  # the one column that joins the rest: the old top, or the block's top
    nm2 = tl.maximum(tl.maximum(m2, jm), tm2)
    nm2s = tl.where(nm2 == float("-inf"), 0.0, nm2)
    s2 = s2 * tl.exp(m2 - nm2s) + tl.exp(jm - nm2s) + ts2 * tl.exp(tm2 - nm2s)
    top = tl.where(better, tj, top)
    m_i = tl.where(better, tm, m_i)
    return m_i, top, nm2, s2


@triton.jit
def _finish_stats(m_i, top, m2, s2, rows, N, self_offset):
    """(lse, lrest, top, poisoned) of rows from their (m, top, m2, s2) over all N columns (contract: a row with a
    NaN or +inf logit, or only −inf ones, is poisoned: NaN statistics, top −1)."""
    n_self = tl.where((self_offset >= 0) & (rows + self_offset < N), 1, 0)
    poisoned = (s2 != s2) | (m_i == float("inf")) | ((N - n_self > 0) & (m_i == float("-inf")))
    empty = m_i == float("-inf")
    lrest = tl.where(empty | (m2 == float("-inf")), float("-inf"), (m2 - m_i) + tl.log(s2))
    lse = tl.where(empty, float("-inf"), m_i + _softplus(lrest))
    lse = tl.where(poisoned, float("nan"), lse)
    lrest = tl.where(poisoned, float("nan"), lrest)
    top = tl.where(poisoned, -1, top)
    return lse, lrest, top, poisoned


@triton.jit
def _fwd_sweep1(A, C, CLAB, BS, BO, rows, ri, rmask, alab, a_res, n_lo, n_hi, D, stride_a, stride_c, self_offset,
                inv_tau, ACC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 1 over the columns [n_lo, n_hi): (m, top, m2, s2, pos_sum) of the rows."""
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    m2 = tl.full([BLOCK_M], float("-inf"), ACC)
    s2 = tl.zeros([BLOCK_M], ACC)
    top = tl.full([BLOCK_M], -1, tl.int32)
    psum = tl.zeros([BLOCK_M], ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, n_hi)
        clab = tl.load(CLAB + ci, mask=cmask, other=-1)
        s = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                    SINGLE_D, PREC, UPCAST) * inv_tau
        valid, pos, neg = _masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], alab[:, None],
                                 clab[None, :], self_offset)
        psum += tl.sum(tl.where(pos, s, 0.0), 1)
        if HAS_BIAS:
            bs, bo = _bias_pair(BS, BO, ci, cmask, 0)
            s = s + tl.where(pos, bs, bo)
        x = tl.where(valid, s, float("-inf"))
        # the tile's max and first argmax as one pair (tm = x at tj even when a NaN is present)
        tm, tj = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
        tj = n0 + tj.to(tl.int32)
        other = valid & (cols[None, :] != tj[:, None])
        x2 = tl.where(other, x, float("-inf"))
        tm2 = tl.max(x2, 1)
        tm2s = tl.where(tm2 == float("-inf"), 0.0, tm2)
        ts2 = tl.sum(tl.where(other, tl.exp(x2 - tm2s[:, None]), 0.0), 1)  # a NaN logit lands here or in tm
        m_i, top, m2, s2 = _merge_top(m_i, top, m2, s2, tm, tj, tm2, ts2)
    return m_i, top, m2, s2, psum


@triton.jit
def _fwd_sweep2(A, C, CLAB, BS, BO, rows, ri, rmask, alab, a_res, n_lo, n_hi, D, stride_a, stride_c, self_offset,
                inv_tau, gamma, lse, top, lrest, ACC: tl.constexpr, HAS_BIAS: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 2 over the columns [n_lo, n_hi) given the rows' final (lse, top, lrest): (fpos, fneg, upos, uneg)."""
    lse_safe = tl.where(lse != float("-inf"), lse, 0.0)[:, None]
    _lp_top, l1mp_top, _p_top, fp_top, up_top = _row_top_terms(lrest, gamma, GAMMA_ZERO)
    fn_top = -l1mp_top[:, None]
    fp_top = fp_top[:, None]
    up_top = up_top[:, None]
    fpos = tl.zeros([BLOCK_M], ACC)
    fneg = tl.zeros([BLOCK_M], ACC)
    upos = tl.zeros([BLOCK_M], ACC)
    uneg = tl.zeros([BLOCK_M], ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, n_hi)
        clab = tl.load(CLAB + ci, mask=cmask, other=-1)
        s = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N,
                    BLOCK_D, SINGLE_D, PREC, UPCAST) * inv_tau
        valid, pos, neg = _masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], alab[:, None],
                                 clab[None, :], self_offset)
        if HAS_BIAS:
            bs, bo = _bias_pair(BS, BO, ci, cmask, 0)
            s = s + tl.where(pos, bs, bo)
        is_top = valid & (cols[None, :] == top[:, None])
        logp = tl.where(valid & (is_top == 0), s - lse_safe, -1.0)
        fp, fn, up, un = _focal_tile(logp, tl.exp(logp), gamma, GAMMA_ZERO)
        fp = tl.where(is_top, fp_top, fp)
        fn = tl.where(is_top, fn_top, fn)
        up = tl.where(is_top, up_top, up)
        fpos += tl.sum(tl.where(pos, fp, 0.0), 1)
        fneg += tl.sum(tl.where(neg, fn, 0.0), 1)
        upos += tl.sum(tl.where(pos, up, 0.0), 1)
        uneg += tl.sum(tl.where(neg & (is_top == 0), un, 0.0), 1)
    return fpos, fneg, upos, uneg


# PASS (compile time): 0 = the whole forward in one kernel (pass 1, the row statistics, pass 2 when FOCAL), one
# program per BLOCK_M rows. A split sweep (few row blocks: ``ops.split_count``) runs program (i, k) over the
# columns [k·n_per, (k+1)·n_per) only: PASS = 1 writes its partial (m, m2, s2, pos_sum) to WS[k] and top to
# WTOP[k], ``rowstats_fwd_merge_kernel`` merges them in k order (deterministic) into the row statistics, then
# PASS = 2 writes the partial focal sums from those statistics to WS[k] and ``rowstats_fwd_sum_kernel`` adds them
# in k order. WS: [n_split, 4, M] in the accumulation dtype, WTOP: [n_split, M] int64 (unused with PASS = 0).
@triton.jit
def rowstats_fwd_kernel(A, C, ALAB, CLAB, BS, BO, LSE, POS, FPOS, FNEG, UPOS, UNEG, TOP, LREST,
                        M, N, D, stride_a, stride_c, self_offset, p_inv_tau, p_gamma,
                        HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False,
                        WS=None, WTOP=None, n_per=0, PASS: tl.constexpr = 0):
    ACC: tl.constexpr = LSE.dtype.element_ty
    rows, rmask, ri, inv_tau, gamma = _program_block(M, p_inv_tau, p_gamma, ACC, BLOCK_M)
    alab = tl.load(ALAB + ri, mask=rmask, other=-1)
    a_res = None
    if SINGLE_D:
        a_res = _load_rows(A, ri, rmask, stride_a, D, BLOCK_D)
    if PASS == 0:
        m_i, top, m2, s2, psum = _fwd_sweep1(A, C, CLAB, BS, BO, rows, ri, rmask, alab, a_res, 0, N, D, stride_a,
                                             stride_c, self_offset, inv_tau, ACC, HAS_BIAS, BLOCK_M, BLOCK_N,
                                             BLOCK_D, SINGLE_D, PREC, UPCAST)
        lse, lrest, top, poisoned = _finish_stats(m_i, top, m2, s2, rows, N, self_offset)
        tl.store(LSE + ri, lse, mask=rmask)
        tl.store(POS + ri, psum, mask=rmask)
        tl.store(TOP + ri, top.to(tl.int64), mask=rmask)
        tl.store(LREST + ri, lrest, mask=rmask)
        if FOCAL:
            fpos, fneg, upos, uneg = _fwd_sweep2(A, C, CLAB, BS, BO, rows, ri, rmask, alab, a_res, 0, N, D,
                                                 stride_a, stride_c, self_offset, inv_tau, gamma, lse, top, lrest,
                                                 ACC, HAS_BIAS, GAMMA_ZERO, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D,
                                                 PREC, UPCAST)
            tl.store(FPOS + ri, tl.where(poisoned, float("nan"), fpos), mask=rmask)
            tl.store(FNEG + ri, tl.where(poisoned, float("nan"), fneg), mask=rmask)
            tl.store(UPOS + ri, tl.where(poisoned, float("nan"), upos), mask=rmask)
            tl.store(UNEG + ri, tl.where(poisoned, float("nan"), uneg), mask=rmask)
    else:
        n_lo, n_hi = _split_range(N, n_per, True)
        k = tl.program_id(1).to(tl.int64)
        w = WS + k * 4 * M + ri
        if PASS == 1:
            m_i, top, m2, s2, psum = _fwd_sweep1(A, C, CLAB, BS, BO, rows, ri, rmask, alab, a_res, n_lo, n_hi, D,
                                                 stride_a, stride_c, self_offset, inv_tau, ACC, HAS_BIAS, BLOCK_M,
                                                 BLOCK_N, BLOCK_D, SINGLE_D, PREC, UPCAST)
            tl.store(w, m_i, mask=rmask)
            tl.store(w + M, m2, mask=rmask)
            tl.store(w + 2 * M, s2, mask=rmask)
            tl.store(w + 3 * M, psum, mask=rmask)
            tl.store(WTOP + k * M + ri, top.to(tl.int64), mask=rmask)
        else:
            lse = tl.load(LSE + ri, mask=rmask, other=0.0)
            top = tl.load(TOP + ri, mask=rmask, other=-1).to(tl.int32)
            lrest = tl.load(LREST + ri, mask=rmask, other=0.0)
            fpos, fneg, upos, uneg = _fwd_sweep2(A, C, CLAB, BS, BO, rows, ri, rmask, alab, a_res, n_lo, n_hi, D,
                                                 stride_a, stride_c, self_offset, inv_tau, gamma, lse, top, lrest,
                                                 ACC, HAS_BIAS, GAMMA_ZERO, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D,
                                                 PREC, UPCAST)
            tl.store(w, fpos, mask=rmask)
            tl.store(w + M, fneg, mask=rmask)
            tl.store(w + 2 * M, upos, mask=rmask)
            tl.store(w + 3 * M, uneg, mask=rmask)


# The merge of a split pass 1 (rows only, no tl.dot): (m, top, m2, s2) of the n_split column ranges merged in
# order with ``_merge_top`` (a range's top is the "tile" top, its rest the "tile" rest), pos_sum added in order,
# then the row statistics as in the one-kernel forward.
@triton.jit
def rowstats_fwd_merge_kernel(WS, WTOP, LSE, POS, TOP, LREST, M, N, self_offset, n_split, BLOCK_M: tl.constexpr):
    ACC: tl.constexpr = LSE.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ri = rows.to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    m2 = tl.full([BLOCK_M], float("-inf"), ACC)
    s2 = tl.zeros([BLOCK_M], ACC)
    top = tl.full([BLOCK_M], -1, tl.int32)
    psum = tl.zeros([BLOCK_M], ACC)
    for k in range(0, n_split):
        w = WS + k * 4 * M + ri
        tm = tl.load(w, mask=rmask, other=float("-inf"))
        tm2 = tl.load(w + M, mask=rmask, other=float("-inf"))
        ts2 = tl.load(w + 2 * M, mask=rmask, other=0.0)
        psum += tl.load(w + 3 * M, mask=rmask, other=0.0)
        tj = tl.load(WTOP + k * M + ri, mask=rmask, other=-1).to(tl.int32)
        m_i, top, m2, s2 = _merge_top(m_i, top, m2, s2, tm, tj, tm2, ts2)
    lse, lrest, top, poisoned = _finish_stats(m_i, top, m2, s2, rows, N, self_offset)
    tl.store(LSE + ri, lse, mask=rmask)
    tl.store(POS + ri, psum, mask=rmask)
    tl.store(TOP + ri, top.to(tl.int64), mask=rmask)
    tl.store(LREST + ri, lrest, mask=rmask)


# The sum of a split pass 2: the n_split partial focal sums added in order; NaN for a poisoned row (lse = NaN).
@triton.jit
def rowstats_fwd_sum_kernel(WS, LSE, FPOS, FNEG, UPOS, UNEG, M, n_split, BLOCK_M: tl.constexpr):
    ACC: tl.constexpr = LSE.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ri = rows.to(tl.int64)
    fpos = tl.zeros([BLOCK_M], ACC)
    fneg = tl.zeros([BLOCK_M], ACC)
    upos = tl.zeros([BLOCK_M], ACC)
    uneg = tl.zeros([BLOCK_M], ACC)
    for k in range(0, n_split):
        w = WS + k * 4 * M + ri
        fpos += tl.load(w, mask=rmask, other=0.0)
        fneg += tl.load(w + M, mask=rmask, other=0.0)
        upos += tl.load(w + 2 * M, mask=rmask, other=0.0)
        uneg += tl.load(w + 3 * M, mask=rmask, other=0.0)
    lse = tl.load(LSE + ri, mask=rmask, other=0.0)
    poisoned = lse != lse
    tl.store(FPOS + ri, tl.where(poisoned, float("nan"), fpos), mask=rmask)
    tl.store(FNEG + ri, tl.where(poisoned, float("nan"), fneg), mask=rmask)
    tl.store(UPOS + ri, tl.where(poisoned, float("nan"), upos), mask=rmask)
    tl.store(UNEG + ri, tl.where(poisoned, float("nan"), uneg), mask=rmask)


# ----------------------------------------------------------------------------------------------
# backward, row-parallel part
# ----------------------------------------------------------------------------------------------
# dA_i = inv_tau · Σ_j G_ij C_j   (program = BLOCK_M anchor rows, sweep over column tiles; S recomputed),
# G_ij of the backward contract (see _grad_tile). OUT: [M, D] in the accumulation dtype, cast by the host.
@triton.jit
def rowstats_bwd_da_kernel(A, C, ALAB, CLAB, BS, BO, LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, OUT,
                           M, N, D, stride_a, stride_c, self_offset, p_inv_tau, p_gamma,
                           HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    ACC: tl.constexpr = OUT.dtype.element_ty
    rows, rmask, ri, inv_tau, gamma = _program_block(M, p_inv_tau, p_gamma, ACC, BLOCK_M)
    alab = tl.load(ALAB + ri, mask=rmask, other=-1)[:, None]
    lse_safe, top, lrest, rest, gt_pos, gt_neg, cpos, cposf, cneg, r, rt = _bwd_row_stats(
        LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, ri, rmask, gamma, FOCAL, GAMMA_ZERO)
    a_res, acc = _resident_rows(A, ri, rmask, stride_a, D, ACC, BLOCK_M, BLOCK_D)
    for n0 in range(0, N, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, N)
        clab = tl.load(CLAB + ci, mask=cmask, other=-1)[None, :]
        s = _s_tile(A, C, ri, ci, rmask, cmask, D, stride_a, stride_c, a_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                    SINGLE_D, PREC, UPCAST) * inv_tau
        valid, pos, neg = _masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], alab, clab,
                                 self_offset)
        if HAS_BIAS:
            bs, bo = _bias_pair(BS, BO, ci, cmask, 0)
            s = s + tl.where(pos, bs, bo)
        g = _grad_tile_stats(s, valid, pos, neg, cols[None, :], lse_safe, top, lrest, rest, gt_pos, gt_neg, cpos,
                             cposf, cneg, r, rt, gamma, 1, FOCAL, GAMMA_ZERO)
        acc = _gy_step(g, C, ci, cmask, stride_c, acc, OUT, ri, rmask, n0, D, ACC, BLOCK_D, SINGLE_D, PREC, UPCAST)
    _write_rows(OUT, ri, rmask, acc, inv_tau, D, BLOCK_D, SINGLE_D)


# ----------------------------------------------------------------------------------------------
# backward, column-parallel part
# ----------------------------------------------------------------------------------------------
# dC_j = inv_tau · Σ_i G_ij A_i   (program = BLOCK_N columns, sweep over anchor-row tiles of BLOCK_M;
# the tile is formed transposed, Gᵀ [BLOCK_N, BLOCK_M], from the saved per-row statistics)
@triton.jit
def rowstats_bwd_dc_kernel(A, C, ALAB, CLAB, BS, BO, LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, OUT,
                           M, N, D, stride_a, stride_c, self_offset, p_inv_tau, p_gamma,
                           HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False):
    ACC: tl.constexpr = OUT.dtype.element_ty
    cols, cmask, ci, inv_tau, gamma = _program_block(N, p_inv_tau, p_gamma, ACC, BLOCK_N)
    clab = tl.load(CLAB + ci, mask=cmask, other=-1)[:, None]
    bs = inv_tau
    bo = inv_tau
    if HAS_BIAS:
        bs, bo = _bias_pair(BS, BO, ci, cmask, 1)
    c_res, acc = _resident_rows(C, ci, cmask, stride_c, D, ACC, BLOCK_N, BLOCK_D)
    for m0 in range(0, M, BLOCK_M):
        rows, rmask, ri = _block(m0, BLOCK_M, M)
        alab = tl.load(ALAB + ri, mask=rmask, other=-1)[None, :]
        lse_safe, top, lrest, rest, gt_pos, gt_neg, cpos, cposf, cneg, r, rt = _bwd_row_stats(
            LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, ri, rmask, gamma, FOCAL, GAMMA_ZERO)
        # sᵀ tile [BLOCK_N, BLOCK_M]
        s = _s_tile(C, A, ci, ri, cmask, rmask, D, stride_c, stride_a, c_res, ACC, BLOCK_N, BLOCK_M, BLOCK_D,
                    SINGLE_D, PREC, UPCAST) * inv_tau
        valid, pos, neg = _masks(rows[None, :], cols[:, None], rmask[None, :], cmask[:, None], alab, clab,
                                 self_offset)
        if HAS_BIAS:
            s = s + tl.where(pos, bs, bo)
        g = _grad_tile_stats(s, valid, pos, neg, cols[:, None], lse_safe, top, lrest, rest, gt_pos, gt_neg, cpos,
                             cposf, cneg, r, rt, gamma, 0, FOCAL, GAMMA_ZERO)
        acc = _gy_step(g, A, ri, rmask, stride_a, acc, OUT, ci, cmask, m0, D, ACC, BLOCK_D, SINGLE_D, PREC, UPCAST)
    _write_rows(OUT, ci, cmask, acc, inv_tau, D, BLOCK_D, SINGLE_D)


# ----------------------------------------------------------------------------------------------
# backward, symmetric case (the anchors are the columns: C is A, same labels, self_offset = 0)
# ----------------------------------------------------------------------------------------------
# dX_i = inv_tau · Σ_j (G_ij + G_ji) X_j   (program = BLOCK_M rows, sweep over column tiles of BLOCK_N): S is
# symmetric, so one recomputed tile s_ij = s_ji serves both halves: G_ij from row i's statistics (as dA) and
# G_ji from row j's (as dC, the tile read transposed: x_ji = s_ij + b_ji, the bias of column i), by the same
# ``_grad_tile_stats``. Two GEMM-equivalents (S, (G + Gᵀ) X) instead of four; every output row is owned by one
# program (deterministic, no atomics). OUT: [N, D] in the accumulation dtype, cast by the host. Split sweep (SPLIT, few
# row blocks, ``ops.sym_grid``): program (I, k) sweeps the column range k only, into slab k of OUT [n_split, N, D].
@triton.jit
def rowstats_bwd_sym_kernel(X, LAB, BS, BO, LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, OUT,
                            N, D, stride_x, p_inv_tau, p_gamma, n_per,
                            HAS_BIAS: tl.constexpr, FOCAL: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            SINGLE_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr = False,
                            SPLIT: tl.constexpr = False):
    ACC: tl.constexpr = OUT.dtype.element_ty
    n_lo, n_hi = _split_range(N, n_per, SPLIT)
    rows, rmask, ri, inv_tau, gamma = _program_block(N, p_inv_tau, p_gamma, ACC, BLOCK_M)
    alab = tl.load(LAB + ri, mask=rmask, other=-1)[:, None]
    lse_i, top_i, lrest_i, rest_i, gtp_i, gtn_i, cpos_i, cposf_i, cneg_i, r_i, rt_i = _bwd_row_stats(
        LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, ri, rmask, gamma, FOCAL, GAMMA_ZERO)
    bs_i = inv_tau
    bo_i = inv_tau
    if HAS_BIAS:
        bs_i, bo_i = _bias_pair(BS, BO, ri, rmask, 1)
    x_res, acc = _resident_rows(X, ri, rmask, stride_x, D, ACC, BLOCK_M, BLOCK_D)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols, cmask, ci = _block(n0, BLOCK_N, N)
        clab = tl.load(LAB + ci, mask=cmask, other=-1)[None, :]
        s = _s_tile(X, X, ri, ci, rmask, cmask, D, stride_x, stride_x, x_res, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                    SINGLE_D, PREC, UPCAST) * inv_tau
        # the masks are symmetric in (i, j): j ∈ P(i) ⇔ i ∈ P(j), and the self column is the diagonal
        # (self_offset = 0 as a tensor: the interpreter of Triton 3.3 cannot mask with a Python bool)
        valid, pos, neg = _masks(rows[:, None], cols[None, :], rmask[:, None], cmask[None, :], alab, clab,
                                 tl.zeros([1, 1], tl.int32))
        x_ij = s
        x_ji = s
        if HAS_BIAS:
            bs_j, bo_j = _bias_pair(BS, BO, ci, cmask, 0)
            x_ij = s + tl.where(pos, bs_j, bo_j)
            x_ji = s + tl.where(pos, bs_i, bo_i)
        g = _grad_tile_stats(x_ij, valid, pos, neg, cols[None, :], lse_i, top_i, lrest_i, rest_i, gtp_i, gtn_i,
                             cpos_i, cposf_i, cneg_i, r_i, rt_i, gamma, 1, FOCAL, GAMMA_ZERO)
        lse_j, top_j, lrest_j, rest_j, gtp_j, gtn_j, cpos_j, cposf_j, cneg_j, r_j, rt_j = _bwd_row_stats(
            LSE, TOP, LREST, CPOS, CPOSF, CNEG, R, RT, ci, cmask, gamma, FOCAL, GAMMA_ZERO)
        g += _grad_tile_stats(x_ji, valid, pos, neg, rows[:, None], lse_j, top_j, lrest_j, rest_j, gtp_j, gtn_j,
                              cpos_j, cposf_j, cneg_j, r_j, rt_j, gamma, 0, FOCAL, GAMMA_ZERO)
        acc = _gy_step(g, X, ci, cmask, stride_x, acc, _slab(OUT, N, D, SPLIT), ri, rmask, n0 - n_lo, D, ACC, BLOCK_D,
                       SINGLE_D, PREC, UPCAST)
    _write_rows(_slab(OUT, N, D, SPLIT), ri, rmask, acc, inv_tau, D, BLOCK_D, SINGLE_D)
