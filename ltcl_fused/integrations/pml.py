"""A drop-in for ``pytorch_metric_learning.losses.SupConLoss`` computed by ltcl_fused's fused engine.

    from ltcl_fused.integrations.pml import SupConLoss      # instead of pytorch_metric_learning.losses
    loss_fn = SupConLoss(temperature=0.1)
    loss = loss_fn(embeddings, labels)                     # or (embeddings, labels, ref_emb=..., ref_labels=...)

pytorch-metric-learning itself is not needed (nor imported).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import backends as _backends
from ..engine import row_stats as _row_stats
from ..losses._common import match_counts as _match_counts
from ..losses.supcon import supcon_from_stats as _supcon_from_stats

__all__ = ["SupConLoss"]

_FN = "ltcl_fused.integrations.pml.SupConLoss"


class SupConLoss(torch.nn.Module):
    """pytorch-metric-learning's ``SupConLoss`` (same constructor, call, value and gradients), fused.

    ``SupConLoss(temperature=0.1)``; ``forward(embeddings [N, D], labels [N], indices_tuple=None,
    ref_emb=None, ref_labels=None)``. As in PML (2.x): the embeddings (and ``ref_emb``) are L2-normalised
    inside (cosine similarity); the contrast columns are the batch itself without each anchor's own column,
    or, with ``ref_emb``, the rows of ``ref_emb`` alone; the per-anchor loss is
    ``−(1/|P(i)|) Σ_{p∈P(i)} log softmax_ip`` over those columns; the result is the mean over the anchors
    whose loss is > 0 (PML's ``AvgNonZeroReducer``), so anchors without positives are left out of the mean
    (``0·Σ embeddings`` when no anchor is left, and also when the batch has no positive pair or no negative
    pair at all, or at most one of each). The similarity matrix is never stored: the loss runs on
    ltcl_fused's row-statistics engine (``backend="auto"``: the C++ extension on CPU tensors, Triton on
    CUDA tensors). The result has the embeddings' dtype, like PML's.

    Where PML's semantics differ from ``ltcl_fused.supcon`` (which follows the SupContrast code):

    - normalisation: PML normalises the embeddings; ``lf.supcon`` uses them as given (``normalize=True``
      normalises);
    - ``ref_emb``: PML's columns are ``ref_emb`` alone; ``lf.supcon(ref_features=...)`` appends them to the
      batch's own columns. The anchor's own column is left out only when ``ref_emb`` is None or when
      ``ref_labels`` is the very same tensor object as ``labels`` (PML's identity test: then column i of
      ``ref_emb`` is dropped for anchor i, even if ``ref_emb`` is another tensor);
    - anchors without positives: PML leaves them out of the mean; ``lf.supcon`` counts them as 0 in the
      mean over all anchors;
    - the mean: PML averages over anchors with a positive loss only; a batch without any negative pair
      gives PML 0 (``lf.supcon`` still has a loss there); there is no ``base_temperature`` scaling
      (τ/τ_base = 1);
    - multi-view input: PML takes ``[N, D]`` rows with a label each (``lf.supcon`` also takes
      ``[B, V, D]``).

    Not supported (one clear error each): ``indices_tuple`` (mined pairs or triplets: this engine uses all
    pairs; mine with PML and use PML's own loss for that); the ``distance``, ``reducer`` and
    ``embedding_regularizer`` constructor options; ``labels=None``; ``ref_emb`` without ``ref_labels`` and
    ``ref_labels`` without ``ref_emb`` (PML would silently reuse ``labels`` or ignore them).
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"{_FN}: {', '.join(map(repr, sorted(kwargs)))} not supported: the fused loss is "
                            f"cosine similarity with PML's default reducer and no regularizer (use "
                            f"pytorch_metric_learning.losses.SupConLoss for other distances, reducers or "
                            f"regularizers)")
        if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
                or not math.isfinite(float(temperature)) or float(temperature) <= 0):
            raise ValueError(f"{_FN}: `temperature` must be a finite number > 0, got {temperature!r}")
        _backends.check_backend_name(backend, _FN)
        if backend == "reference":
            raise ValueError(f"{_FN}: `backend`='reference' is not a fused engine; use 'auto', 'cpu', 'triton', "
                             f"'cuda' or 'torch'")
        self.temperature = float(temperature)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None,
                indices_tuple: Optional[Tuple[torch.Tensor, ...]] = None, ref_emb: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if indices_tuple is not None:
            raise ValueError(f"{_FN}: `indices_tuple` is not supported: the fused engine contrasts every pair "
                             f"(use pytorch_metric_learning.losses.SupConLoss with a miner)")
        _check_emb("embeddings", embeddings)
        if labels is None:
            raise ValueError(f"{_FN}: `labels` are required (indices_tuple is not supported)")
        labels = _check_labels("labels", labels, embeddings.shape[0], embeddings)
        # PML's self-column rule: the diagonal goes when the columns are the batch itself, or when
        # `ref_labels` IS `labels` (the object, after both were moved to their embeddings' devices).
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError(f"{_FN}: `ref_labels` given without `ref_emb` (PML would ignore them); pass "
                                 f"both or neither")
            ref, ref_lab, diag = embeddings, labels, True
        else:
            _check_emb("ref_emb", ref_emb)
            if ref_labels is None:
                raise ValueError(f"{_FN}: `ref_labels` are required with `ref_emb` (one label per row of it)")
            if ref_emb.device != embeddings.device or ref_emb.dtype != embeddings.dtype:
                raise ValueError(f"{_FN}: `ref_emb` is {ref_emb.dtype} on {ref_emb.device} but `embeddings` "
                                 f"are {embeddings.dtype} on {embeddings.device}")
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(f"{_FN}: `ref_emb` has {ref_emb.shape[1]} features but `embeddings` have "
                                 f"{embeddings.shape[1]}")
            ref_lab = _check_labels("ref_labels", ref_labels, ref_emb.shape[0], ref_emb)
            ref, diag = ref_emb, ref_lab is labels
        return _pml_supcon(embeddings, labels, ref, ref_lab, diag, self.temperature, self.backend)


def _check_emb(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{_FN}: `{name}` must be a floating torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{_FN}: `{name}` must be a non-empty [N, D] tensor, got shape {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{_FN}: `{name}` contains NaN or Inf")


def _check_labels(name: str, lab: Any, n: int, emb: torch.Tensor) -> torch.Tensor:
    if not isinstance(lab, torch.Tensor):
        raise TypeError(f"{_FN}: `{name}` must be a torch.Tensor, got {type(lab).__name__}")
    if lab.dim() != 1 or lab.shape[0] != n:
        raise ValueError(f"{_FN}: `{name}` must have shape [{n}] (one label per row), got {list(lab.shape)}")
    return lab if lab.device == emb.device else lab.to(emb.device)  # PML's c_f.to_device


def _pml_supcon(emb, labels, ref, ref_lab, diag, temperature, backend):
    """PML's SupCon value on the row-statistics engine (A = normalised anchors, C = normalised columns)."""
    N, R = emb.shape[0], ref.shape[0]
    # any label dtype (PML compares labels with ==): map both sets to shared integer ids
    ids = torch.unique(torch.cat([labels.reshape(-1), ref_lab.reshape(-1).to(labels.dtype)]), return_inverse=True)[1]
    a_lab, c_lab = ids[:N].to(torch.int64), ids[N:].to(torch.int64)
    same = _match_counts(a_lab, c_lab)                 # columns with the anchor's label, own column included
    npos = same - 1 if diag else same                  # PML's pos_mask row sums
    nneg = R - same                                    # the own column is never a negative
    n_pos_pairs, n_neg_pairs = int(npos.sum()), int(nneg.sum())
    # PML returns its zero loss when no pair (or at most one of each kind) exists, or no positive or no
    # negative pair exists anywhere in the batch
    if (n_pos_pairs <= 1 and n_neg_pairs <= 1) or n_pos_pairs == 0 or n_neg_pairs == 0:
        return torch.sum(emb * 0)
    A = F.normalize(emb, p=2, dim=1)
    C = A if ref is emb else F.normalize(ref, p=2, dim=1)
    eng = _backends.resolve(backend, emb.device, "rowstats", _FN)
    st = _row_stats(eng, A, C, a_lab, c_lab, self_offset=0 if diag else -1, inv_tau=1.0 / temperature)
    losses = _supcon_from_stats(st.lse, st.pos_sum, npos, 1.0)
    keep = losses > 0                                  # PML's AvgNonZeroReducer
    if not bool(keep.any()):
        return torch.sum(emb * 0)
    return losses[keep].mean().to(emb.dtype)
