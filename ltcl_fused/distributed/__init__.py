"""Contrastive losses over torch.distributed (NCCL on GPUs, Gloo on CPU) with exact gradients.

``supcon``, ``afcl`` (``fcl``, ``acl``), ``bcl``, ``rescom`` and the self-supervised ``dcl``, ``hcl``,
``bayesian_cl`` and ``mttv`` take the same arguments as the plain losses plus ``mode="gather" | "ring"``,
``group=None`` (the default process group) and ``grad_sync="mean" | "sum"``. Each rank passes its slice of
the batch; the loss is the one of the global batch (mean over all ranks' anchors). See
``docs/distributed.md`` for the reduction convention and a DDP training step and
``docs/distributed_ssl.md`` for the self-supervised losses (global ordering, what ring mode holds).
"""
from .gather import all_gather_nograd, all_gather_rows, all_gather_sizes  # noqa: F401
from .losses import acl, afcl, bcl, fcl, rescom, supcon  # noqa: F401
from .queue import ClassBalancedQueue  # noqa: F401
from .ring import ring_row_stats  # noqa: F401
from .ssl_losses import bayesian_cl, dcl, hcl, mttv  # noqa: F401
from .ssl_ring import ring_ssl_row_stats  # noqa: F401

__all__ = ["supcon", "afcl", "fcl", "acl", "bcl", "rescom", "dcl", "hcl", "bayesian_cl", "mttv",
           "ClassBalancedQueue", "all_gather_rows", "all_gather_nograd", "all_gather_sizes", "ring_row_stats",
           "ring_ssl_row_stats"]
