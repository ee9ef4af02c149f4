"""Ring mode for the self-supervised row statistics (``ltcl_fused/engine/ssl_contract.py``): per-row SSL
statistics of this rank's anchors against the global columns, no rank ever holding more than its own
column block plus the one in flight.

Plain sets (DCL, HCL, MTTV): one forward sweep; each column block is reduced by the engine's
``ssl_forward`` (partner and self column re-based into the block, −1 where they lie elsewhere) and the
blocks combine exactly (``combine_blocks``: log-sum-exp of the per-block lse, the positive from its
block). Backward: one sweep in which the engine's ``ssl_backward`` of every block, given the combined
lse, adds to dA and produces that block's dC, whose accumulator travels on and lands, summed over all
ranks, at its owner (``_Ring.grad_sweep``, shared with the softmax ring).

Bayesian weights (exact ranks among ALL of a row's negatives): the anchors go in row groups of R rows,
``R = max(1, RANK_BUDGET_ELEMENTS // N_global)``, the same number of groups G on every rank (the largest
rank's). Per group a rank sweep collects every block's row-sorted set values (``ssl_set_values``) and
merges them into the group's rank reference (``merge_set_values``: R × L values, L <= N_global − 2), then
a weighting sweep runs ``ssl_forward(..., rank_ref=...)`` per block and combines as above. The backward
repeats the rank sweep per group (nothing of size R × N is kept between forward and backward), then a
gradient sweep. Sweeps: forward 1 (plain) or 2G (Bayes), backward 1 or 2G.
Memory per rank: features O((local rows + largest block) · D) (+ the block's dC accumulator in backward),
per-row statistics O(W · K · local rows), and for the Bayesian ranks at most about
``RANK_BUDGET_ELEMENTS · (3 · sizeof(acc dtype) + 8)`` bytes while a reference is merged (values, their
sorted copy, the sort's int64 indices), plus the engine's own block working set.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from ..engine.contract import acc_dtype
from ..engine.first_order import first_order
from ..engine.ssl_contract import SSLConfig, SSLStats, combine_blocks, merge_set_values
from .gather import world
from .ring import _Ring

__all__ = ["ring_ssl_row_stats", "RANK_BUDGET_ELEMENTS"]

#: elements of one row group's rank reference (rows per group = this // global columns, at least 1)
RANK_BUDGET_ELEMENTS = int(os.environ.get("LTCL_RING_RANK_ELEMENTS", 1 << 22))


def _in_block(ring: _Ring, owner: int, partner: torch.Tensor, anchor_offset: int, r0: int):
    """Partner (global column) re-based into block ``owner`` (−1 elsewhere) and the self offset there for
    the anchors r0.. (their self columns are rows ``r0 + anchor_offset + i`` of this rank's own block)."""
    off, n = ring.offsets[owner], ring.sizes[owner]
    p = torch.where((partner >= off) & (partner < off + n), partner - off, torch.full_like(partner, -1))
    so = anchor_offset + r0 if (owner == ring.rank and anchor_offset >= 0) else -1
    return p.contiguous(), so


def _row_groups(ring: _Ring, anchor_sizes: Sequence[int], bayes: bool):
    """(r0, r1) row groups of this rank's anchors; the same count on every rank (empty groups included)."""
    M = int(anchor_sizes[ring.rank])
    if not bayes:
        return [(0, M)]
    R = max(1, RANK_BUDGET_ELEMENTS // max(1, ring.offsets[-1]))
    G = max(1, max(math.ceil(int(m) / R) for m in anchor_sizes))
    return [(min(M, g * R), min(M, (g + 1) * R)) for g in range(G)]


def _rank_sweep(ring, engine, A_g, X, partner_g, anchor_offset, r0, inv_tau, cfg):
    """The group's rank reference: every block's sorted set values, merged (one sweep)."""
    per_block = [None] * ring.W

    def step(k, owner, blk):
        if A_g.shape[0] == 0:
            return
        p, so = _in_block(ring, owner, partner_g, anchor_offset, r0)
        vals, cnt = engine.ssl_set_values(A_g, blk, p, so, inv_tau, cfg)
        per_block[owner] = (vals[:, : int(cnt.max())] if cnt.numel() else vals, cnt)  # drop +inf padding now

    ring.sweep(X, step)
    if A_g.shape[0] == 0:
        return None
    return merge_set_values(per_block)


def _forward_group(ring, engine, A_g, X, partner_g, anchor_offset, r0, inv_tau, cfg, rank_ref) -> SSLStats:
    per_block = [None] * ring.W

    def step(k, owner, blk):
        if A_g.shape[0] == 0:
            return
        p, so = _in_block(ring, owner, partner_g, anchor_offset, r0)
        kw = {} if rank_ref is None else {"rank_ref": rank_ref}
        per_block[owner] = engine.ssl_forward(A_g, blk, p, so, inv_tau, cfg, **kw)

    ring.sweep(X, step)
    if A_g.shape[0] == 0:
        acc = acc_dtype(A_g.dtype)
        z = torch.zeros(0, dtype=acc, device=A_g.device)
        return SSLStats(torch.zeros(len(cfg.scales), 0, dtype=acc, device=A_g.device), z, z.clone())
    return combine_blocks(per_block)


class _RingSSLFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, X, partner, sizes, anchor_sizes, anchor_offset, inv_tau, cfg, engine, group):
        ring = _Ring(group, sizes)
        bayes = cfg.bayes is not None
        parts = []
        for r0, r1 in _row_groups(ring, anchor_sizes, bayes):
            A_g, p_g = A[r0:r1], partner[r0:r1]
            ref = _rank_sweep(ring, engine, A_g, X, p_g, anchor_offset, r0, inv_tau, cfg) if bayes else None
            parts.append(_forward_group(ring, engine, A_g, X, p_g, anchor_offset, r0, inv_tau, cfg, ref))
        lse = torch.cat([p.lse for p in parts], 1)
        pos = torch.cat([p.pos for p in parts])
        pos_in = torch.cat([p.pos_in for p in parts])
        ctx.save_for_backward(A, X, partner, lse)
        ctx.cfg = (list(sizes), list(anchor_sizes), anchor_offset, inv_tau, cfg, engine, group)
        ctx.mark_non_differentiable(pos_in)
        return lse, pos, pos_in

    @staticmethod
    def backward(ctx, g_lse, g_pos, _g_pos_in):
        A, X, partner, lse = ctx.saved_tensors
        sizes, anchor_sizes, anchor_offset, inv_tau, cfg, engine, group = ctx.cfg
        coef = torch.zeros_like(lse) if g_lse is None else g_lse.to(lse.dtype).contiguous()
        cpos = torch.zeros_like(lse[0]) if g_pos is None else g_pos.to(lse.dtype).contiguous()
        ring = _Ring(group, sizes)
        bayes = cfg.bayes is not None
        dA = torch.zeros(A.shape, dtype=acc_dtype(A.dtype), device=A.device)
        with torch.no_grad():  # first-order only (ltcl_fused/engine/first_order.py)
            dX = _backward_groups(ring, engine, A, X, partner, anchor_sizes, anchor_offset, inv_tau, cfg, lse,
                                  coef, cpos, dA, bayes)
        dA, dX = first_order("ltcl_fused.distributed (mode='ring')", engine.name, (dA.to(A.dtype), dX), (A, X))
        return (dA if ctx.needs_input_grad[0] else None, dX if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, None)


def _backward_groups(ring, engine, A, X, partner, anchor_sizes, anchor_offset, inv_tau, cfg, lse, coef, cpos, dA,
                     bayes):
    """The ring backward over the row groups: accumulates dA in place, returns dX."""
    dX = None
    for r0, r1 in _row_groups(ring, anchor_sizes, bayes):
        A_g, p_g = A[r0:r1], partner[r0:r1]
        ref = _rank_sweep(ring, engine, A_g, X, p_g, anchor_offset, r0, inv_tau, cfg) if bayes else None
        lse_g, coef_g, cpos_g = lse[:, r0:r1].contiguous(), coef[:, r0:r1].contiguous(), cpos[r0:r1].contiguous()

        def grad_step(k, owner, blk):
            if A_g.shape[0] == 0:
                return torch.zeros(blk.shape, dtype=X.dtype, device=X.device)
            p, so = _in_block(ring, owner, p_g, anchor_offset, r0)
            kw = {} if ref is None else {"rank_ref": ref}
            dA_k, dC_k = engine.ssl_backward(A_g, blk, p, so, inv_tau, cfg, lse_g, coef_g, cpos_g, **kw)
            dA[r0:r1].add_(dA_k)
            return dC_k.to(X.dtype)

        d = ring.grad_sweep(X, grad_step)
        dX = d if dX is None else dX.add_(d)
    return dX


def ring_ssl_row_stats(engine, A: torch.Tensor, X: torch.Tensor, partner: torch.Tensor, sizes: Sequence[int],
                       anchor_sizes: Sequence[int], *, anchor_offset: int, inv_tau: float, cfg: SSLConfig,
                       group=None) -> SSLStats:
    """SSL row statistics of this rank's anchors ``A`` against the global columns, ring style.

    ``X`` is this rank's column block (``sizes[rank]`` rows); the global columns are every rank's block in
    rank order. ``partner`` holds global column indices (−1: none); anchor i's self column is row
    ``i + anchor_offset`` of this rank's own block (−1: none). ``anchor_sizes`` is every rank's anchor
    count (for the Bayesian row groups). Same outputs and gradients as ``ssl_row_stats`` on the gathered
    columns. The Bayesian weights need an engine with the "ssl_ranked" operation.
    """
    rank, W = world(group)
    if len(sizes) != W or int(sizes[rank]) != X.shape[0] or len(anchor_sizes) != W or \
            int(anchor_sizes[rank]) != A.shape[0]:
        raise ValueError(f"ltcl_fused.distributed: inconsistent ring sizes {list(sizes)} / anchors "
                         f"{list(anchor_sizes)} for a local block of {X.shape[0]} rows and {A.shape[0]} anchors")
    if cfg.bayes is not None and "ssl_ranked" not in engine.ops:
        raise NotImplementedError(f"ltcl_fused.distributed: backend {engine.name!r} has no column-block ranks "
                                  f"('ssl_ranked') for the Bayesian weights in ring mode; use mode='gather' or "
                                  f"backend='torch'/'cpu'")
    out = _RingSSLFn.apply(A.contiguous(), X.contiguous(), partner.to(torch.int64).contiguous(),
                           [int(s) for s in sizes], [int(s) for s in anchor_sizes], int(anchor_offset),
                           float(inv_tau), cfg, engine, group)
    return SSLStats(*out)
