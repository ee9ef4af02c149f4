"""The row-statistics contract of the self-supervised family (SPEC.md sections 5 and 6).

DCL, HCL, the Bayesian contrastive loss and MTTV are all written in plain PyTorch on a few per-anchor
statistics of ``S = A Cᵀ · inv_tau``: weighted log-sum-exps of ``scale · s`` over a per-row column set,
and the similarity to one designated positive column. A backend computes them one block of anchor
rows at a time (never the M×N matrix) and, in backward, recomputes the block to form ``G = ∂/∂S``.
This module states the contract, holds ``dense_forward`` / ``dense_backward`` (a dense, literal
transcription: the test oracle of the backends) and the autograd wrapper ``ssl_row_stats``.

Inputs
------
A [M, D], C [N, D]   anchors and contrast columns (same dtype and device, contiguous)
partner [M]          int64: anchor i's positive column, or -1 for none
self_offset          column ``i + self_offset`` is anchor i's self column; -1: no self column
inv_tau              ``s_ij = inv_tau · g_ij``, ``g_ij = <A_i, C_j>`` (the raw dot product)
cfg                  an :class:`SSLConfig` (hashable; its fields are the compile-time variants):
  scales             tuple of K >= 1 numbers c_k (HCL: (β, 1+β); everything else: (1,))
  exclude_partner    whether the positive column is left out of the set (DCL/HCL/Bayes: yes; MTTV: no)
  include_self       whether the self column may be in the set (only MTTV's ``official_self_term``)
  filter             None | "both" | "low": element filter on the raw dot g (MTTV, where g = cos), on
                     ``a = min(|g|, 1)`` (a cosine computed as 1 + 2e-16 is 1): "both" drops an entry when
                     ``a < lower`` or ``a > upper``, "low" when ``a < lower``; a NaN is never dropped
  lower, upper       the filter thresholds
  bayes              None or (α, β, τ⁺): Bayesian importance weights ω (below) on the set

Definitions
-----------
``set(i)`` = every column j with: j != self (unless include_self), j != partner(i) (if
exclude_partner), and j kept by the filter. ``n_i = |set(i)|``.
Non-finite input: a row any of whose raw dot products g_ij (every column, self included) is NaN or ±inf
is poisoned: lse_ki = NaN for every k (a NaN feature gives a NaN loss, whatever the masks and filter).
Weights: ``w_ij = 1``, or with ``bayes``: ``u_ij = #{k ∈ set(i): s_ik <= s_ij} / n_i`` (exact empirical
CDF within the row; ties count as <=) and ``w_ij = ω(u_ij)`` of SPEC.md section 5 (:func:`bayes_omega`).
ω is piecewise constant in s: it carries no gradient.

forward -> (lse [K, M], pos [M], pos_in [M]) in the accumulation dtype (fp32; fp64 for fp64 inputs):
    lse_ki  = log Σ_{j∈set(i)} w_ij exp(c_k s_ij)   (−inf when the set is empty or every w is 0; NaN when poisoned)
    pos_i   = s_{i, partner(i)}                     (0 when partner(i) = -1)
    pos_in_i = 1 if partner(i) ∈ set(i) else 0       (MTTV's "positive kept"; not differentiable)
backward(lse, coef [K, M], cpos [M]) -> dA [M, D], dC [N, D] in the input dtype:
    G_ij = Σ_k 1[j∈set(i)] coef_ki c_k w_ij exp(c_k s_ij − lse_ki) + 1[j = partner(i)] cpos_i
    dA = inv_tau · G C,  dC = inv_tau · Gᵀ A
    A term whose coefficient is 0, or whose lse is −inf, contributes exactly 0 (never NaN).
This is the gradient of ``Σ_k Σ_i coef_ki lse_ki + Σ_i cpos_i pos_i`` (``∂lse_ki/∂s_ij = c_k w_ij
exp(c_k s_ij − lse_ki)`` on the set), so the autograd wrapper passes the upstream gradients unchanged.

Mapping onto the fused engines: one pass over tiles of S per row block with K online LSE
accumulators and the positive's value; the Bayesian variant needs the row's sorted set values first
(a rank pass) and then a weighting pass; the filter and the self/partner exclusions are masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from .contract import acc_dtype

__all__ = ["SSLConfig", "SSLStats", "bayes_omega", "dense_forward", "dense_backward", "ssl_row_stats",
           "DenseSSLEngine"]


@dataclass(frozen=True)
class SSLConfig:
    scales: Tuple[float, ...] = (1.0,)
    exclude_partner: bool = True
    include_self: bool = False
    filter: Optional[str] = None
    lower: float = 0.0
    upper: float = 1.0
    bayes: Optional[Tuple[float, float, float]] = None

    def __post_init__(self):
        if len(self.scales) < 1:
            raise ValueError("SSLConfig: `scales` needs at least one entry")
        if self.filter not in (None, "both", "low"):
            raise ValueError(f"SSLConfig: `filter` must be None, 'both' or 'low', got {self.filter!r}")
        if self.bayes is not None and len(self.scales) != 1:
            raise ValueError("SSLConfig: the Bayesian weights are defined for one scale only")


class SSLStats(NamedTuple):
    lse: torch.Tensor     # [K, M] log Σ_set w exp(c_k s)
    pos: torch.Tensor     # [M] s_{i, partner(i)}
    pos_in: torch.Tensor  # [M] 1.0 when the partner column is in the set (no gradient)


def bayes_omega(u: torch.Tensor, alpha: float, beta: float, tau_plus: float) -> torch.Tensor:
    """Importance weight ω(u) of the Bayesian contrastive loss (SPEC.md section 5), elementwise in u ∈ [0, 1]."""
    tau_minus = 1.0 - tau_plus
    a = (1.0 - 2.0 * alpha) * (tau_minus - tau_plus) + 1e-3
    b = 2.0 * (alpha * tau_minus + (1.0 - alpha) * tau_plus)
    x = 2.0 * u / (b + torch.sqrt(b * b + 4.0 * a * u))  # = (−b + sqrt(b² + 4au))/(2a), no cancellation
    phi1 = 2.0 * (1.0 - x)
    phi2 = 2.0 * x
    psi_tn = alpha * phi1 + (1.0 - alpha) * phi2
    psi_fn = (1.0 - alpha) * phi1 + alpha * phi2
    psi_htn = (alpha * (1.0 - beta) * phi1 + (1.0 - alpha) * beta * phi2) / (
        alpha * (1.0 - beta) + (1.0 - alpha) * beta + 1e-3)
    return psi_htn / (tau_minus * psi_tn + tau_plus * psi_fn)


def check_inputs(A, C, partner, self_offset, cfg) -> None:
    """Contract preconditions (cheap; a backend may call it)."""
    if A.dim() != 2 or C.dim() != 2 or A.shape[1] != C.shape[1]:
        raise ValueError(f"ssl engine: A [M, D] and C [N, D] expected, got {tuple(A.shape)} and {tuple(C.shape)}")
    if partner.shape != (A.shape[0],) or partner.dtype != torch.int64:
        raise ValueError("ssl engine: `partner` must be int64 [M]")
    if not isinstance(cfg, SSLConfig):
        raise TypeError("ssl engine: `cfg` must be an SSLConfig")


# ----------------------------------------------------------------------------------------------
# dense literal oracle
# ----------------------------------------------------------------------------------------------

def _dense_sets(A, C, partner, self_offset, cfg):
    acc = acc_dtype(A.dtype)
    g = A.to(acc) @ C.to(acc).T
    M, N = g.shape
    i = torch.arange(M, device=A.device)[:, None]
    j = torch.arange(N, device=A.device)[None, :]
    in_set = torch.ones(M, N, dtype=torch.bool, device=A.device)
    if self_offset >= 0 and not cfg.include_self:
        in_set &= j != i + self_offset
    is_partner = j == partner[:, None]
    if cfg.exclude_partner:
        in_set &= ~is_partner
    if cfg.filter is not None:
        in_set &= ~filter_drops(g, cfg)
    return g, in_set, is_partner


def filter_drops(g: torch.Tensor, cfg: SSLConfig) -> torch.Tensor:
    """The entries the element filter drops: ``a < lower`` (or ``a > upper`` under "both"), ``a = min(|g|, 1)``;
    NaN compares false, so it is kept (and poisons the row's LSE)."""
    a = g.abs().clamp(max=1.0)  # clamp keeps NaN
    drop = a < cfg.lower
    if cfg.filter == "both":
        drop |= a > cfg.upper
    return drop


def poisoned_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN or ±inf raw dot product anywhere (their LSEs are NaN)."""
    return ~torch.isfinite(g).all(dim=1)


def _dense_weights(s, in_set, cfg):
    if cfg.bayes is None:
        return torch.where(in_set, torch.ones_like(s), torch.zeros_like(s))
    # u_ij = #{k in set(i): s_ik <= s_ij} / n_i, literally (an M×N×N comparison: tiny shapes only)
    le = (s[:, None, :] <= s[:, :, None]) & in_set[:, None, :]
    n = in_set.sum(1, keepdim=True).clamp(min=1).to(s.dtype)
    u = le.sum(2).to(s.dtype) / n
    return torch.where(in_set, bayes_omega(u, *cfg.bayes), torch.zeros_like(s))


def dense_forward(A, C, partner, self_offset, inv_tau, cfg: SSLConfig) -> SSLStats:
    """Literal dense transcription of the forward contract (test oracle for the backends)."""
    g, in_set, is_partner = _dense_sets(A, C, partner, self_offset, cfg)
    s = g * inv_tau
    w = _dense_weights(s, in_set, cfg)
    lse = []
    bad = poisoned_rows(g)
    for c in cfg.scales:
        terms = torch.where(in_set & (w > 0), torch.log(w) + c * s, torch.full_like(s, -math.inf))
        lse.append(torch.where(bad, math.nan, torch.logsumexp(terms, dim=1)))
    pos = torch.where(is_partner, s, torch.zeros_like(s)).sum(1)
    pos_in = (is_partner & in_set).any(1).to(s.dtype)
    return SSLStats(torch.stack(lse), pos, pos_in)


def dense_backward(A, C, partner, self_offset, inv_tau, cfg: SSLConfig, lse, coef, cpos):
    """Literal dense transcription of the backward contract (test oracle for the backends)."""
    g, in_set, is_partner = _dense_sets(A, C, partner, self_offset, cfg)
    s = g * inv_tau
    w = _dense_weights(s, in_set, cfg)
    G = torch.where(is_partner, cpos[:, None].to(s.dtype).expand_as(s), torch.zeros_like(s))
    for k, c in enumerate(cfg.scales):
        L = lse[k]
        live = (coef[k] != 0) & torch.isfinite(L)
        Ls = torch.where(live, L, torch.zeros_like(L))
        p = torch.exp(torch.log(w) + c * s - Ls[:, None])  # w = 0 -> exactly 0
        G = G + torch.where(in_set & live[:, None], (coef[k] * c)[:, None] * p, torch.zeros_like(s))
    dA = (G @ C.to(s.dtype)) * inv_tau
    dC = (G.T @ A.to(s.dtype)) * inv_tau
    return dA.to(A.dtype), dC.to(C.dtype)


class DenseSSLEngine:
    """The dense oracle wrapped as an engine (tests the autograd wrapper independently of any backend)."""
    name = "dense-oracle"
    ops = frozenset({"ssl"})

    def unavailable_reason(self, device):
        return None

    def ssl_forward(self, A, C, partner, self_offset, inv_tau, cfg):
        return dense_forward(A, C, partner, self_offset, inv_tau, cfg)

    def ssl_backward(self, A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos):
        return dense_backward(A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos)


# ----------------------------------------------------------------------------------------------
# autograd wrapper
# ----------------------------------------------------------------------------------------------

class _SSLRowStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, C, partner, self_offset, inv_tau, cfg, engine):
        lse, pos, pos_in = engine.ssl_forward(A, C, partner, self_offset, inv_tau, cfg)
        ctx.save_for_backward(A, C, partner, lse)
        ctx.cfg = (self_offset, inv_tau, cfg, engine)
        ctx.mark_non_differentiable(pos_in)
        return lse, pos, pos_in

    @staticmethod
    def backward(ctx, g_lse, g_pos, _g_pos_in):
        A, C, partner, lse = ctx.saved_tensors
        self_offset, inv_tau, cfg, engine = ctx.cfg
        coef = torch.zeros_like(lse) if g_lse is None else g_lse.to(lse.dtype).contiguous()
        cpos = torch.zeros_like(lse[0]) if g_pos is None else g_pos.to(lse.dtype).contiguous()
        dA, dC = engine.ssl_backward(A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos)
        return (dA if ctx.needs_input_grad[0] else None, dC if ctx.needs_input_grad[1] else None,
                None, None, None, None, None)


def ssl_row_stats(engine, A: torch.Tensor, C: torch.Tensor, partner: torch.Tensor, *, self_offset: int,
                  inv_tau: float, cfg: SSLConfig) -> SSLStats:
    """Differentiable SSL row statistics of S = A Cᵀ·inv_tau computed by ``engine`` (see the module doc)."""
    A, C, partner = A.contiguous(), C.contiguous(), partner.to(torch.int64).contiguous()
    check_inputs(A, C, partner, self_offset, cfg)
    return SSLStats(*_SSLRowStatsFn.apply(A, C, partner, int(self_offset), float(inv_tau), cfg, engine))
