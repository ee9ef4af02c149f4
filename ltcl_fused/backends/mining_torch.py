"""backend="torch": streaming hard-pair mining (ResCom, SPEC.md section 4) in plain PyTorch.

The keys are visited in tiles. Per anchor row a running state of the best ``k`` (value, index) pairs is
kept ([M, k] values and [M, k] indices) and merged with each tile's similarities by one ``topk`` over the
``k + tile`` concatenation. Peak memory is O(M · (k + tile)); the M × Q similarity matrix never exists.

Mining contract (shared by every backend's mining function)
----------------------------------------------------------
``mine(A [M, D], a_lab [M] int64, K [Q, D], k_lab [Q] int64, k_pos, k_neg) -> (pos_idx, neg_idx)``:
``pos_idx [M, k_pos]`` holds, per anchor, the indices of the same-class keys with the SMALLEST similarity
``A_i · K_j`` in ascending order of similarity, ``neg_idx [M, k_neg]`` the other-class keys with the
LARGEST similarity in descending order; both int64. When a row has fewer candidates than asked for, the
missing trailing slots hold -1 (the public front end raises or keeps them, see ``allow_fewer``).
Similarities are accumulated in float32 (float64 for float64 inputs). Ties: any valid choice.
"""
from __future__ import annotations

import math
import os

import torch

from ..engine.contract import acc_dtype

#: elements of one [M, tile] similarity block (tile = TILE_ELEMENTS // M keys, at least MIN_TILE)
TILE_ELEMENTS = int(os.environ.get("LTCL_MINING_TILE_ELEMENTS", 1 << 20))
MIN_TILE = 256


def tile_size(M: int, Q: int) -> int:
    return max(1, min(Q, max(MIN_TILE, TILE_ELEMENTS // max(M, 1))))


class _RunningTopK:
    """Per-row best-k state (largest values first) merged tile by tile."""

    def __init__(self, M: int, k: int, dtype, device):
        self.k = k
        self.val = torch.full((M, k), -math.inf, dtype=dtype, device=device)
        self.idx = torch.full((M, k), -1, dtype=torch.int64, device=device)

    def merge(self, v: torch.Tensor, cand: torch.Tensor, q0: int) -> None:
        """Merge tile values ``v [M, t]`` (only where ``cand``) of keys ``q0 .. q0+t-1`` into the state."""
        if self.k == 0:
            return
        v = v.masked_fill(~cand, -math.inf)  # (no early exit on "nothing beats the k-th value": a host sync)
        cols = torch.arange(q0, q0 + v.shape[1], device=v.device, dtype=torch.int64)
        idx = torch.where(cand, cols[None, :], torch.full_like(cols, -1)[None, :])
        allv = torch.cat([self.val, v], dim=1)
        alli = torch.cat([self.idx, idx], dim=1)
        top = torch.topk(allv, self.k, dim=1, largest=True, sorted=True)
        self.val = top.values
        self.idx = alli.gather(1, top.indices)


@torch.no_grad()
def mine(A: torch.Tensor, a_lab: torch.Tensor, K: torch.Tensor, k_lab: torch.Tensor, k_pos: int, k_neg: int,
         *, tile: int = 0):
    """Streaming hard-pair mining; see the module docstring for the contract. ``tile``: keys per tile (0: auto)."""
    M, Q = A.shape[0], K.shape[0]
    acc = acc_dtype(A.dtype)
    Aacc = A.to(acc)
    pos = _RunningTopK(M, k_pos, acc, A.device)   # largest of -s among same-class keys
    neg = _RunningTopK(M, k_neg, acc, A.device)   # largest of s among other-class keys
    if M and Q and (k_pos or k_neg):
        t = tile if tile > 0 else tile_size(M, Q)
        for q0 in range(0, Q, t):
            q1 = min(Q, q0 + t)
            s = Aacc @ K[q0:q1].to(acc).T                       # [M, t]
            same = a_lab[:, None] == k_lab[None, q0:q1]
            pos.merge(-s, same, q0)
            neg.merge(s, ~same, q0)
    # a slot still at -inf holds no candidate (its index is already -1 unless a similarity overflowed)
    pos_idx = torch.where(pos.val == -math.inf, torch.full_like(pos.idx, -1), pos.idx)
    neg_idx = torch.where(neg.val == -math.inf, torch.full_like(neg.idx, -1), neg.idx)
    return pos_idx, neg_idx
