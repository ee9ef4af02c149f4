"""Ring mode: per-row statistics of local anchors against the global columns, with no rank ever
holding more than its own column block plus the one in flight.

Forward: the column blocks travel around the ring (rank r sends to r+1, receives from r−1); while the
next block is in flight the engine reduces the current one to per-row statistics, combined exactly:
``lse = logaddexp(lse, lse_blk)`` and the positive sums added. The AFCL focal terms need the final
global LSE, so a focal forward makes a second sweep that evaluates them block by block given that LSE
(the engine's forward normalises by its own LSE, so that pass is written here in chunked PyTorch,
reusing the contract's ``focal_terms``). Backward: a third sweep recomputes every block; ``dA``
accumulates locally through the engine's backward (which takes the global LSE), and each block's
``dC`` accumulator travels with it and arrives, summed over all ranks, back at its owner.
Memory per rank: O(local rows · D + largest block · D) for features plus O(global rows) for labels.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..engine.contract import acc_dtype, focal_terms, logp_given_stats, softplus
from ..engine.first_order import first_order
from ..engine.function import RowStats, backward_coefficients, dominant_is_negative
from .gather import global_rank, world

__all__ = ["ring_row_stats"]

_TAG_BLOCK, _TAG_GRAD = 17, 18
#: elements of one chunk of similarity rows in the focal pass written here
FOCAL_BLOCK_ELEMENTS = 1 << 20


class _Ring:
    """Neighbour bookkeeping: block k of the sweep on rank r is owned by rank (r − k) mod W."""

    def __init__(self, group, sizes: Sequence[int]):
        self.group = group
        self.rank, self.W = world(group)
        self.sizes = [int(s) for s in sizes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.nxt = global_rank(group, (self.rank + 1) % self.W)
        self.prv = global_rank(group, (self.rank - 1) % self.W)

    def owner(self, k: int) -> int:
        return (self.rank - k) % self.W

    def cols(self, owner: int) -> slice:
        return slice(self.offsets[owner], self.offsets[owner + 1])

    def exchange(self, send: torch.Tensor, recv_rows: int, tag: int):
        """Post send of ``send`` to the next rank and receive of ``recv_rows`` rows from the previous one."""
        incoming = send.new_empty((recv_rows,) + tuple(send.shape[1:]))
        reqs = [dist.isend(send, self.nxt, group=self.group, tag=tag),
                dist.irecv(incoming, self.prv, group=self.group, tag=tag)]
        return incoming, reqs

    def sweep(self, X_local: torch.Tensor, fn):
        """Call ``fn(k, owner, block)`` for every column block, the next one travelling meanwhile."""
        cur = X_local
        for k in range(self.W):
            reqs = []
            if k < self.W - 1:
                nxt_block, reqs = self.exchange(cur, self.sizes[self.owner(k + 1)], _TAG_BLOCK)
            fn(k, self.owner(k), cur)
            for q in reqs:
                q.wait()
            if k < self.W - 1:
                cur = nxt_block

    def grad_sweep(self, X_local: torch.Tensor, fn) -> torch.Tensor:
        """A sweep for the backward: ``fn(k, owner, block)`` returns this rank's gradient contribution to
        the columns of ``block``; that block's accumulator travels with it (one hop behind) and arrives,
        summed over all ranks, back at its owner. Returns the gradient of this rank's own block."""
        state = {"acc_in": None, "reqs": []}

        def step(k, owner, blk):
            dC_k = fn(k, owner, blk)
            for q in state["reqs"]:  # the accumulator of this block, from the previous rank
                q.wait()
            acc_blk = dC_k if state["acc_in"] is None else state["acc_in"].add_(dC_k)
            # pass the accumulator on; it reaches the owner after W hops (the last one lands at home)
            state["acc_in"], state["reqs"] = self.exchange(acc_blk.contiguous(), self.sizes[self.owner(k + 1)],
                                                           _TAG_GRAD)
            state["keep"] = acc_blk  # the send buffer must live until its request completes

        self.sweep(X_local, step)
        for q in state["reqs"]:
            q.wait()
        return state["acc_in"]


def _focal_pass(A, blk, a_lab, b_lab, self_offset, inv_tau, bias_same, bias_other, lse, top, lrest, gamma):
    """Σ_P f⁺, Σ_N f⁻, Σ_P u⁺, Σ_N u⁻ of one column block given the global row statistics (lse, and the
    dominant column ``top`` as an index into this block or −1, with ``lrest``), chunked over rows."""
    acc = acc_dtype(A.dtype)
    M, n = A.shape[0], blk.shape[0]
    out = [torch.zeros(M, dtype=acc, device=A.device) for _ in range(4)]
    if n == 0 or M == 0:
        return out
    Bacc = blk.to(acc)
    rows = max(1, min(M, FOCAL_BLOCK_ELEMENTS // n))
    cidx = torch.arange(n, device=A.device)[None, :]
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        s = (A[r0:r1].to(acc) @ Bacc.T) * inv_tau
        if self_offset >= 0:
            valid = cidx != (torch.arange(r0, r1, device=A.device)[:, None] + self_offset)
        else:
            valid = torch.ones_like(s, dtype=torch.bool)
        pos = (a_lab[r0:r1, None] == b_lab[None, :]) & valid
        neg = valid & ~pos
        x = s if bias_same is None else s + torch.where(pos, bias_same.to(acc)[None, :], bias_other.to(acc)[None, :])
        is_top = (cidx == top[r0:r1, None]) & valid
        logp, log1mp = logp_given_stats(x, valid, lse[r0:r1], top[r0:r1], lrest[r0:r1], is_top)
        fp, fn, up, un = focal_terms(logp, log1mp, gamma, is_top, lrest[r0:r1])
        z = torch.zeros_like(s)
        out[0][r0:r1] = torch.where(pos, fp, z).sum(1)
        out[1][r0:r1] = torch.where(neg, fn, z).sum(1)
        out[2][r0:r1] = torch.where(pos, up, z).sum(1)
        out[3][r0:r1] = torch.where(neg & ~is_top, un, z).sum(1)  # the contract's uneg leaves the top out
    return out


def _combine(lse_k, top_k, lrest_k):
    """Exact row statistics over all blocks from the per-block ones (``[W, M]``, block index = owner rank).

    The dominant column is the one of the block with the largest row maximum m_k = lse_k − softplus(lrest_k)
    (the first such block in column order on ties); ``rest`` over the whole row is that block's rest plus
    every other block's ``exp(lse_k − m)``, summed in log space (exact at any lead: every lrest_k is).
    A block whose rows are poisoned (NaN statistics: a non-finite input) poisons the whole row.
    Returns (lse, best block, top within it, lrest).
    """
    ninf = torch.tensor(-math.inf, dtype=lse_k.dtype, device=lse_k.device)
    nonempty_k = top_k >= 0
    poisoned = torch.isnan(lse_k).any(0)
    m_k = torch.where(nonempty_k, lse_k - softplus(lrest_k), ninf)
    best = torch.argmax(m_k, dim=0)  # the first maximal block
    m = m_k.gather(0, best[None]).squeeze(0)
    nonempty = nonempty_k.any(0)
    m_safe = torch.where(nonempty, m, torch.zeros_like(m))
    is_best = torch.arange(lse_k.shape[0], device=lse_k.device)[:, None] == best[None, :]
    terms = torch.where(is_best, lrest_k, torch.where(nonempty_k, lse_k - m_safe[None, :], ninf))
    lrest = torch.logsumexp(terms, dim=0)
    lse = torch.where(nonempty, m_safe + softplus(lrest), ninf)
    nonempty = nonempty & ~poisoned
    nan = torch.full_like(lse, math.nan)
    lse, lrest = torch.where(poisoned, nan, lse), torch.where(poisoned, nan, lrest)
    top = torch.where(nonempty, top_k.gather(0, best[None]).squeeze(0), torch.full_like(best, -1))
    best = torch.where(nonempty, best, torch.full_like(best, -1))
    return lse, best, top, lrest


def _top_in(best, top, owner):
    """The dominant column as an index into block ``owner`` (−1 where it lies in another block)."""
    return torch.where(best == owner, top, torch.full_like(top, -1)).contiguous()


def _bias(b, sl):
    return None if b is None else b[sl].contiguous()


class _RingRowStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, X, a_lab, c_lab, bias_same, bias_other, sizes, anchor_offset, inv_tau, gamma, focal,
                engine, group):
        ring = _Ring(group, sizes)
        acc = acc_dtype(A.dtype)
        M = A.shape[0]
        pos_sum = torch.zeros(M, dtype=acc, device=A.device)
        per_block = [None] * ring.W

        def lse_step(k, owner, blk):
            nonlocal pos_sum
            sl = ring.cols(owner)
            so = anchor_offset if owner == ring.rank else -1
            out = engine.rowstats_forward(A, blk, a_lab, c_lab[sl].contiguous(), so, inv_tau,
                                          _bias(bias_same, sl), _bias(bias_other, sl), 0.0, False)
            per_block[owner] = (out[0], out[6], out[7])  # lse, top, lrest of this block
            pos_sum = pos_sum + out[1]

        ring.sweep(X, lse_step)
        lse, best, top, lrest = _combine(*(torch.stack([b[i] for b in per_block]) for i in range(3)))
        del per_block
        z = torch.zeros_like(lse)
        fpos, fneg, upos, uneg = z, z.clone(), z.clone(), z.clone()
        if focal:
            def focal_step(k, owner, blk):
                sl = ring.cols(owner)
                so = anchor_offset if owner == ring.rank else -1
                parts = _focal_pass(A, blk, a_lab, c_lab[sl], so, inv_tau, _bias(bias_same, sl),
                                    _bias(bias_other, sl), lse, _top_in(best, top, owner), lrest, gamma)
                for t, p in zip((fpos, fneg, upos, uneg), parts):
                    t.add_(p)

            ring.sweep(X, focal_step)
        ctx.save_for_backward(A, X, a_lab, c_lab, bias_same, bias_other, lse, upos, uneg, best, top, lrest)
        ctx.cfg = (list(sizes), anchor_offset, inv_tau, gamma, focal, engine, group)
        return lse, pos_sum, fpos, fneg

    @staticmethod
    def backward(ctx, g_lse, g_pos, g_fpos, g_fneg):
        with torch.no_grad():  # first-order only (ltcl_fused/engine/first_order.py)
            dA, dX, *rest = _RingRowStatsFn._backward(ctx, g_lse, g_pos, g_fpos, g_fneg)
        A, X = ctx.saved_tensors[:2]
        dA, dX = first_order("ltcl_fused.distributed (mode='ring')", ctx.cfg[5].name, (dA, dX), (A, X))
        return (dA, dX, *rest)

    @staticmethod
    def _backward(ctx, g_lse, g_pos, g_fpos, g_fneg):
        A, X, a_lab, c_lab, bias_same, bias_other, lse, upos, uneg, best, top, lrest = ctx.saved_tensors
        sizes, anchor_offset, inv_tau, gamma, focal, engine, group = ctx.cfg
        offs = torch.tensor(_Ring(group, sizes).offsets[:-1], dtype=torch.int64, device=lse.device)
        gtop = torch.where(top >= 0, offs[best.clamp(min=0)] + top.clamp(min=0), top)  # global column index
        cpos, cposf, cneg, r, rt = backward_coefficients(
            (g_lse, g_pos, g_fpos, g_fneg), lse, upos, uneg, dominant_is_negative(gtop, a_lab, c_lab), focal)
        ring = _Ring(group, sizes)
        dA = torch.zeros(A.shape, dtype=acc_dtype(A.dtype), device=A.device)

        def grad_step(k, owner, blk):
            sl = ring.cols(owner)
            so = anchor_offset if owner == ring.rank else -1
            dA_k, dC_k = engine.rowstats_backward(A, blk, a_lab, c_lab[sl].contiguous(), so, inv_tau,
                                                  _bias(bias_same, sl), _bias(bias_other, sl), gamma, focal,
                                                  lse, _top_in(best, top, owner), lrest, cpos, cposf, cneg, r,
                                                  rt)
            dA.add_(dA_k)
            return dC_k

        dX = ring.grad_sweep(X, grad_step)
        return (dA.to(A.dtype) if ctx.needs_input_grad[0] else None, dX if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None, None, None, None, None)


def ring_row_stats(engine, A: torch.Tensor, X: torch.Tensor, a_lab: torch.Tensor, c_lab: torch.Tensor,
                   sizes: Sequence[int], *, anchor_offset: int, inv_tau: float,
                   bias_same: Optional[torch.Tensor] = None, bias_other: Optional[torch.Tensor] = None,
                   gamma: float = 0.0, focal: bool = False, group=None) -> RowStats:
    """Row statistics of this rank's anchors ``A`` against the global columns, ring style.

    ``X`` is this rank's column block (rows ``sizes[rank]``); the global columns are every rank's block in
    rank order, ``c_lab`` (and the optional ``bias_*``) are their labels (biases) in that order, length
    ``sum(sizes)``. Anchor i's self column is row ``i + anchor_offset`` of this rank's own block
    (``anchor_offset=-1``: none). Same outputs and gradients as ``row_stats`` on the gathered columns.
    """
    rank, W = world(group)
    if len(sizes) != W or int(sizes[rank]) != X.shape[0] or int(sum(sizes)) != c_lab.shape[0]:
        raise ValueError(f"ltcl_fused.distributed: inconsistent ring sizes {list(sizes)} for a local block of "
                         f"{X.shape[0]} rows and {c_lab.shape[0]} global labels")
    out = _RingRowStatsFn.apply(A.contiguous(), X.contiguous(), a_lab.contiguous(), c_lab.contiguous(),
                                bias_same, bias_other, [int(s) for s in sizes], int(anchor_offset),
                                float(inv_tau), float(gamma), bool(focal), engine, group)
    return RowStats(*out)
