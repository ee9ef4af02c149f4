"""Contrastive losses over torch.distributed (NCCL on GPUs, Gloo on CPU) with exact gradients.

``supcon``, ``afcl`` (``fcl``, ``acl``), ``bcl`` and ``rescom`` take the same arguments as the plain losses
plus ``mode="gather" | "ring"``, ``group=None`` (the default process group) and ``grad_sync="mean" | "sum"``.
Each rank passes its slice of the batch; the loss is the one of the global batch (mean over all ranks'
anchors). See ``docs/distributed.md`` for the reduction convention and a DDP training step.
"""
from .gather import all_gather_nograd, all_gather_rows, all_gather_sizes  # noqa: F401
from .losses import acl, afcl, bcl, fcl, rescom, supcon  # noqa: F401
from .queue import ClassBalancedQueue  # noqa: F401
from .ring import ring_row_stats  # noqa: F401

__all__ = ["supcon", "afcl", "fcl", "acl", "bcl", "rescom", "ClassBalancedQueue", "all_gather_rows",
           "all_gather_nograd", "all_gather_sizes", "ring_row_stats"]
