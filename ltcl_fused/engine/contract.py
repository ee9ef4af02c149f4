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
``rest_i = Σ_{j∈A(i), j≠top_i} exp(x_ij − m_i)``, ``lse_i = m_i + log1p(rest_i)`` (−inf when A(i) is empty),
``lrest_i = log(rest_i)`` (−inf when |A(i)| <= 1).
log p and log(1 − p), computed so that both are accurate even when p rounds to 1:
  j ≠ top_i:  ``log p_ij = x_ij − lse_i`` and ``log(1 − p_ij) = log1mexp(log p_ij)`` (p <= 1/2 here);
  j = top_i:  ``log p = −softplus(lrest_i)`` and ``log(1 − p) = −softplus(−lrest_i)``
              (1 − p_top = rest/(1 + rest); the generic formula would lose it to rounding, e.g. in fp32
              once the dominant column leads the rest by ~7 nats, and give T⁻ = inf past ~17 nats).
``f⁺(q) = −(1−q)^γ log q``, ``f⁻(q) = −log(1−q)``,
``u⁺(q) = q f⁺′(q) = (1−q)^(γ−1) (γ q log q − (1−q))`` (exactly −1 when γ = 0, 0 at q = 1 when γ > 0),
``u⁻(q) = q f⁻′(q) = q / (1−q)``.

forward -> eight [M] tensors: six in the accumulation dtype (fp32; fp64 for fp64 inputs):
    lse_i, pos_sum_i = Σ_{P(i)} s_ij (no bias), and when ``focal`` (else zeros):
    fpos_i = Σ_{P(i)} f⁺(p_ij), fneg_i = Σ_{N(i)} f⁻(p_ij),
    upos_i = Σ_{P(i)} u⁺(p_ij), uneg_i = Σ_{N(i), j≠top_i} u⁻(p_ij)   (the dominant column left out);
    then top_i (int64, −1 for an empty row) and lrest_i (accumulation dtype), always.
backward(lse, top, lrest, cpos, cposf, cneg, r, rt) -> dA [M, D], dC [N, D] in the input dtype:
    j ≠ top_i: G_ij = 1[j∈P(i)] (cpos_i + cposf_i u⁺(p_ij)) + 1[j∈N(i)] cneg_i u⁻(p_ij) − (r_i + rt_i) p_ij
    j = top_i: G_ij = 1[j∈P(i)] (cpos_i + cposf_i u⁺(p_ij)) + 1[j∈N(i)] cneg_i p_ij − r_i p_ij
    G_i,self = 0; p and 1 − p of column top_i from lrest as above; top_i = −1 with a finite lse_i
    means the dominant column is not among these columns (the distributed ring passes blocks): every
    column then takes the generic formula with lse_i;
    dA = inv_tau · G C,  dC = inv_tau · Gᵀ A.
    ``rt_i = [top_i ∈ N(i)] cneg_i u⁻(p_i,top)`` is the dominant negative's share of r, kept apart so that
    G at the dominant column is formed without cancellation: cneg u⁻ − p (r + cneg u⁻) = cneg p − p r
    exactly, because u⁻ (1 − p) = p (otherwise two numbers near cneg/(1 − p), ~1e10 in fp32 for a
    25-nat lead, would be subtracted).
    When ``focal`` is False, cposf, cneg and rt are ignored (taken as 0). A term whose coefficient is 0
    contributes exactly 0 (so u⁻ = inf at q = 1 never meets a zero coefficient to make NaN).
Streaming form of (m, top, rest) over column tiles: for a tile with max tm, first argmax tj and
tsum = Σ_{j in tile, j≠tj} exp(x_j − tm): if tm > m: rest ← rest·e^(m−tm) + [top exists]·e^(m−tm) + tsum,
m ← tm, top ← tj; else rest ← rest + e^(tm−m)·(1 + tsum).

Chain rule (used by ``ltcl_fused.engine.function``): with upstream gradients g_lse, g_pos, g_fpos,
g_fneg on the four differentiable outputs, ``∂lse_i/∂s_ij = p_ij``, ``∂pos_sum_i/∂s_ij = 1[P]``,
``∂fpos_i/∂s_ij = 1[P] u⁺_ij − p_ij upos_i``, ``∂fneg_i/∂s_ij = 1[N] u⁻_ij − p_ij uneg_i``, hence
``cpos = g_pos, cposf = g_fpos, cneg = g_fneg, r = g_fpos·upos + g_fneg·uneg − g_lse`` and
``rt = [top ∈ N] g_fneg u⁻(p_top)`` with ``u⁻(p_top) = 1/rest = exp(−lrest)`` (uneg leaves the top out).
"""
from __future__ import annotations

import math

import torch

__all__ = ["acc_dtype", "log1mexp", "focal_terms", "row_logp", "logp_given_stats", "backward_tile", "dense_forward", "dense_backward"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the engine: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x <= 0, accurate on the whole range (−inf at x = 0)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def focal_terms(logp: torch.Tensor, log1mp: torch.Tensor, gamma: float):
    """(f⁺, f⁻, u⁺, u⁻) of the contract, elementwise, from log p (<= 0) and log(1 − p)."""
    p = torch.exp(logp)
    if gamma == 0.0:
        fpos = -logp
        upos = torch.full_like(logp, -1.0)
    else:
        fpos = -torch.exp(gamma * log1mp) * logp
        inner = gamma * p * logp - torch.exp(log1mp)
        upos = torch.where(logp < 0, torch.exp((gamma - 1.0) * log1mp) * inner, torch.zeros_like(logp))
        fpos = torch.where(logp < 0, fpos, torch.zeros_like(logp))
    fneg = -log1mp
    uneg = torch.exp(logp - log1mp)
    return fpos, fneg, upos, uneg


def row_logp(x: torch.Tensor, valid: torch.Tensor, need_logp: bool = True):
    """Per-row (lse, top, lrest) and elementwise (log p, log(1 − p)) of logits ``x`` [m, N] over ``valid``.

    ``top`` holds column indices. Invalid entries get log p = −1 and log(1 − p) = log1mexp(−1)
    (arbitrary finite values, masked by the caller). ``need_logp=False`` skips the elementwise part
    (returned as None).
    """
    ninf = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    xm = torch.where(valid, x, ninf)
    m, top = xm.max(dim=1)
    nonempty = valid.any(dim=1)
    top = torch.where(nonempty, top, torch.full_like(top, -1))
    cols = torch.arange(x.shape[1], device=x.device)[None, :]
    is_top = (cols == top[:, None]) & valid
    m_safe = torch.where(nonempty, m, torch.zeros_like(m))
    rest = torch.where(valid & ~is_top, torch.exp(xm - m_safe[:, None]), torch.zeros_like(x)).sum(1)
    lrest = torch.log(rest)
    lse = torch.where(nonempty, m_safe + torch.log1p(rest), ninf)
    if not need_logp:
        return lse, top, lrest, None, None
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
    fp, fn, up, un = focal_terms(logp, log1mp, gamma)
    z = torch.zeros_like(s)
    neg_rest = neg & (torch.arange(s.shape[1], device=s.device)[None, :] != top[:, None])
    return (lse, pos_sum, torch.where(pos, fp, z).sum(1), torch.where(neg, fn, z).sum(1),
            torch.where(pos, up, z).sum(1), torch.where(neg_rest, un, z).sum(1), top, lrest)


def logp_given_stats(x, valid, lse, top, lrest, is_top, need_log1mp: bool = True):
    """(log p, log(1 − p)) from saved per-row statistics, the dominant column from lrest
    (log(1 − p) is None when not needed)."""
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = torch.where(valid & ~is_top, x - lse_safe[:, None], torch.full_like(x, -1.0))
    lr = lrest.to(x.dtype)[:, None].expand_as(x)
    log1mp = None
    if need_log1mp:
        log1mp = torch.where(is_top, -torch.nn.functional.softplus(-lr), log1mexp(logp))
    logp = torch.where(is_top, -torch.nn.functional.softplus(lr), logp)
    return logp, log1mp


def backward_tile(x, valid, pos, neg, lse, top, lrest, gamma, focal, cpos, cposf, cneg, r, rt, col0=0):
    """G = ∂/∂S of the backward contract on a tile of logits ``x`` (rows with their per-row inputs,
    columns col0..col0+n). Shared by the dense oracle and the chunked torch backend."""
    is_top = (torch.arange(col0, col0 + x.shape[1], device=x.device)[None, :] == top[:, None]) & valid
    logp, log1mp = logp_given_stats(x, valid, lse, top, lrest, is_top, need_log1mp=focal)
    p = torch.exp(logp)
    z = torch.zeros_like(x)
    r_eff = r[:, None] + torch.where(is_top, z, rt[:, None]) if focal else r[:, None].expand_as(x)
    g = torch.where(pos, cpos[:, None].expand_as(x), z) - r_eff * p
    if focal:
        _, _, up, un = focal_terms(logp, log1mp, gamma)
        un = torch.where(is_top, p, un)  # dominant negative: cneg·u⁻ − p·cneg·u⁻ = cneg·p exactly
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
