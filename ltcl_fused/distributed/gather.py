"""Autograd-aware collectives for the distributed losses (uneven sizes allowed).

``all_gather_rows(x, sizes)`` concatenates every rank's ``x`` along dim 0, rank by rank; its backward
sums, over all ranks, the gradient that reached each rank's block and hands the owner its block (a
reduce-scatter). Two things differ from ``torch.distributed.nn.functional.all_gather``:

* The gradient is made contiguous before any collective. In torch 2.13 with Gloo, the backward of
  ``torch.distributed.nn.functional.all_gather`` (an all-to-all) returns wrong values when the gradient
  arriving at its outputs is non-contiguous, as it is when gathered ``[B, V, D]`` features are flattened
  view-major afterwards (``tests/test_distributed.py::test_gather_noncontiguous_grad`` keeps that case).
* Ranks may hold different numbers of rows: blocks are padded to the largest one for the collective.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["world", "all_gather_sizes", "all_gather_rows", "all_gather_nograd", "global_rank", "AllGatherRows"]


def world(group=None):
    """(rank, world size) of this process in ``group``; a clear error when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ltcl_fused.distributed: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first (or use the plain ltcl_fused losses)")
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, r: int) -> int:
    """Global rank of rank ``r`` of ``group`` (point-to-point calls take global ranks)."""
    if group is None or group is dist.group.WORLD:
        return r
    return dist.get_global_rank(group, r)


def all_gather_sizes(n: int, device: torch.device, group=None) -> List[int]:
    """Every rank's ``n`` (a Python int), in rank order."""
    _, W = world(group)
    t = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = torch.empty(W, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(out, t, group=group)
    return [int(v) for v in out.tolist()]


def _padded_gather(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    W = len(sizes)
    mx = max(sizes)
    x = x.contiguous()
    if x.shape[0] == mx:
        buf_in = x
    else:
        buf_in = x.new_zeros((mx,) + tuple(x.shape[1:]))
        buf_in[: x.shape[0]] = x
    out = x.new_empty((W * mx,) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, buf_in, group=group)
    if all(s == mx for s in sizes):
        return out
    out = out.view((W, mx) + tuple(x.shape[1:]))
    return torch.cat([out[r, : sizes[r]] for r in range(W)], 0)


def all_gather_nograd(x: torch.Tensor, sizes: Optional[Sequence[int]] = None, group=None) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along dim 0 (rank order), without autograd."""
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device, group)
    with torch.no_grad():
        return _padded_gather(x.detach(), sizes, group)


class AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = tuple(int(s) for s in sizes), group
        ctx.rank = dist.get_rank(group)
        return _padded_gather(x, ctx.sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group, rank = ctx.sizes, ctx.group, ctx.rank
        W, mx = len(sizes), max(sizes)
        grad = grad.contiguous()  # the Gloo trap: never hand a strided gradient to a collective
        tail = tuple(grad.shape[1:])
        if all(s == mx for s in sizes):
            buf = grad
        else:
            buf = grad.new_zeros((W, mx) + tail)
            off = 0
            for r, s in enumerate(sizes):
                buf[r, :s] = grad[off: off + s]
                off += s
            buf = buf.view((W * mx,) + tail)
        out = grad.new_empty((mx,) + tail)
        dist.reduce_scatter_tensor(out, buf, op=dist.ReduceOp.SUM, group=group)
        return out[: sizes[rank]], None, None


def all_gather_rows(x: torch.Tensor, sizes: Optional[Sequence[int]] = None, group=None) -> torch.Tensor:
    """Differentiable concatenation of every rank's ``x`` (dim 0, rank order; ranks may hold different sizes).

    Backward: each rank receives the sum over all ranks of the gradient of its own rows, so the gradient
    of ``Σ_r loss_r`` reaches every rank's ``x`` exactly.
    """
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], x.device, group)
    if len(sizes) != world(group)[1]:
        raise ValueError(f"ltcl_fused.distributed: `sizes` has {len(sizes)} entries for a world of "
                         f"{world(group)[1]} ranks")
    if int(sizes[dist.get_rank(group)]) != x.shape[0]:
        raise ValueError(f"ltcl_fused.distributed: this rank holds {x.shape[0]} rows but `sizes` says "
                         f"{sizes[dist.get_rank(group)]}")
    return AllGatherRows.apply(x, list(sizes), group)
