"""Class-balanced queue for ResCom across ranks: every rank enqueues the same gathered rows in the same order."""
from __future__ import annotations

from typing import Any

import torch

from ..reference import ClassBalancedQueue as _BaseQueue
from .gather import all_gather_nograd, all_gather_sizes, world

__all__ = ["ClassBalancedQueue"]


class ClassBalancedQueue(_BaseQueue):
    """``ltcl_fused.ClassBalancedQueue`` whose ``enqueue`` first all-gathers the features and labels of every
    rank of ``group`` (rank order, uneven sizes allowed), so the queues of all ranks stay identical: the
    same state as one process enqueueing the concatenated batch. ``enqueue`` is a collective: call it on
    every rank. ``group`` is not saved in ``state_dict``.
    """

    def __init__(self, num_classes: int, size_per_class: int, dim: int, dtype: torch.dtype = torch.float32, *,
                 group: Any = None) -> None:
        super().__init__(num_classes, size_per_class, dim, dtype=dtype)
        self.group = group

    def _gather(self, features, labels):
        world(self.group)
        fn = "ltcl_fused.distributed.ClassBalancedQueue.enqueue"
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"{fn}: `features` must be [n, {self.dim}], got {list(features.shape)}")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"{fn}: `labels` must have one entry per row of `features` ({features.shape[0]}), "
                             f"got {labels.shape[0]}")
        dev = features.device
        sizes = all_gather_sizes(features.shape[0], dev, self.group)
        feats = all_gather_nograd(features.contiguous(), sizes, self.group)
        labs = all_gather_nograd(labels.to(device=dev, dtype=torch.int64).contiguous(), sizes, self.group)
        return feats, labs
