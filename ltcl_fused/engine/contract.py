"""The row-statistics engine contract shared by every backend.

Every softmax-family loss (SupCon, CL/FCL/ACL/AFCL, BCL, the batch block of ResCom) is written in
plain PyTorch on a handful of per-anchor statistics of ``S = A Cᵀ / τ``. A backend computes those
statistics without storing S (forward) and the gradient of any linear combination of them
(backward, recomputing S tile by tile). This module states the contract and holds
``dense_forward`` / ``dense_backward``: a dense, literal transcription used to test the backends.

Inputs
------
A [M, D], C [N, D]       anchors and contrast columns (same dtype and device, contiguous)
a_lab [M], c_lab [N]     int64 labels; P(i) = {j ∈ A(i) : c_lab[j] == a_lab[i]}
self_offset              column ``i + self_offset`` is anchor i's self column (removed from every
                         set) when ``self_offset >= 0``; ``-1``: no self column
inv_tau                  1/τ, ``s_ij = inv_tau · <A_i, C_j>``
bias_same, bias_other    optional [N] per-column log-weights (BCL class averaging):
                         ``b_ij = bias_same[j]`` if j ∈ P(i) else ``bias_other[j]``; both or neither
gamma                    focal exponent γ >= 0 (pass 2 only)
focal                    whether to run pass 2

Definitions: ``A(i)`` = all columns but self, ``N(i) = A(i) \\ P(i)``, ``x_ij = s_ij + b_ij``,
``m_i = max_{j∈A(i)} x_ij``, ``top_i`` = the first j ∈ A(i) with x_ij = m_i (the row's dominant column),
``rest_i = Σ_{j∈A(i), j≠top_i} exp(x_ij − m_i)``, ``lrest_i = log(rest_i)`` (−inf when |A(i)| <= 1),
``lse_i = m_i + softplus(lrest_i)`` (−inf when A(i) is empty).
``lrest`` is exact however far the dominant column leads: it is carried as the other columns' own
log-sum-exp, ``m2_i = max_{j≠top_i} x_ij`` and ``s2_i = Σ_{j≠top_i} exp(x_ij − m2_i)`` ∈ [1, n], so
``lrest_i = (m2_i − m_i) + log s2_i`` (a linear ``rest`` underflows to 0 once the lead passes ~104 nats in
fp32, ~745 in fp64, and log(1 − p_top) would become −inf).
log p and log(1 − p), computed so that both are accurate even when p rounds to 1:
  j ≠ top_i:  ``log p_ij = x_ij − lse_i`` and ``log(1 − p_ij) = log1mexp(log p_ij)`` (p <= 1/2 here);
  j = top_i:  ``log p = −softplus(lrest_i)`` and ``log(1 − p) = −softplus(−lrest_i)``
              (1 − p_top = rest/(1 + rest); the generic formula would lose it to rounding, e.g. in fp32
              once the dominant column leads the rest by ~7 nats, and give T⁻ = inf past ~17 nats).
``f⁺(q) = −(1−q)^γ log q``, ``f⁻(q) = −log(1−q)``,
``u⁺(q) = q f⁺′(q) = (1−q)^(γ−1) (γ q log q − (1−q)) = −(1−q)^γ (1 + γ ρ(q))`` with
``ρ(q) = −q log q / (1 − q)`` ∈ [0, 1] (exactly −1 when γ = 0, 0 at q = 1 when γ > 0). The last form is
the one evaluated: (1−q)^(γ−1) overflows for γ < 1 when q → 1. At the dominant column
``ρ = softplus(lrest) e^(−lrest)`` (→ 1 − e^lrest/2 as lrest → −∞), elsewhere p <= 1/2 and ρ is direct.
``u⁻(q) = q f⁻′(q) = q / (1−q)``.

Non-finite input: a row whose logits x_ij (j ∈ A(i)) include a NaN or +inf, or are all −inf, is
*poisoned*: its lse, lrest and focal sums are NaN and top is −1 (so a NaN feature gives a NaN loss;
``check_finite=False`` skips the input check, never the NaN). A −inf logit is a column of weight 0.

forward -> eight [M] tensors: six in the accumulation dtype (fp32; fp64 for fp64 inputs):
    lse_i, pos_sum_i = Σ_{P(i)} s_ij (no bias), and when ``focal`` (else zeros):
    fpos_i = Σ_{P(i)} f⁺(p_ij), fneg_i = Σ_{N(i)} f⁻(p_ij),
    upos_i = Σ_{P(i)} u⁺(p_ij), uneg_i = Σ_{N(i), j≠top_i} u⁻(p_ij)   (the dominant column left out);
    then top_i (int64, −1 for an empty or poisoned row) and lrest_i (accumulation dtype), always.
backward(lse, top, lrest, cpos, cposf, cneg, r, rt) -> dA [M, D], dC [N, D] in the input dtype:
    j ≠ top_i: G_ij = 1[j∈P(i)] (cpos_i + cposf_i u⁺(p_ij)) + 1[j∈N(i)] cneg_i u⁻(p_ij) − r_i p_ij
                      − rt_i p_ij / rest_i
    j = top_i: G_ij = 1[j∈P(i)] (cpos_i + cposf_i u⁺(p_ij)) + 1[j∈N(i)] cneg_i p_ij [|A(i)| >= 2] − r_i p_ij
    G_i,self = 0; p and 1 − p of column top_i from lrest as above; top_i = −1 with a finite lse_i
    means the dominant column is not among these columns (the distributed ring passes blocks): every
    column then takes the j ≠ top formula with lse_i and lrest_i;
    dA = inv_tau · G C,  dC = inv_tau · Gᵀ A.
    ``rt_i = [top_i ∈ N(i)] cneg_i`` carries the dominant negative's f⁻: its u⁻(p_top) = 1/rest spread
    over the other columns, ``rt_i p_ij / rest_i = rt_i exp(log p_ij − lrest_i)``, evaluated in that form
    (log p_ij − lrest_i <= 0 off the top column: no overflow when rest underflows, where 1/rest would be
    inf and meet p_ij = 0). G at the dominant column is then formed without cancellation:
    cneg u⁻ − p cneg u⁻ = cneg p exactly, because u⁻ (1 − p) = p (otherwise two numbers near
    cneg/(1 − p), ~1e10 in fp32 for a 25-nat lead, would be subtracted). A row with a single column
    (|A(i)| = 1) has p ≡ 1: its f⁻ = +inf is a constant and contributes no gradient (the loss is +inf,
    its gradient with respect to the features 0, as the dense reference's).
    When ``focal`` is False, cposf, cneg and rt are ignored (taken as 0). A term whose coefficient is 0
    contributes exactly 0 (so u⁻ = inf at q = 1 never meets a zero coefficient to make NaN).
Streaming form of (m, top, m2, s2) over column tiles: a tile gives its max tm, first argmax tj, and
(tm2, ts2) = the max and Σ exp(x − tm2) of its other columns. If tm > m the old top joins the rest:
(m2, s2) ← LSE-merge of (m2, s2), (m, 1) [when a top exists] and (tm2, ts2); m ← tm, top ← tj. Otherwise
the whole tile joins: (m2, s2) ← merge of (m2, s2), (tm, 1), (tm2, ts2). Only row-level transcendentals.

Chain rule (used by ``ltcl_fused.engine.function``): with upstream gradients g_lse, g_pos, g_fpos,
g_fneg on the four differentiable outputs, ``∂lse_i/∂s_ij = p_ij``, ``∂pos_sum_i/∂s_ij = 1[P]``,
``∂fpos_i/∂s_ij = 1[P] u⁺_ij − p_ij upos_i``, ``∂fneg_i/∂s_ij = 1[N] u⁻_ij − p_ij (uneg_i + [top ∈ N] / rest_i)``,
hence ``cpos = g_pos, cposf = g_fpos, cneg = g_fneg, r = g_fpos·upos + g_fneg·uneg − g_lse`` and
``rt = [top ∈ N] g_fneg`` (uneg leaves the top out; its u⁻(p_top) = 1/rest is applied by the engine).
"""
from __future__ import annotations

import math

import torch

__all__ = ["acc_dtype", "log1mexp", "softplus", "top_rho", "finish_rows", "focal_terms", "row_logp",
           "logp_given_stats", "backward_tile", "dense_forward", "dense_backward"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the engine: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x <= 0, accurate on the whole range (−inf at x = 0)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z) to rounding for every z (``F.softplus`` returns z itself past its threshold of 20)."""
    return torch.logaddexp(z, torch.zeros_like(z))


def top_rho(lrest: torch.Tensor) -> torch.Tensor:
    """ρ = −q log q / (1 − q) of the dominant column, q = 1/(1 + e^lrest): softplus(lrest)·e^(−lrest)."""
    direct = softplus(lrest) * torch.exp(-torch.clamp(lrest, min=-20.0))
    return torch.where(lrest < -20.0, 1.0 - 0.5 * torch.exp(lrest), direct)


def finish_rows(m, m2, s2, has_valid):
    """(lse, lrest, ok) of rows from their (m, m2, s2) (contract: "Streaming form"); ``ok`` is False for a
    poisoned row (a NaN or +inf logit, or every logit −inf): its lse and lrest are NaN."""
    ninf = torch.tensor(-math.inf, dtype=m.dtype, device=m.device)
    poisoned = torch.isnan(s2) | torch.isnan(m) | (m == math.inf) | (has_valid & (m == ninf))
    lrest = torch.where(m2 == ninf, ninf, (m2 - m) + torch.log(s2))
    lse = m + softplus(lrest)
    empty = m == ninf
    lse = torch.where(empty, ninf, lse)
    lrest = torch.where(empty, ninf, lrest)
    nan = torch.full_like(lse, math.nan)
    return torch.where(poisoned, nan, lse), torch.where(poisoned, nan, lrest), ~poisoned


def focal_terms(logp: torch.Tensor, log1mp: torch.Tensor, gamma: float, is_top=None, lrest=None):
    """(f⁺, f⁻, u⁺, u⁻) of the contract, elementwise, from log p (<= 0) and log(1 − p); ``is_top`` marks the
    rows' dominant columns (ρ from their ``lrest`` [m]: see the module doc). NaN in, NaN out."""
    p = torch.exp(logp)
    uneg = torch.exp(logp - log1mp)
    fneg = -log1mp
    if gamma == 0.0:
        return -logp, fneg, torch.full_like(logp, -1.0), uneg
    rho = -logp * uneg  # −p log p / (1 − p), accurate where p <= 1/2 (off the dominant column)
    if is_top is not None:
        rho = torch.where(is_top, top_rho(lrest.to(logp.dtype))[:, None].expand_as(logp), rho)
    w = torch.exp(gamma * log1mp)
    return -w * logp, fneg, -w * (1.0 + gamma * rho), uneg


def _has_valid(valid: torch.Tensor) -> torch.Tensor:
    return valid.any(dim=1)


def row_logp(x: torch.Tensor, valid: torch.Tensor, need_logp: bool = True):
    """Per-row (lse, top, lrest) and elementwise (log p, log(1 − p)) of logits ``x`` [m, N] over ``valid``.

    ``top`` holds column indices. Invalid entries get log p = −1 and log(1 − p) = log1mexp(−1)
    (arbitrary finite values, masked by the caller). ``need_logp=False`` skips the elementwise part
    (returned as None). Poisoned rows (see the module doc) get NaN statistics and top = −1.
    """
    ninf = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    xm = torch.where(valid, x, ninf)
    m, top = xm.max(dim=1)  # NaN propagates (m = NaN)
    cols = torch.arange(x.shape[1], device=x.device)[None, :]
    is_top = (cols == top[:, None]) & valid
    other = valid & ~is_top
    x2 = torch.where(other, xm, ninf)
    m2 = x2.max(dim=1).values
    m2s = torch.where(m2 == ninf, torch.zeros_like(m2), m2)
    s2 = torch.where(other, torch.exp(x2 - m2s[:, None]), torch.zeros_like(x)).sum(1)
    lse, lrest, ok = finish_rows(m, m2, s2, _has_valid(valid))
    top = torch.where(ok & (m > ninf), top, torch.full_like(top, -1))
    if not need_logp:
        return lse, top, lrest, None, None
    is_top = (cols == top[:, None]) & valid
    logp, log1mp = logp_given_stats(x, valid, lse, top, lrest, is_top)
    return lse, top, lrest, logp, log1mp


def _dense_masks(A, C, a_lab, c_lab, self_offset):
    M, N = A.shape[0], C.shape[0]
    rows = torch.arange(M, device=A.device)[:, None]
    cols = torch.arange(N, device=A.device)[None, :]
    valid = (cols != rows + self_offset) if self_offset >= 0 else torch.ones(M, N, dtype=torch.bool, device=A.device)
    pos = (a_lab[:, None] == c_lab[None, :]) & valid
    neg = valid & ~pos
    return valid, pos, neg


def _dense_logits(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other):
    acc = acc_dtype(A.dtype)
    s = (A.to(acc) @ C.to(acc).T) * inv_tau
    valid, pos, neg = _dense_masks(A, C, a_lab, c_lab, self_offset)
    if bias_same is not None:
        b = torch.where(pos, bias_same.to(acc)[None, :], bias_other.to(acc)[None, :])
    else:
        b = torch.zeros_like(s)
    return s, b, valid, pos, neg


def dense_forward(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same=None, bias_other=None, gamma=0.0, focal=False):
    """Literal dense transcription of the forward contract (test oracle for the backends)."""
    s, b, valid, pos, neg = _dense_logits(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other)
    lse, top, lrest, logp, log1mp = row_logp(s + b, valid, need_logp=focal)
    pos_sum = torch.where(pos, s, torch.zeros_like(s)).sum(1)
    zeros = torch.zeros_like(lse)
    if not focal:
        return lse, pos_sum, zeros, zeros.clone(), zeros.clone(), zeros.clone(), top, lrest
    is_top = (torch.arange(s.shape[1], device=s.device)[None, :] == top[:, None]) & valid
    fp, fn, up, un = focal_terms(logp, log1mp, gamma, is_top, lrest)
    z = torch.zeros_like(s)
    return (lse, pos_sum, torch.where(pos, fp, z).sum(1), torch.where(neg, fn, z).sum(1),
            torch.where(pos, up, z).sum(1), torch.where(neg & ~is_top, un, z).sum(1), top, lrest)


def logp_given_stats(x, valid, lse, top, lrest, is_top, need_log1mp: bool = True):
    """(log p, log(1 − p)) from saved per-row statistics, the dominant column from lrest
    (log(1 − p) is None when not needed). A NaN (poisoned) lse gives NaN."""
    lse_safe = torch.where(lse == -math.inf, torch.zeros_like(lse), lse)
    logp = torch.where(valid & ~is_top, x - lse_safe[:, None], torch.full_like(x, -1.0))
    lr = lrest.to(x.dtype)[:, None].expand_as(x)
    log1mp = None
    if need_log1mp:
        log1mp = torch.where(is_top, -softplus(-lr), log1mexp(logp))
    logp = torch.where(is_top, -softplus(lr), logp)
    return logp, log1mp


def backward_tile(x, valid, pos, neg, lse, top, lrest, gamma, focal, cpos, cposf, cneg, r, rt, col0=0):
    """G = ∂/∂S of the backward contract on a tile of logits ``x`` (rows with their per-row inputs,
    columns col0..col0+n). Shared by the dense oracle and the chunked torch backend."""
    is_top = (torch.arange(col0, col0 + x.shape[1], device=x.device)[None, :] == top[:, None]) & valid
    logp, log1mp = logp_given_stats(x, valid, lse, top, lrest, is_top, need_log1mp=focal)
    p = torch.exp(logp)
    z = torch.zeros_like(x)
    g = torch.where(pos, cpos[:, None].expand_as(x), z) - r[:, None] * p
    if focal:
        lr = lrest.to(x.dtype)[:, None]
        other = valid & ~is_top & (rt[:, None] != 0)
        # the dominant negative's share rt·p/rest = rt·exp(log p − lrest), <= rt off the top column
        g = g - torch.where(other, rt[:, None] * torch.exp(torch.where(other, logp - lr, z)), z)
        _, _, up, un = focal_terms(logp, log1mp, gamma, is_top, lrest)
        # dominant negative: cneg·u⁻ − p·cneg·u⁻ = cneg·p exactly; 0 when it is the row's only column
        un = torch.where(is_top, torch.where(lr > -math.inf, p, z), un)
        g = g + torch.where(pos & (cposf[:, None] != 0), cposf[:, None] * up, z)
        g = g + torch.where(neg & (cneg[:, None] != 0), cneg[:, None] * un, z)
    return torch.where(valid, g, z)


def dense_backward(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                   lse, top, lrest, cpos, cposf, cneg, r, rt):
    """Literal dense transcription of the backward contract (test oracle for the backends)."""
    s, b, valid, pos, neg = _dense_logits(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other)
    g = backward_tile(s + b, valid, pos, neg, lse, top, lrest, gamma, focal, cpos, cposf, cneg, r, rt)
    acc = s.dtype
    dA = (g @ C.to(acc)) * inv_tau
    dC = (g.T @ A.to(acc)) * inv_tau
    return dA.to(A.dtype), dC.to(C.dtype)
