"""ResCom's Siamese Balanced Softmax L_cls (SPEC.md section 4), validated; the formula is the reference's."""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .. import _validation as V

_FN = "ltcl_fused.siamese_balanced_softmax"


def _check_logits(name, x, C=None, like=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_FN}: `{name}` must be a torch.Tensor [N, C], got {type(x).__name__}")
    if x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{_FN}: `{name}` must be a floating tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{_FN}: `{name}` must be a non-empty [N, C] tensor, got shape {V._shape(x)}")
    if C is not None and x.shape[1] != C:
        raise ValueError(f"{_FN}: `{name}` has {x.shape[1]} classes but the first view has {C}")
    if like is not None:
        V.check_same(_FN, name, x, like, "logits[0]")


def _labels(labels, rows, per_view):
    """(name, labels, expected rows) of each labels tensor (``rows`` = rows per view of the logits)."""
    if per_view and isinstance(labels, (list, tuple)):
        if len(labels) != len(rows):
            raise ValueError(f"{_FN}: `labels` is a list of {len(labels)} tensors but `logits` has {len(rows)} views")
        return [(f"labels[{v}]", y, n) for v, (y, n) in enumerate(zip(labels, rows))]
    if isinstance(labels, torch.Tensor) and labels.dim() == 1 and len(rows) > 1 \
            and labels.shape[0] != sum(rows) and all(n == labels.shape[0] for n in rows):
        return [("labels", labels, n) for n in rows]  # one tensor shared by every view
    return [("labels", labels, sum(rows))]


def siamese_balanced_softmax(logits: Union[torch.Tensor, Sequence[torch.Tensor]],
                             labels: Union[torch.Tensor, Sequence[torch.Tensor]],
                             class_counts: Union[torch.Tensor, Sequence[int]], *, reduction: str = "mean",
                             check_finite: bool = True) -> torch.Tensor:
    """Siamese Balanced Softmax ``L_cls = CE(logits + log(π + 1e-9), labels)``, ``π_c = n_c / Σ n``.

    ``logits`` ``[N, C]`` or a list/tuple of per-view ``[N_v, C]`` logits (concatenated: "mean" is over all
    rows of all views); ``labels`` one integer tensor per row, a list/tuple matching the views, or (with
    views of equal size) one tensor shared by every view; ``class_counts`` ``[C]`` (tensor or sequence of
    numbers, finite and >= 0, not all 0). A class with count 0 has π_c = 0: its log-prior is
    ``log(1e-9)`` ≈ −20.7 (SPEC's formula, finite), so its logit is pushed down by 20.7 nats and a sample
    of that class still has a finite loss. The log-prior and the loss are float32 (float64 for float64
    logits), whatever the logits' dtype.

    Value checks (finite logits, labels in [0, C), the counts) cost one host read; with
    ``check_finite=False`` none: non-finite logits then give NaN, and a bad label or count makes the loss NaN.
    """
    V.check_choice(_FN, "reduction", reduction, V.REDUCTIONS)
    views = list(logits) if isinstance(logits, (list, tuple)) else [logits]
    if not views:
        raise ValueError(f"{_FN}: `logits` is an empty list; pass [N, C] logits or a list of per-view logits")
    for v, x in enumerate(views):
        name = f"logits[{v}]" if isinstance(logits, (list, tuple)) else "logits"
        _check_logits(name, x, None if v == 0 else views[0].shape[1], None if v == 0 else views[0])
    X = views[0] if len(views) == 1 else torch.cat(views, 0)
    C, dev = X.shape[1], X.device
    parts = []
    for name, y, n in _labels(labels, [x.shape[0] for x in views], isinstance(logits, (list, tuple))):
        V.check_labels(_FN, name, y, n, dev, "one class id per row of `logits`")
        parts.append(y.to(torch.int64))
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    counts = torch.as_tensor(class_counts)
    if counts.dtype == torch.bool or counts.dtype.is_complex or counts.dim() != 1 or counts.shape[0] != C:
        raise ValueError(f"{_FN}: `class_counts` must be [{C}] numbers (one count per column of `logits`), got "
                         f"{counts.dtype} of shape {V._shape(counts)}")
    counts = counts.to(device=dev, dtype=torch.float64)
    chk = V.ValueChecks(_FN, check_finite)
    chk.finite("logits", X)
    y = V.label_range(chk, "labels", y, C, "a column of `logits`")
    lo, hi = torch.aminmax(counts)
    chk.require(torch.isfinite(lo) & torch.isfinite(hi) & (lo >= 0),
                "`class_counts` must be finite and >= 0", lambda: f", got {counts.tolist()}")
    chk.require(hi > 0, "`class_counts` are all 0: the prior π_c = n_c / Σn is undefined")
    chk.run()  # the one host read (none with check_finite=False)
    from .. import reference as R
    return chk.poison(R.siamese_balanced_softmax(X, y, counts, reduction=reduction))
