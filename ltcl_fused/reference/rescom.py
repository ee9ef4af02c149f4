"""ResCom (SPEC.md section 4; dvlab-research ResCom `SiamBS_SPM`, `builder.py`), dense reference.

Hard pair mining, the mined supervised contrastive loss L_con, effective-number class weights, the Siamese
Balanced Softmax L_cls and the class-balanced queue.
"""
import math
import numbers
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
    ones for every present class). β must lie in [0, 1] and counts must be finite and >= 0 (a NaN count is
    an error, not an empty class).
    """
    fn = "ltcl_fused.effective_number_weights"
    n = torch.as_tensor(class_counts)
    if n.dtype == torch.bool or n.dtype.is_complex or n.dim() != 1 or n.numel() == 0:
        raise ValueError(f"{fn}: `class_counts` must be a non-empty 1-D sequence or tensor of numbers [C], "
                         f"got {n.dtype} of shape {list(n.shape)}")
    n = n.to(torch.float64)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"{fn}: `beta` must be a number in [0, 1], got {beta!r}")
    beta = float(beta)
    if not bool((torch.isfinite(n) & (n >= 0)).all()):
        raise ValueError(f"{fn}: `class_counts` must be finite and >= 0, got {n.tolist()}")
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
    every view. The loss is float32 (float64 for float64 logits); the log-prior is computed in that dtype.
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
    labels = torch.as_tensor(labels, device=logits.device).reshape(-1).to(torch.int64)
    # the log-prior in float32 (float64 for float64 logits): in fp16 Σn overflows past 65504 and 1e-9 underflows
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    counts = torch.as_tensor(class_counts, device=logits.device).to(acc).reshape(-1)
    log_prior = torch.log(counts / counts.sum() + 1e-9)
    return F.cross_entropy(logits.to(acc) + log_prior, labels, reduction=reduction)


def _positive_int(fn, name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
        raise ValueError(f"{fn}: `{name}` must be an integer >= 1, got {v!r}")
    return int(v)


class ClassBalancedQueue(torch.nn.Module):
    """Class-balanced queue: K slots per class, each class a ring buffer (SPEC.md section 4).

    Buffers (all in ``state_dict``): ``features [C·K, D]`` (slot ``c·K + r`` belongs to class c),
    ``labels [C·K]`` (= c on block c), ``ptr [C]`` (next slot to write per class), ``filled [C]``
    (number of filled slots per class, at most K). Slots ``0 .. filled[c]-1`` of a block are the filled ones.
    """

    def __init__(self, num_classes: int, size_per_class: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        fn = "ltcl_fused.ClassBalancedQueue"
        self.num_classes = _positive_int(fn, "num_classes", num_classes)
        self.size_per_class = _positive_int(fn, "size_per_class", size_per_class)
        self.dim = _positive_int(fn, "dim", dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{fn}: `dtype` must be a floating torch.dtype, got {dtype!r}")
        C, K = self.num_classes, self.size_per_class
        self.register_buffer("features", torch.zeros(C * K, self.dim, dtype=dtype))
        self.register_buffer("labels", torch.arange(C, dtype=torch.int64).repeat_interleave(K))
        self.register_buffer("ptr", torch.zeros(C, dtype=torch.int64))
        self.register_buffer("filled", torch.zeros(C, dtype=torch.int64))

    def _gather(self, features, labels):
        """Hook for a distributed variant (all-gather across ranks); identity here."""
        return features, labels

    def _check(self, fn, features, labels):
        if not isinstance(features, torch.Tensor) or not features.dtype.is_floating_point:
            raise TypeError(f"{fn}: `features` must be a floating torch.Tensor [n, {self.dim}], got "
                            f"{features.dtype if isinstance(features, torch.Tensor) else type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"{fn}: `features` must be [n, {self.dim}] (the queue's `dim`), got shape "
                             f"{list(features.shape)}")
        labels = torch.as_tensor(labels)
        if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise TypeError(f"{fn}: `labels` must be integer class ids, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"{fn}: `labels` must have shape [{features.shape[0]}] (one per row of `features`), "
                             f"got {list(labels.shape)}")
        return labels

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write detached ``features [n, D]`` into their classes' ring buffers, in input order.

        If more than K rows of one class arrive, the last K of them remain. One host read (the label-range
        check); the update itself is vectorised (no per-class loop, no further sync).
        """
        fn = f"ltcl_fused.{type(self).__name__}.enqueue"
        labels = self._check(fn, features, labels)
        features, labels = self._gather(features.detach(), labels)
        labels = labels.to(device=self.labels.device, dtype=torch.int64)
        features = features.to(device=self.features.device, dtype=self.features.dtype)
        C, K, n = self.num_classes, self.size_per_class, labels.numel()
        if n == 0:
            return
        lo, hi = torch.aminmax(labels)
        if not bool((lo >= 0) & (hi < C)):
            raise ValueError(f"{fn}: `labels` must lie in [0, {C}) (the queue's `num_classes`), got values in "
                             f"[{int(lo)}, {int(hi)}]")
        order = torch.sort(labels, stable=True).indices       # rows grouped by class, input order within a class
        lab = labels[order]
        classes = torch.arange(C, device=lab.device)  # rows per class, from the sorted labels (deterministic)
        cnt = torch.searchsorted(lab, classes, right=True) - torch.searchsorted(lab, classes)
        first = torch.cumsum(cnt, 0) - cnt                    # sorted position of each class's first row
        rank = torch.arange(n, device=lab.device) - first[lab]  # rank of the row within its class
        # the row of rank r goes to slot (ptr + r) mod K; of the rows sharing a slot the last one (rank
        # r + K·m, m the smallest with r + K·m >= n_c − K) remains: every row writes that one's features, so
        # the duplicate slots of index_put_ all carry the same value
        m = torch.div(cnt[lab] - K - rank + (K - 1), K, rounding_mode="floor").clamp(min=0)
        winner = order[first[lab] + rank + K * m]
        self.features[lab * K + (self.ptr[lab] + rank) % K] = features[winner]
        self.ptr.copy_((self.ptr + cnt) % K)
        self.filled.copy_((self.filled + cnt).clamp(max=K))

    def keys(self) -> "Tuple[torch.Tensor, torch.Tensor]":
        """``(features, labels)`` of the filled slots only, in slot order."""
        r = torch.arange(self.size_per_class, device=self.filled.device).repeat(self.num_classes)
        mask = r < self.filled.repeat_interleave(self.size_per_class)
        return self.features[mask], self.labels[mask]
