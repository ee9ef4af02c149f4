"""Shared set-up of the contrast problem: flatten views, tile labels, append reference columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..engine.contract import acc_dtype


@dataclass
class Contrast:
    X: torch.Tensor        # flattened features [V·B, D] (view-major), after optional normalisation
    A: torch.Tensor        # anchors [M, D] = X[:M]
    C: torch.Tensor        # contrast columns [N, D] = X followed by ref_features
    a_lab: torch.Tensor    # int64 [M]
    c_lab: torch.Tensor    # int64 [N]
    B: int
    V: int

    @property
    def M(self) -> int:
        return self.A.shape[0]

    @property
    def N(self) -> int:
        return self.C.shape[0]


def flatten_views(features: torch.Tensor):
    """[B, V, D] -> ([V·B, D] view-major, B, V); [N, D] -> (itself, N, 1)."""
    if features.dim() == 3:
        B, Vw, D = features.shape
        return features.transpose(0, 1).reshape(Vw * B, D), B, Vw
    return features, features.shape[0], 1


def build_contrast(fn: str, features, labels, *, ref_features=None, ref_labels=None, contrast_mode="all",
                   normalize=False, check_finite=True, checks: Optional[V.ValueChecks] = None) -> Contrast:
    """Validate the common arguments and lay out anchors and columns as SPEC.md's notation section does.

    The finiteness checks are registered on ``checks`` (the caller runs them, folded with its own into one
    host read); without ``checks`` they are run here."""
    own = checks is None
    chk = V.ValueChecks(fn, check_finite) if own else checks
    V.check_features(fn, "features", features)
    V.check_choice(fn, "contrast_mode", contrast_mode, ("all", "one"))
    X, B, Vw = flatten_views(features)
    dev = features.device
    if labels is not None:
        V.check_labels(fn, "labels", labels, B, dev, f"one label per sample of `features` {V._shape(features)}")
        base = labels.to(torch.int64)
    else:
        base = torch.arange(B, device=dev, dtype=torch.int64)  # SimCLR: positives are the other views
    lab = base.repeat(Vw)
    chk.finite("features", features)
    if ref_features is not None:
        V.check_features(fn, "ref_features", ref_features, ranks=(2,))
        V.check_same(fn, "ref_features", ref_features, features)
        chk.finite("ref_features", ref_features)
        R = ref_features.shape[0]
        if labels is not None:
            if ref_labels is None:
                raise ValueError(f"{fn}: `ref_labels` is required with `ref_features` when `labels` are given")
            V.check_labels(fn, "ref_labels", ref_labels, R, dev, "one label per row of `ref_features`")
            rlab = ref_labels.to(torch.int64)
        else:
            if ref_labels is not None:
                raise ValueError(f"{fn}: `ref_labels` given without `labels`; pass both or neither")
            rlab = B + torch.arange(R, device=dev, dtype=torch.int64)  # unique ids: negatives to everyone
    elif ref_labels is not None:
        raise ValueError(f"{fn}: `ref_labels` given without `ref_features`")
    if normalize:
        X = F.normalize(X, dim=-1)
        if ref_features is not None:
            ref_features = F.normalize(ref_features, dim=-1)
    C = X if ref_features is None else torch.cat([X, ref_features], 0)
    c_lab = lab if ref_features is None else torch.cat([lab, rlab])
    M = B if contrast_mode == "one" else Vw * B
    if own:
        chk.run()
    # every row an anchor and no reference rows: A is C itself (and a_lab is c_lab), which lets
    # engine.function.row_stats take an engine's symmetric backward (one dX kernel instead of dA and dC)
    every = M == X.shape[0] and ref_features is None
    return Contrast(X=X, A=X if every else X[:M], C=C, a_lab=c_lab if every else lab[:M], c_lab=c_lab, B=B, V=Vw)


def match_counts(a_lab: torch.Tensor, c_lab: torch.Tensor) -> torch.Tensor:
    """For every anchor, the number of columns sharing its label (self included), in O((M+N) log N)."""
    srt = torch.sort(c_lab).values
    return (torch.searchsorted(srt, a_lab, right=True) - torch.searchsorted(srt, a_lab)).to(torch.int64)


def reference_output(loss: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The output-dtype rule of every backend applied to the dense reference's result: float32 for
    fp16/bf16/fp32 inputs, float64 for float64 (the reference itself computes in the input dtype)."""
    return loss.to(acc_dtype(like.dtype))


def class_counts(lab: torch.Tensor, n_cls: int) -> torch.Tensor:
    """``#{j: lab_j = c}`` for c in [0, n_cls) (int64), by sorting: a fixed output size (no host sync, unlike
    ``bincount``) and deterministic on every device (unlike the atomics of ``index_add_``)."""
    srt = torch.sort(lab).values
    c = torch.arange(n_cls, device=lab.device, dtype=lab.dtype)
    return torch.searchsorted(srt, c, right=True) - torch.searchsorted(srt, c)


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
