"""backend="torch": the engine contract in plain PyTorch, one block of anchor rows at a time.

Runs on any device. Memory is O(block · N) instead of O(M · N): the similarity rows of one block
are formed, reduced to the per-row statistics and dropped; the backward recomputes them from the
saved statistics (``ltcl_fused/engine/contract.py``).
"""
from __future__ import annotations

import os

import torch

from ..engine.contract import acc_dtype, backward_tile, finish_rows, focal_terms, row_logp, softplus
from .base import Engine
from .ssl_torch import SSLTorchMixin

#: elements of one block of similarity rows (rows per block = BLOCK_ELEMENTS // N, at least 1)
BLOCK_ELEMENTS = int(os.environ.get("LTCL_TORCH_BLOCK_ELEMENTS", 1 << 20))


def _row_blocks(M: int, N: int):
    rows = max(1, min(M, BLOCK_ELEMENTS // max(N, 1)))
    for r0 in range(0, M, rows):
        yield r0, min(M, r0 + rows)


def _block_logits(A_blk, Cacc, r0, a_lab_blk, c_lab, self_offset, inv_tau, bias_same, bias_other):
    """Similarity rows r0.. of one block with masks (valid, pos, neg) and bias, in accumulation dtype."""
    s = (A_blk.to(Cacc.dtype) @ Cacc.T) * inv_tau
    bm, N = s.shape
    if self_offset >= 0:
        rows = torch.arange(r0, r0 + bm, device=s.device)[:, None] + self_offset
        valid = torch.arange(N, device=s.device)[None, :] != rows
    else:
        valid = torch.ones(bm, N, dtype=torch.bool, device=s.device)
    pos = (a_lab_blk[:, None] == c_lab[None, :]) & valid
    neg = valid & ~pos
    if bias_same is not None:
        b = torch.where(pos, bias_same[None, :], bias_other[None, :])
        sb = s + b
    else:
        sb = s
    return s, sb, valid, pos, neg


def _self_index(r0, bm, N, self_offset, device):
    """(rows within the block, their self columns) for the rows whose self column exists."""
    if self_offset < 0:
        return None
    n = max(0, min(bm, N - r0 - self_offset))  # rows r < n have their self column r0 + r + self_offset < N
    rows = torch.arange(n, device=device)  # sliced from shapes, not a boolean mask: no host sync
    return rows, rows + (r0 + self_offset)


def _lean_block(A_blk, Cacc, r0, a_lab_blk, c_lab, self_offset, inv_tau, bias_same, bias_other):
    """Non-focal fast path of one block: (Σ_P s per row, logits x with self = −inf, positives mask).

    The self column is handled by indexing (O(block)) instead of an M×N comparison mask, and x is
    formed in place of s."""
    x = torch.mm(A_blk.to(Cacc.dtype), Cacc.T).mul_(inv_tau)
    pos = a_lab_blk[:, None] == c_lab[None, :]
    idx = _self_index(r0, x.shape[0], x.shape[1], self_offset, x.device)
    if idx is not None:
        pos[idx] = False
    pos_sum = (x * pos).sum(1)
    if bias_same is not None:
        x.add_(torch.where(pos, bias_same[None, :], bias_other[None, :]))
    if idx is not None:
        x[idx] = float("-inf")
    return pos_sum, x, pos


class TorchChunkedEngine(SSLTorchMixin, Engine):
    """Both engine contracts in chunked PyTorch: "rowstats" (softmax family) and "ssl" (ssl_torch.py)."""
    name = "torch"
    ops = frozenset({"rowstats", "ssl", "ssl_ranked"})

    def unavailable_reason(self, device):
        return None

    def rowstats_forward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal):
        M, N = A.shape[0], C.shape[0]
        acc = acc_dtype(A.dtype)
        Cacc = C.to(acc)
        bs = bias_same.to(acc) if bias_same is not None else None
        bo = bias_other.to(acc) if bias_other is not None else None
        lse, pos_sum, fpos, fneg, upos, uneg, lrest = (torch.zeros(M, dtype=acc, device=A.device) for _ in range(7))
        top = torch.full((M,), -1, dtype=torch.int64, device=A.device)
        for r0, r1 in _row_blocks(M, N):
            if not focal:  # lean path: max, dominant column and the rest's LSE by indexing, no elementwise masks
                pos_sum[r0:r1], x, pos = _lean_block(A[r0:r1], Cacc, r0, a_lab[r0:r1], c_lab, self_offset,
                                                     inv_tau, bs, bo)
                rows = torch.arange(r1 - r0, device=A.device)
                m, t = x.max(dim=1)  # NaN propagates
                x[rows, t] = float("-inf")
                m2 = x.max(dim=1).values  # the other columns' max
                m2s = torch.where(m2 == float("-inf"), torch.zeros_like(m2), m2)
                s2 = torch.exp(x.sub_(m2s[:, None])).sum(1)
                has_self = (rows + r0 + self_offset < N) if self_offset >= 0 else torch.zeros_like(m, dtype=torch.bool)
                lse[r0:r1], lrest[r0:r1], ok = finish_rows(m, m2, s2, N - has_self.to(torch.int64) > 0)
                top[r0:r1] = torch.where(ok & (m > float("-inf")), t, torch.full_like(t, -1))
                continue
            s, sb, valid, pos, neg = _block_logits(A[r0:r1], Cacc, r0, a_lab[r0:r1], c_lab, self_offset,
                                                   inv_tau, bs, bo)
            lse[r0:r1], top[r0:r1], lrest[r0:r1], logp, log1mp = row_logp(sb, valid, need_logp=focal)
            pos_sum[r0:r1] = (s * pos).sum(1)
            if focal:
                is_top = (torch.arange(N, device=A.device)[None, :] == top[r0:r1, None]) & valid
                fp, fn, up, un = focal_terms(logp, log1mp, gamma, is_top, lrest[r0:r1])
                z = torch.zeros_like(fp)
                fpos[r0:r1] = torch.where(pos, fp, z).sum(1)
                fneg[r0:r1] = torch.where(neg, fn, z).sum(1)
                upos[r0:r1] = torch.where(pos, up, z).sum(1)
                uneg[r0:r1] = torch.where(neg & ~is_top, un, z).sum(1)
        return lse, pos_sum, fpos, fneg, upos, uneg, top, lrest

    def rowstats_backward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                          lse, top, lrest, cpos, cposf, cneg, r, rt):
        M, N = A.shape[0], C.shape[0]
        acc = acc_dtype(A.dtype)
        Cacc = C.to(acc)
        bs = bias_same.to(acc) if bias_same is not None else None
        bo = bias_other.to(acc) if bias_other is not None else None
        dA = torch.empty(M, A.shape[1], dtype=acc, device=A.device)
        dC = torch.zeros(N, C.shape[1], dtype=acc, device=A.device)
        for r0, r1 in _row_blocks(M, N):
            A_blk = A[r0:r1].to(acc)
            if not focal:  # lean path: G = cpos·1[P] − r·p, self and dominant column by indexing
                _, x, pos = _lean_block(A_blk, Cacc, r0, a_lab[r0:r1], c_lab, self_offset, inv_tau, bs, bo)
                l_blk, t_blk = lse[r0:r1], top[r0:r1]
                # top may be -1 for a non-empty row whose dominant column lies outside these columns
                # (the distributed ring): the row's lse still applies, only the override is skipped
                p = torch.exp(x.sub_(torch.where(l_blk == float("-inf"), torch.zeros_like(l_blk), l_blk)[:, None]))
                ok = (t_blk >= 0)[:, None]
                t_idx = t_blk.clamp(min=0)[:, None]  # a where + scatter instead of a boolean mask: no host sync
                p_top = torch.exp(-softplus(lrest[r0:r1]))[:, None]
                p.scatter_(1, t_idx, torch.where(ok, p_top, p.gather(1, t_idx)))
                g = p.mul_(-r[r0:r1, None]).addcmul_(pos, cpos[r0:r1, None])
                dA[r0:r1] = (g @ Cacc) * inv_tau
                dC.addmm_(g.T, A_blk, alpha=inv_tau)
                continue
            s, sb, valid, pos, neg = _block_logits(A_blk, Cacc, r0, a_lab[r0:r1], c_lab, self_offset,
                                                   inv_tau, bs, bo)
            sl = slice(r0, r1)
            g = backward_tile(sb, valid, pos, neg, lse[sl], top[sl], lrest[sl], gamma, focal, cpos[sl], cposf[sl],
                              cneg[sl], r[sl], rt[sl])
            dA[r0:r1] = (g @ Cacc) * inv_tau
            dC.addmm_(g.T, A_blk, alpha=inv_tau)
        return dA.to(A.dtype), dC.to(C.dtype)
