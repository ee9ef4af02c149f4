"""ResCom (SPEC.md section 4; dvlab-research ResCom `SiamBS_SPM`, `builder.py`), dense reference.

Hard pair mining, the mined supervised contrastive loss L_con, effective-number class weights, the Siamese
Balanced Softmax L_cls and the class-balanced queue.
"""
import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._common import flatten_views, masked_logsumexp, reduce


def hard_pair_mining(anchors, anchor_labels, keys, key_labels, *, k_pos, k_neg):
    """Per anchor: the ``k_pos`` same-class keys with the SMALLEST similarity (hard positives) and the
    ``k_neg`` other-class keys with the LARGEST similarity (hard negatives); similarity = ``anchors @ keys.T``.

    Returns ``(pos_idx [M, k_pos], neg_idx [M, k_neg])`` int64 indices into ``keys``. The selection is not
    differentiable (computed without grad). Ties are broken by ``torch.topk`` (unspecified order).
    Raises ValueError when some anchor has fewer than ``k_pos`` same-class or ``k_neg`` other-class keys.
    """
    k_pos, k_neg = int(k_pos), int(k_neg)
    if k_pos < 0 or k_neg < 0:
        raise ValueError(f"k_pos and k_neg must be >= 0, got k_pos={k_pos}, k_neg={k_neg}")
    anchor_labels = torch.as_tensor(anchor_labels, device=anchors.device).reshape(-1)
    key_labels = torch.as_tensor(key_labels, device=anchors.device).reshape(-1)
    M = anchors.shape[0]
    with torch.no_grad():
        sim = anchors @ keys.T                                    # [M, Q]
        same = anchor_labels[:, None] == key_labels[None, :]
        if M:
            n_same, n_other = same.sum(dim=1), (~same).sum(dim=1)
            if k_pos > int(n_same.min()):
                i = int(n_same.argmin())
                raise ValueError(f"k_pos={k_pos} but anchor {i} has only {int(n_same[i])} same-class keys")
            if k_neg > int(n_other.min()):
                i = int(n_other.argmin())
                raise ValueError(f"k_neg={k_neg} but anchor {i} has only {int(n_other[i])} other-class keys")
        # non-candidates are pushed to the far end so that topk never picks them
        pos_idx = torch.topk(sim.masked_fill(~same, float("inf")), k_pos, dim=1, largest=False).indices
        neg_idx = torch.topk(sim.masked_fill(same, float("-inf")), k_neg, dim=1, largest=True).indices
    return pos_idx.to(torch.int64), neg_idx.to(torch.int64)


def rescom(features, labels, queue, queue_labels, *, k_pos=1, k_neg=400, temperature=0.2, class_weights=None,
           reduction="mean"):
    """ResCom's contrastive loss L_con.

    ``features`` ``[2b, D]`` (labels ``[2b]``) or ``[b, 2, D]`` (labels ``[b]``, flattened view-major).
    ``queue [Q, D]`` holds detached keys. Per anchor i the row of logits is
    ``[batch columns except self | k_pos mined positives | k_neg mined negatives] / τ``, log-softmax over the
    whole row; P(i) = same-class batch columns and the mined positives;
    ``ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} log softmax_ip`` (0 if P(i) is empty).
    ``"mean"``: ``(1/2b) Σ_i w_{y_i} ℓ_i`` (plain mean, NOT divided by Σw); ``"sum"``: ``Σ_i w_{y_i} ℓ_i``;
    ``"none"``: ``w_{y_i} ℓ_i``. ``class_weights=None`` means all ones.
    """
    flat, flat_labels, _, _, _ = flatten_views(features, labels)
    keys = queue.detach()
    key_labels = torch.as_tensor(queue_labels, device=flat.device).reshape(-1)
    pos_idx, neg_idx = hard_pair_mining(flat.detach(), flat_labels, keys, key_labels, k_pos=k_pos, k_neg=k_neg)

    M = flat.shape[0]
    s_batch = flat @ flat.T / temperature                                  # [M, M]
    s_pos = torch.einsum("md,mkd->mk", flat, keys[pos_idx]) / temperature  # [M, k_pos]
    s_neg = torch.einsum("md,mkd->mk", flat, keys[neg_idx]) / temperature  # [M, k_neg]
    logits = torch.cat([s_batch, s_pos, s_neg], dim=1)

    not_self = ~torch.eye(M, dtype=torch.bool, device=flat.device)
    same = (flat_labels[:, None] == flat_labels[None, :]) & not_self
    ones_pos = torch.ones(M, s_pos.shape[1], dtype=torch.bool, device=flat.device)
    ones_neg = torch.ones(M, s_neg.shape[1], dtype=torch.bool, device=flat.device)
    valid = torch.cat([not_self, ones_pos, ones_neg], dim=1)
    pos = torch.cat([same, ones_pos, ~ones_neg], dim=1)

    log_softmax = logits - masked_logsumexp(logits, valid)[:, None]
    n_pos = pos.sum(dim=1)
    loss = -torch.where(pos, log_softmax, torch.zeros_like(logits)).sum(dim=1) / n_pos.clamp(min=1).to(
        logits.dtype)
    if class_weights is not None:
        w = torch.as_tensor(class_weights, device=flat.device, dtype=loss.dtype)
        loss = w[flat_labels] * loss
    return reduce(loss, reduction)


def effective_number_weights(class_counts: "Union[torch.Tensor, Sequence[int]]", beta: float) -> torch.Tensor:
    """Class-balanced weights from the effective number of samples (Cui et al. 2019, as used by ResCom).

    ``E_c = (1 − β^{n_c}) / (1 − β)``, ``w_c = mean(E) / E_c``. Computed in float64 via
    ``−expm1(n_c log β) / (1 − β)`` (accurate for β close to 1), returned in the default float dtype.
    Conventions: β = 0 gives all ones; β = 1 uses the limit ``E_c = n_c``. A class with ``n_c = 0`` has
    ``E_c = 0``: it gets weight 0 (it has no sample to weight) and is left out of ``mean(E)``, so the
    weights of the other classes are those of the same counts without the empty class (β = 0 still gives
    ones for every present class). β must lie in [0, 1] and counts must be >= 0.
    """
    n = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if (n < 0).any():
        raise ValueError("class_counts must be non-negative")
    present = n > 0
    if beta == 0.0:
        E = present.to(torch.float64)                   # 1 − 0^{n}: 1 for n >= 1
    elif beta == 1.0:
        E = n.clone()                                   # limit β -> 1
    else:
        E = -torch.expm1(n * math.log(beta)) / (1.0 - beta)
    w = torch.zeros_like(n)
    if present.any():
        w[present] = E[present].mean() / E[present]
    return w.to(torch.get_default_dtype())


def siamese_balanced_softmax(logits: "Union[torch.Tensor, Sequence[torch.Tensor]]", labels: "Union[torch.Tensor, Sequence[torch.Tensor]]",
                             class_counts: "Union[torch.Tensor, Sequence[int]]", *, reduction: str = "mean") -> torch.Tensor:
    """Siamese Balanced Softmax ``L_cls = CE(logits + log(π + 1e-9), labels)``, ``π_c = n_c / Σ n``.

    ``logits`` is ``[N, C]`` or a list/tuple of per-view ``[N_v, C]`` logits (concatenated, so "mean" is the
    mean over all rows of all views, as ResCom's CE over the concatenated 2b rows). ``labels`` is a tensor
    with one label per row, a list/tuple matching the views, or (for a list of views) one tensor shared by
    every view.
    """
    if isinstance(logits, (list, tuple)):
        n_views = len(logits)
        if isinstance(labels, (list, tuple)):
            labels = torch.cat([torch.as_tensor(y).reshape(-1) for y in labels])
        else:
            labels = torch.as_tensor(labels).reshape(-1)
            total = sum(x.shape[0] for x in logits)
            if labels.numel() != total:
                labels = labels.repeat(n_views)      # the same labels for every view
        logits = torch.cat(list(logits), dim=0)
    labels = torch.as_tensor(labels, device=logits.device).reshape(-1)
    counts = torch.as_tensor(class_counts, device=logits.device).to(logits.dtype).reshape(-1)
    prior = counts / counts.sum()
    return F.cross_entropy(logits + torch.log(prior + 1e-9), labels, reduction=reduction)


class ClassBalancedQueue(torch.nn.Module):
    """Class-balanced queue: K slots per class, each class a ring buffer (SPEC.md section 4).

    Buffers (all in ``state_dict``): ``features [C·K, D]`` (slot ``c·K + r`` belongs to class c),
    ``labels [C·K]`` (= c on block c), ``ptr [C]`` (next slot to write per class), ``filled [C]``
    (number of filled slots per class, at most K). Slots ``0 .. filled[c]-1`` of a block are the filled ones.
    """

    def __init__(self, num_classes: int, size_per_class: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.size_per_class = int(size_per_class)
        self.dim = int(dim)
        if self.num_classes < 1 or self.size_per_class < 1:
            raise ValueError("num_classes and size_per_class must be >= 1")
        C, K = self.num_classes, self.size_per_class
        self.register_buffer("features", torch.zeros(C * K, self.dim, dtype=dtype))
        self.register_buffer("labels", torch.arange(C, dtype=torch.int64).repeat_interleave(K))
        self.register_buffer("ptr", torch.zeros(C, dtype=torch.int64))
        self.register_buffer("filled", torch.zeros(C, dtype=torch.int64))

    def _gather(self, features, labels):
        """Hook for a distributed variant (all-gather across ranks); identity here."""
        return features, labels

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write detached ``features [n, D]`` into their classes' ring buffers, in input order.

        If more than K rows of one class arrive, the last K of them remain.
        """
        features, labels = self._gather(features.detach(), torch.as_tensor(labels).reshape(-1))
        labels = labels.to(self.labels.device)
        features = features.to(device=self.features.device, dtype=self.features.dtype)
        K = self.size_per_class
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        for c in torch.unique(labels).tolist():
            rows = features[labels == c]                       # this class's rows, input order
            n = rows.shape[0]
            start = int(self.ptr[c])
            offsets = torch.arange(n, device=rows.device)
            keep = offsets >= n - K                            # earlier rows would be overwritten anyway
            slots = c * K + (start + offsets[keep]) % K        # distinct slots
            self.features[slots] = rows[keep]
            self.ptr[c] = (start + n) % K
            self.filled[c] = min(int(self.filled[c]) + n, K)

    def keys(self) -> "Tuple[torch.Tensor, torch.Tensor]":
        """``(features, labels)`` of the filled slots only, in slot order."""
        r = torch.arange(self.size_per_class, device=self.filled.device).repeat(self.num_classes)
        mask = r < self.filled.repeat_interleave(self.size_per_class)
        return self.features[mask], self.labels[mask]
