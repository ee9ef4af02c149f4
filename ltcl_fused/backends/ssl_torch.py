"""backend="torch" for the self-supervised family: the SSL contract in plain PyTorch, one row block at a time.

Implements ``ltcl_fused/engine/ssl_contract.py`` on any device with memory O(block · N): the
similarity rows of a block of anchors are formed, reduced to the per-row statistics and dropped;
backward recomputes them. The Bayesian weights need exact ranks within each row: the block's set
values are sorted per row (entries outside the set pushed to +inf) and every entry's count of
set values <= it is read off the end of its run of equal values — exact, ties included,
O(block · N log N). Column blocks (operation "ssl_ranked", ``ltcl_fused/engine/ssl_contract.py``):
``ssl_set_values`` returns a block's row-sorted set values from the same block computation, and with
``rank_ref`` the count is ``#{ref values <= s}`` (``torch.searchsorted(..., right=True)``, capped at n).

``SSLTorchMixin`` holds the two methods, so the chunked softmax engine can take them on as well
(``class TorchChunkedEngine(SSLTorchMixin, Engine)`` with ``"ssl"`` in ``ops``); ``TorchSSLEngine``
is the standalone engine used until then.
"""
from __future__ import annotations

import math
import os

import torch

from ..engine.contract import acc_dtype
from ..engine.ssl_contract import SSLStats, bayes_omega, filter_drops, poisoned_rows
from .base import Engine

#: elements of one block of similarity rows (rows per block = BLOCK_ELEMENTS // N, at least 1).
#: A block keeps a handful of [rows, N] temporaries alive (about 8 with the Bayesian ranks).
BLOCK_ELEMENTS = int(os.environ.get("LTCL_TORCH_BLOCK_ELEMENTS", 1 << 20))


def _row_blocks(M: int, N: int):
    rows = max(1, min(M, BLOCK_ELEMENTS // max(N, 1)))
    for r0 in range(0, M, rows):
        yield r0, min(M, r0 + rows)


def _le_counts(s, in_set):
    """``#{k ∈ set(i): s_ik <= s_ij}`` for every (i, j) of the block (meaningful where j ∈ set(i)).

    Sort each row with the entries outside the set pushed to +inf; the count for the entry at sorted
    position q is 1 + the last position of its run of equal values (ties count as <=), found with a
    reversed running minimum; then scatter back to the original columns. O(N log N) per row.
    """
    vals, idx = torch.where(in_set, s, math.inf).sort(dim=1)
    bm, N = s.shape
    q = torch.arange(N, device=s.device).expand(bm, N)
    last = torch.ones(bm, N, dtype=torch.bool, device=s.device)
    last[:, :-1] = vals[:, 1:] != vals[:, :-1]
    run_end = torch.where(last, q, N).flip(1).cummin(1).values.flip(1)
    return torch.empty_like(idx).scatter_(1, idx, run_end + 1)


def _block_set(A_blk, Cacc, r0, partner_blk, self_offset, inv_tau, cfg):
    """Rows r0.. of S, the set mask and the poisoned rows (a non-finite dot product)."""
    g = A_blk.to(Cacc.dtype) @ Cacc.T
    s = g * inv_tau
    bm, N = s.shape
    cols = torch.arange(N, device=s.device)[None, :]
    in_set = torch.ones(bm, N, dtype=torch.bool, device=s.device)
    if self_offset >= 0 and not cfg.include_self:
        in_set &= cols != (torch.arange(r0, r0 + bm, device=s.device) + self_offset)[:, None]
    if cfg.exclude_partner:
        in_set &= cols != partner_blk[:, None]
    if cfg.filter is not None:
        in_set &= ~filter_drops(g, cfg)
    return s, in_set, poisoned_rows(g)


def _block(A_blk, Cacc, r0, partner_blk, self_offset, inv_tau, cfg, ref_blk=None):
    """Rows r0.. of S with the set mask, the log-weights (−inf outside the set / where ω = 0) and the
    poisoned rows.

    ``ref_blk``: the rank reference rows (ref [bm, L], n [bm]) of column blocks, or None."""
    s, in_set, bad = _block_set(A_blk, Cacc, r0, partner_blk, self_offset, inv_tau, cfg)
    if cfg.bayes is None:
        logw = torch.where(in_set, 0.0, -math.inf).to(s.dtype)
    else:
        if ref_blk is None:
            counts = _le_counts(s, in_set)
            n = in_set.sum(1, keepdim=True)
        else:
            ref, n = ref_blk[0], ref_blk[1][:, None]
            # #{ref values <= s}; +inf (or anything past n) never counts for finite s, and the cap at n
            # covers s = +inf
            counts = torch.minimum(torch.searchsorted(ref, s, right=True), n)
        w = bayes_omega(counts.to(s.dtype) / n.clamp(min=1).to(s.dtype), *cfg.bayes)
        logw = torch.where(in_set & (w > 0), torch.log(w), -math.inf)
    return s, in_set, logw, bad


def _ref_rows(rank_ref, r0, r1, dtype):
    if rank_ref is None:
        return None
    ref, n = rank_ref
    return ref[r0:r1].to(dtype).contiguous(), n[r0:r1].to(torch.int64)


def _positive(s, partner_blk, in_set):
    has = partner_blk >= 0
    idx = partner_blk.clamp(min=0)[:, None]
    pos = torch.where(has, s.gather(1, idx)[:, 0], 0.0)
    pos_in = (has & in_set.gather(1, idx)[:, 0]).to(s.dtype)
    return pos, pos_in


class SSLTorchMixin:
    """The "ssl" operation of the chunked PyTorch engine."""

    def ssl_forward(self, A, C, partner, self_offset, inv_tau, cfg, rank_ref=None) -> SSLStats:
        M, N = A.shape[0], C.shape[0]
        acc = acc_dtype(A.dtype)
        Cacc = C.to(acc)
        K = len(cfg.scales)
        lse = torch.empty(K, M, dtype=acc, device=A.device)
        pos = torch.empty(M, dtype=acc, device=A.device)
        pos_in = torch.empty(M, dtype=acc, device=A.device)
        with torch.no_grad():
            for r0, r1 in _row_blocks(M, N):
                s, in_set, logw, bad = _block(A[r0:r1], Cacc, r0, partner[r0:r1], self_offset, inv_tau, cfg,
                                              _ref_rows(rank_ref, r0, r1, acc))
                pos[r0:r1], pos_in[r0:r1] = _positive(s, partner[r0:r1], in_set)
                del in_set
                for k, c in enumerate(cfg.scales):  # all −inf -> −inf; a poisoned row -> NaN
                    lse[k, r0:r1] = torch.where(bad, math.nan, torch.logsumexp(logw + c * s, dim=1))
        return SSLStats(lse, pos, pos_in)

    def ssl_backward(self, A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos, rank_ref=None):
        M, N = A.shape[0], C.shape[0]
        acc = acc_dtype(A.dtype)
        Cacc = C.to(acc)
        dA = torch.empty(M, A.shape[1], dtype=acc, device=A.device)
        dC = torch.zeros(N, C.shape[1], dtype=acc, device=A.device)
        with torch.no_grad():
            for r0, r1 in _row_blocks(M, N):
                A_blk = A[r0:r1].to(acc)
                s, in_set, logw, _ = _block(A_blk, Cacc, r0, partner[r0:r1], self_offset, inv_tau, cfg,
                                            _ref_rows(rank_ref, r0, r1, acc))
                del in_set
                G = torch.zeros_like(s)
                for k, c in enumerate(cfg.scales):
                    L, ck = lse[k, r0:r1], coef[k, r0:r1]
                    live = (ck != 0) & torch.isfinite(L)  # no early exit on `live.any()`: that is a host sync
                    Ls = torch.where(live, L, 0.0)
                    # exp(−inf) = 0 outside the set; dead rows get coefficient 0 and a finite exponent
                    t = torch.exp(torch.where(live[:, None], logw + c * s - Ls[:, None], -math.inf))
                    G.add_(t * torch.where(live, ck * c, 0.0)[:, None])
                p = partner[r0:r1]
                has = p >= 0
                G.scatter_add_(1, p.clamp(min=0)[:, None], torch.where(has, cpos[r0:r1], 0.0)[:, None])
                dA[r0:r1] = (G @ Cacc) * inv_tau
                dC.addmm_(G.T, A_blk, alpha=inv_tau)
        return dA.to(A.dtype), dC.to(C.dtype)

    def ssl_set_values(self, A, C, partner, self_offset, inv_tau, cfg):
        """Row-sorted set values of this column block (+inf after them) and the set sizes."""
        M, N = A.shape[0], C.shape[0]
        acc = acc_dtype(A.dtype)
        Cacc = C.to(acc)
        vals = torch.empty(M, N, dtype=acc, device=A.device)
        cnt = torch.empty(M, dtype=torch.int64, device=A.device)
        with torch.no_grad():
            for r0, r1 in _row_blocks(M, N):
                # the same row blocks and products as ssl_forward / ssl_backward (same bits)
                s, in_set, _ = _block_set(A[r0:r1], Cacc, r0, partner[r0:r1], self_offset, inv_tau, cfg)
                vals[r0:r1] = torch.where(in_set, s, math.inf).sort(dim=1).values
                cnt[r0:r1] = in_set.sum(1)
        return vals, cnt


class TorchSSLEngine(SSLTorchMixin, Engine):
    name = "torch"
    ops = frozenset({"ssl", "ssl_ranked"})

    def unavailable_reason(self, device):
        return None


_ENGINE = None


def get_engine() -> TorchSSLEngine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = TorchSSLEngine()
    return _ENGINE
