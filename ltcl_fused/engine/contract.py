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

Definitions: ``A(i)`` = all columns but self, ``N(i) = A(i) \\ P(i)``,
``lse_i = log Σ_{j∈A(i)} exp(s_ij + b_ij)`` (−inf when A(i) is empty),
``log p_ij = s_ij + b_ij − lse_i``,
``f⁺(q) = −(1−q)^γ log q``, ``f⁻(q) = −log(1−q)``,
``u⁺(q) = q f⁺′(q) = (1−q)^(γ−1) (γ q log q − (1−q))`` (exactly −1 when γ = 0, 0 at q = 1 when γ > 0),
``u⁻(q) = q f⁻′(q) = q / (1−q)``.

forward -> six [M] tensors in the accumulation dtype (fp32; fp64 for fp64 inputs):
    lse_i, pos_sum_i = Σ_{P(i)} s_ij (no bias), and when ``focal`` (else zeros):
    fpos_i = Σ_{P(i)} f⁺(p_ij), fneg_i = Σ_{N(i)} f⁻(p_ij),
    upos_i = Σ_{P(i)} u⁺(p_ij), uneg_i = Σ_{N(i)} u⁻(p_ij)
backward(lse, cpos, cposf, cneg, r) -> dA [M, D], dC [N, D] in the input dtype:
    G_ij = 1[j∈P(i)] (cpos_i + cposf_i u⁺(p_ij)) + 1[j∈N(i)] cneg_i u⁻(p_ij) − r_i p_ij, G_i,self = 0
    dA = inv_tau · G C,  dC = inv_tau · Gᵀ A
    When ``focal`` is False, cposf and cneg are ignored (taken as 0). A term whose coefficient is 0
    contributes exactly 0 (so u⁻ = inf at q = 1 never meets a zero coefficient to make NaN).

Chain rule (used by ``ltcl_fused.engine.function``): with upstream gradients g_lse, g_pos, g_fpos,
g_fneg on the four differentiable outputs, ``∂lse_i/∂s_ij = p_ij``, ``∂pos_sum_i/∂s_ij = 1[P]``,
``∂fpos_i/∂s_ij = 1[P] u⁺_ij − p_ij upos_i``, ``∂fneg_i/∂s_ij = 1[N] u⁻_ij − p_ij uneg_i``, hence
``cpos = g_pos, cposf = g_fpos, cneg = g_fneg, r = g_fpos·upos + g_fneg·uneg − g_lse``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["acc_dtype", "log1mexp", "focal_terms", "dense_forward", "dense_backward"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the engine: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x <= 0, accurate on the whole range (−inf at x = 0)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def focal_terms(logp: torch.Tensor, gamma: float):
    """(f⁺, f⁻, u⁺, u⁻) of the contract, elementwise, from log p (<= 0)."""
    p = torch.exp(logp)
    log1mp = log1mexp(logp)
    if gamma == 0.0:
        fpos = -logp
        upos = torch.full_like(logp, -1.0)
    else:
        fpos = -torch.exp(gamma * log1mp) * logp
        inner = gamma * p * logp - (-torch.expm1(logp))
        upos = torch.where(logp < 0, torch.exp((gamma - 1.0) * log1mp) * inner, torch.zeros_like(logp))
        fpos = torch.where(logp < 0, fpos, torch.zeros_like(logp))
    fneg = -log1mp
    uneg = torch.exp(logp - log1mp)
    return fpos, fneg, upos, uneg


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
    lse = torch.logsumexp(torch.where(valid, s + b, torch.full_like(s, -math.inf)), dim=1)
    pos_sum = torch.where(pos, s, torch.zeros_like(s)).sum(1)
    zeros = torch.zeros_like(lse)
    if not focal:
        return lse, pos_sum, zeros, zeros.clone(), zeros.clone(), zeros.clone()
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = torch.where(valid, s + b - safe_lse[:, None], torch.full_like(s, -1.0))
    fp, fn, up, un = focal_terms(logp, gamma)
    z = torch.zeros_like(s)
    return (lse, pos_sum, torch.where(pos, fp, z).sum(1), torch.where(neg, fn, z).sum(1),
            torch.where(pos, up, z).sum(1), torch.where(neg, un, z).sum(1))


def dense_backward(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                   lse, cpos, cposf, cneg, r):
    """Literal dense transcription of the backward contract (test oracle for the backends)."""
    s, b, valid, pos, neg = _dense_logits(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = torch.where(valid, s + b - safe_lse[:, None], torch.full_like(s, -1.0))
    p = torch.exp(logp)
    z = torch.zeros_like(s)
    g = torch.where(pos, cpos[:, None].expand_as(s), z) - r[:, None] * p
    if focal:
        _, _, up, un = focal_terms(logp, gamma)
        g = g + torch.where(pos & (cposf[:, None] != 0), cposf[:, None] * up, z)
        g = g + torch.where(neg & (cneg[:, None] != 0), cneg[:, None] * un, z)
    g = torch.where(valid, g, z)
    acc = s.dtype
    dA = (g @ C.to(acc)) * inv_tau
    dC = (g.T @ A.to(acc)) * inv_tau
    return dA.to(A.dtype), dC.to(C.dtype)
