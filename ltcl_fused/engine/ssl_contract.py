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

Column blocks (operation "ssl_ranked"; ``ltcl_fused.distributed``'s ring mode)
--------------------------------------------------------------------------------
The columns may be split into blocks ``C = [C_0 | C_1 | ...]`` handled by separate calls, each with the
partner index and ``self_offset`` re-based into that block (-1 where the partner / self column lies in
another block). Without ``bayes`` the blocks combine exactly (:func:`combine_blocks`):
``lse_ki = log Σ_b exp(lse_ki^(b))``, ``pos`` and ``pos_in`` are the sums over blocks (only the partner's
block contributes), and ``backward`` of block b called with the COMBINED lse returns that block's part of
dA (summed over blocks) and exactly its columns' dC.
The Bayesian weights rank each element among its row's set over ALL blocks, so an engine implementing
"ssl_ranked" provides two more things:
  set_values(A, C, partner, self_offset, inv_tau, cfg) -> (vals [M, N], cnt [M] int64):
      row i of vals = the ascending values s_ij, j ∈ set(i) of this block, then +inf; cnt_i = |set(i)|.
  forward / backward with ``rank_ref=(ref [M, L], n [M] int64)``: ``ref_i[:n_i]`` ascending (the rest is
      ignored), and then ``u_ij = #{l < n_i: ref_il <= s_ij} / n_i`` replaces the within-block count.
:func:`merge_set_values` builds ``rank_ref`` from every block's ``set_values`` (one sort per row); an
engine must compute a block's values bit-identically in ``set_values``, ``forward`` and ``backward`` (the
same GEMM and masks), so that an element finds itself and its exact ties in the reference. With
``rank_ref = merge_set_values([set_values(whole C)])`` the ranked call equals the plain one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from .contract import acc_dtype
from .first_order import first_order

__all__ = ["SSLConfig", "SSLStats", "bayes_omega", "dense_forward", "dense_backward", "dense_set_values",
           "ssl_row_stats", "DenseSSLEngine", "combine_blocks", "merge_set_values"]


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


def _dense_weights(s, in_set, cfg, rank_ref=None):
    if cfg.bayes is None:
        return torch.where(in_set, torch.ones_like(s), torch.zeros_like(s))
    if rank_ref is None:
        # u_ij = #{k in set(i): s_ik <= s_ij} / n_i, literally (an M×N×N comparison: tiny shapes only)
        le = (s[:, None, :] <= s[:, :, None]) & in_set[:, None, :]
        n = in_set.sum(1, keepdim=True).clamp(min=1).to(s.dtype)
    else:  # u_ij = #{l < n_i: ref_il <= s_ij} / n_i (column blocks), literally
        ref, rn = rank_ref
        live = torch.arange(ref.shape[1], device=s.device)[None, :] < rn[:, None]
        le = (ref.to(s.dtype)[:, None, :] <= s[:, :, None]) & live[:, None, :]
        n = rn[:, None].clamp(min=1).to(s.dtype)
    u = le.sum(2).to(s.dtype) / n
    return torch.where(in_set, bayes_omega(u, *cfg.bayes), torch.zeros_like(s))


def dense_set_values(A, C, partner, self_offset, inv_tau, cfg: SSLConfig):
    """Literal transcription of ``set_values`` (column blocks): row-sorted set values, +inf after them."""
    g, in_set, _ = _dense_sets(A, C, partner, self_offset, cfg)
    s = g * inv_tau
    vals = torch.where(in_set, s, torch.full_like(s, math.inf)).sort(dim=1).values
    return vals, in_set.sum(1).to(torch.int64)


def dense_forward(A, C, partner, self_offset, inv_tau, cfg: SSLConfig, rank_ref=None) -> SSLStats:
    """Literal dense transcription of the forward contract (test oracle for the backends)."""
    g, in_set, is_partner = _dense_sets(A, C, partner, self_offset, cfg)
    s = g * inv_tau
    w = _dense_weights(s, in_set, cfg, rank_ref)
    lse = []
    bad = poisoned_rows(g)
    for c in cfg.scales:
        terms = torch.where(in_set & (w > 0), torch.log(w) + c * s, torch.full_like(s, -math.inf))
        lse.append(torch.where(bad, math.nan, torch.logsumexp(terms, dim=1)))
    pos = torch.where(is_partner, s, torch.zeros_like(s)).sum(1)
    pos_in = (is_partner & in_set).any(1).to(s.dtype)
    return SSLStats(torch.stack(lse), pos, pos_in)


def dense_backward(A, C, partner, self_offset, inv_tau, cfg: SSLConfig, lse, coef, cpos, rank_ref=None):
    """Literal dense transcription of the backward contract (test oracle for the backends)."""
    g, in_set, is_partner = _dense_sets(A, C, partner, self_offset, cfg)
    s = g * inv_tau
    w = _dense_weights(s, in_set, cfg, rank_ref)
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
    ops = frozenset({"ssl", "ssl_ranked"})

    def unavailable_reason(self, device):
        return None

    def ssl_forward(self, A, C, partner, self_offset, inv_tau, cfg, rank_ref=None):
        return dense_forward(A, C, partner, self_offset, inv_tau, cfg, rank_ref)

    def ssl_backward(self, A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos, rank_ref=None):
        return dense_backward(A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos, rank_ref)

    def ssl_set_values(self, A, C, partner, self_offset, inv_tau, cfg):
        return dense_set_values(A, C, partner, self_offset, inv_tau, cfg)


# ----------------------------------------------------------------------------------------------
# column blocks: the exact combination rules (see the module doc)
# ----------------------------------------------------------------------------------------------

def combine_blocks(per_block) -> SSLStats:
    """Statistics over all columns from the per-block ones (a sequence of SSLStats, any block order)."""
    lse = torch.logsumexp(torch.stack([b.lse for b in per_block]), dim=0)  # all −inf -> −inf
    pos = torch.stack([b.pos for b in per_block]).sum(0)
    pos_in = torch.stack([b.pos_in for b in per_block]).sum(0)
    return SSLStats(lse, pos, pos_in)


def merge_set_values(per_block, dtype=None):
    """The rank reference ``(ref [M, L], n [M])`` from every block's ``set_values`` output.

    Each block's values are cut to its longest row first (+inf padding is all that is dropped), then one
    sort per row; ``L >= 1`` (an all-+inf column when every set is empty).
    """
    vals = [v[:, : int(c.max())] if c.numel() else v[:, :0] for v, c in per_block]
    n = torch.stack([c for _, c in per_block]).sum(0)
    ref = torch.cat(vals, dim=1) if vals else None
    if ref is None or ref.shape[1] == 0:
        M = per_block[0][1].shape[0]
        dev = per_block[0][0].device
        dt = dtype or per_block[0][0].dtype
        return torch.full((M, 1), math.inf, dtype=dt, device=dev), n
    ref = ref.sort(dim=1).values[:, : max(1, int(n.max()) if n.numel() else 1)]
    return ref.contiguous(), n


# ----------------------------------------------------------------------------------------------
# autograd wrapper
# ----------------------------------------------------------------------------------------------

class _SSLRowStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, C, partner, self_offset, inv_tau, cfg, engine, fn, symmetric=False):
        kw = {"symmetric": True} if symmetric else {}
        lse, pos, pos_in = engine.ssl_forward(A, C, partner, self_offset, inv_tau, cfg, **kw)
        ctx.save_for_backward(A, C, partner, lse)
        ctx.cfg = (self_offset, inv_tau, cfg, engine, symmetric)
        ctx.fn = fn
        ctx.mark_non_differentiable(pos_in)
        return lse, pos, pos_in

    @staticmethod
    def backward(ctx, g_lse, g_pos, _g_pos_in):
        A, C, partner, lse = ctx.saved_tensors
        self_offset, inv_tau, cfg, engine, symmetric = ctx.cfg
        coef = torch.zeros_like(lse) if g_lse is None else g_lse.to(lse.dtype).contiguous()
        cpos = torch.zeros_like(lse[0]) if g_pos is None else g_pos.to(lse.dtype).contiguous()
        with torch.no_grad():  # first-order only (see first_order.py)
            kw = {"symmetric": True} if symmetric else {}
            # symmetric: (dX, None); C is an alias view of A, so autograd gives A the whole dX
            dA, dC = engine.ssl_backward(A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos, **kw)
        dA, dC = first_order(ctx.fn, engine.name, (dA if ctx.needs_input_grad[0] else None,
                                                   dC if ctx.needs_input_grad[1] else None), (A, C))
        return (dA, dC, None, None, None, None, None, None, None)


def ssl_row_stats(engine, A: torch.Tensor, C: torch.Tensor, partner: torch.Tensor, *, self_offset: int,
                  inv_tau: float, cfg: SSLConfig, fn: str = "ltcl_fused") -> SSLStats:
    """Differentiable SSL row statistics of S = A Cᵀ·inv_tau computed by ``engine`` (see the module doc).

    ``fn`` names the calling loss in the error raised on double backward; ``C is A`` is passed as an alias
    (torch.compile refuses one tensor twice in ``apply``).

    The symmetric path (one GEMM per pair of row blocks, about half the work) is taken when ``C is A``,
    ``self_offset == 0``, there are no Bayesian weights and the engine lists "ssl" in ``symmetric_ops``
    (decided from object identity: no host read)."""
    sym = (C is A and int(self_offset) == 0 and cfg.bayes is None
           and "ssl" in getattr(engine, "symmetric_ops", frozenset()))
    same_c = C is A
    A, partner = A.contiguous(), partner.to(torch.int64).contiguous()
    C = A.view_as(A) if same_c else C.contiguous()
    check_inputs(A, C, partner, self_offset, cfg)
    return SSLStats(*_SSLRowStatsFn.apply(A, C, partner, int(self_offset), float(inv_tau), cfg, engine, fn,
                                          bool(sym)))
