"""Shared helpers of the dense reference: view flattening, masks, masked log-sum-exp, log1mexp, reductions.

Everything here is deliberately plain PyTorch on dense tensors. Nothing from the rest of ltcl_fused is used.
"""
import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def reduce(values, reduction):
    """Apply ``reduction`` to per-anchor values ``[M]``: mean over anchors, sum, or the values themselves."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean() if values.numel() else values.sum()  # empty batch: 0, not NaN
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def flatten_views(features, labels=None):
    """``[N, D]`` or ``[B, V, D]`` -> (flat ``[V*B, D]``, flat labels or None, sample ids ``[V*B]``, B, V).

    View-major order (SPEC "Notation", the SupContrast convention): view 0 of all B samples, then view 1, ...
    Labels ``[B]`` are tiled V times. ``ids[k]`` is the sample that flat row k came from (SimCLR positives).
    """
    if features.dim() == 2:
        B, V = features.shape[0], 1
        flat = features
    elif features.dim() == 3:
        B, V = features.shape[0], features.shape[1]
        flat = features.transpose(0, 1).reshape(V * B, features.shape[2])
    else:
        raise ValueError(f"features must be [N, D] or [B, V, D], got shape {tuple(features.shape)}")
    ids = torch.arange(B, device=features.device).repeat(V)
    flat_labels = None
    if labels is not None:
        labels = torch.as_tensor(labels, device=features.device).reshape(-1)
        if labels.numel() != B:
            raise ValueError(f"expected {B} labels (one per sample), got {labels.numel()}")
        flat_labels = labels.repeat(V)
    return flat, flat_labels, ids, B, V


def masked_logsumexp(x, mask):
    """``log Σ_{j: mask_ij} exp(x_ij)`` per row; ``-inf`` for a row with no entry, with finite (zero) gradients."""
    empty = ~mask.any(dim=1, keepdim=True)
    # -inf outside the mask; rows with nothing in the mask get dummy zeros so that the backward of
    # logsumexp never sees (-inf) - (-inf); their result is replaced by -inf below (zero gradient).
    x = x.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    out = torch.logsumexp(x, dim=1)
    return out.masked_fill(empty.squeeze(1), float("-inf"))


def log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range (Mächler 2012).

    ``x > -log 2``: ``log(-expm1(x))``; otherwise ``log1p(-exp(x))``. Each branch only ever sees inputs from
    its own domain (double-``where``), so the unused branch cannot put NaN into the gradient.
    ``log1mexp(0) = -inf`` (p = 1 exactly).
    """
    near_zero = x > -math.log(2.0)
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def build_contrast(features, labels, *, contrast_mode="all", normalize=False, ref_features=None,
                   ref_labels=None):
    """Set up the anchor/contrast problem shared by SupCon and AFCL (SPEC "Notation", sections 1-2).

    Returns ``anchors [M, D]``, ``columns [N, D]``, ``valid [M, N]`` (= A(i): every column but self) and
    ``pos [M, N]`` (= P(i)). Columns are the V*B flattened views followed by the R ``ref_features``.
    With ``labels=None`` (SimCLR) the positives are the other views of the same sample and ref columns are
    negatives to everyone; with labels, ``ref_labels`` is required.
    """
    flat, flat_labels, ids, B, V = flatten_views(features, labels)
    if normalize:
        flat = F.normalize(flat, dim=-1)
    if contrast_mode == "all":
        anchor_rows = torch.arange(V * B, device=flat.device)
    elif contrast_mode == "one":
        anchor_rows = torch.arange(B, device=flat.device)  # view 0 of every sample
    else:
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
    anchors = flat[anchor_rows]

    columns = flat
    R = 0
    if ref_features is not None:
        ref = F.normalize(ref_features, dim=-1) if normalize else ref_features
        R = ref.shape[0]
        columns = torch.cat([flat, ref], dim=0)
        if labels is not None and ref_labels is None:
            raise ValueError("ref_labels is required when labels are given together with ref_features")

    n_cols = columns.shape[0]
    col_index = torch.arange(n_cols, device=flat.device)
    is_self = anchor_rows[:, None] == col_index[None, :]  # ref columns (index >= V*B) are never self
    valid = ~is_self

    if labels is None:
        same = ids[anchor_rows][:, None] == ids[None, :]  # [M, V*B]: same sample
        same = torch.cat([same, same.new_zeros(len(anchor_rows), R)], dim=1)  # ref: negatives
    else:
        col_labels = flat_labels
        if R:
            col_labels = torch.cat([flat_labels, torch.as_tensor(ref_labels, device=flat.device).reshape(-1)])
        same = flat_labels[anchor_rows][:, None] == col_labels[None, :]
    pos = same & valid
    return anchors, columns, valid, pos
