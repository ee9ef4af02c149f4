"""Autograd wrapper of the engine: per-row statistics in, exact gradients out (recompute backward)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .first_order import first_order


class RowStats(NamedTuple):
    lse: torch.Tensor      # log Σ_{A(i)} exp(s_ij + b_ij)
    pos_sum: torch.Tensor  # Σ_{P(i)} s_ij
    fpos: torch.Tensor     # Σ_{P(i)} f⁺(p_ij)  (zeros unless focal)
    fneg: torch.Tensor     # Σ_{N(i)} f⁻(p_ij)  (zeros unless focal)


def dominant_is_negative(top: torch.Tensor, a_lab: torch.Tensor, c_lab: torch.Tensor) -> torch.Tensor:
    """Whether each row's dominant column (``top``, −1 for an empty row) is a negative of that row."""
    return (top >= 0) & (c_lab[top.clamp(min=0)] != a_lab)


def backward_coefficients(grads, lse, upos, uneg, top_neg, focal: bool):
    """The contract's chain rule: upstream gradients of (lse, pos_sum, fpos, fneg) -> the per-row
    backward inputs (cpos, cposf, cneg, r, rt) of ``rowstats_backward`` (None gradients count as 0)."""
    zero = torch.zeros_like(lse)
    g_lse, g_pos, g_fpos, g_fneg = (zero if g is None else g.to(lse.dtype) for g in grads)
    if focal:
        r = torch.where(g_fpos != 0, g_fpos * upos, zero) + torch.where(g_fneg != 0, g_fneg * uneg, zero) - g_lse
        # the dominant negative's f⁻: the engine applies rt·p_ij/rest_i (its u⁻ = 1/rest) to the other
        # columns as rt·exp(log p_ij − lrest_i), which cannot overflow where rest underflows
        rt = torch.where(top_neg & (g_fneg != 0), g_fneg, zero)
    else:
        g_fpos = g_fneg = zero
        r, rt = -g_lse, zero
    return tuple(t.contiguous() for t in (g_pos, g_fpos, g_fneg, r, rt))


class _RowStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, C, a_lab, c_lab, bias_same, bias_other, self_offset, inv_tau, gamma, focal, engine, fn,
                symmetric=False):
        lse, pos_sum, fpos, fneg, upos, uneg, top, lrest = engine.rowstats_forward(
            A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal)
        ctx.save_for_backward(A, C, a_lab, c_lab, bias_same, bias_other, lse, upos, uneg, top, lrest)
        ctx.cfg = (self_offset, inv_tau, gamma, focal, engine)
        ctx.fn = fn
        ctx.symmetric = symmetric
        return lse, pos_sum, fpos, fneg

    @staticmethod
    def backward(ctx, g_lse, g_pos, g_fpos, g_fneg):
        A, C, a_lab, c_lab, bias_same, bias_other, lse, upos, uneg, top, lrest = ctx.saved_tensors
        self_offset, inv_tau, gamma, focal, engine = ctx.cfg
        cpos, cposf, cneg, r, rt = backward_coefficients(
            (g_lse, g_pos, g_fpos, g_fneg), lse, upos, uneg, dominant_is_negative(top, a_lab, c_lab), focal)
        # symmetric backward (issue 12): C is A, so dX = dA + dC comes back as dA (dC None)
        sym = {"symmetric": True} if ctx.symmetric else {}
        with torch.no_grad():  # first-order only (see first_order.py)
            dA, dC = engine.rowstats_backward(A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other,
                                              gamma, focal, lse, top, lrest, cpos, cposf, cneg, r, rt, **sym)
        dA, dC = first_order(ctx.fn, engine.name, (dA if ctx.needs_input_grad[0] else None,
                                                   dC if ctx.needs_input_grad[1] else None), (A, C))
        return (dA, dC, None, None, None, None, None, None, None, None, None, None, None)


def row_stats(engine, A: torch.Tensor, C: torch.Tensor, a_lab: torch.Tensor, c_lab: torch.Tensor, *,
              self_offset: int, inv_tau: float, bias_same: Optional[torch.Tensor] = None,
              bias_other: Optional[torch.Tensor] = None, gamma: float = 0.0, focal: bool = False,
              fn: str = "ltcl_fused") -> RowStats:
    """Differentiable per-anchor statistics of S = A Cᵀ·inv_tau computed by ``engine`` (never N×N).

    ``fn`` names the calling loss in the error raised on double backward. ``C is A`` (and ``c_lab is a_lab``)
    is allowed: the second is passed as an alias, since torch.compile refuses one tensor twice in ``apply``."""
    # symmetric backward (issue 12): the anchors are the columns and the engine has a one-kernel dX for it
    symmetric = C is A and c_lab is a_lab and self_offset == 0 and "rowstats" in getattr(engine, "symmetric_ops", ())
    A, C, a_lab, c_lab = A.contiguous(), C.contiguous(), a_lab.contiguous(), c_lab.contiguous()
    C = C.view_as(C) if C is A else C
    c_lab = c_lab.view_as(c_lab) if c_lab is a_lab else c_lab
    out = _RowStatsFn.apply(A, C, a_lab, c_lab, bias_same, bias_other, int(self_offset), float(inv_tau),
                            float(gamma), bool(focal), engine, fn, symmetric)
    return RowStats(*out)
