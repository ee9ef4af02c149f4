"""CL / FCL / ACL / AFCL (SPEC.md section 2; valentinovito/Asymmetric-CL), dense reference."""
import torch

from ._common import build_contrast, log1mexp, masked_logsumexp, reduce


def afcl(features, labels=None, *, gamma=0.0, eta=0.0, temperature=0.07, normalize_by="batch",
         contrast_mode="all", normalize=False, ref_features=None, ref_labels=None, reduction="mean"):
    """Asymmetric focal contrastive loss ``ℓ_i = T⁺_i + η T⁻_i``.

    ``T⁺_i = −(1/N) Σ_{p∈P(i)} (1 − p_ip)^γ log p_ip`` and ``T⁻_i = −(1/N) Σ_{n∈N(i)} log(1 − p_in)`` where
    N is the number of contrast columns (batch columns + ref columns, the self column included, as in the
    released code). ``normalize_by="pairs"`` divides T⁺ by |P(i)| and T⁻ by |N(i)| (an empty set gives 0).
    The focal weight is differentiated. ``log(1 − p)`` is computed without cancellation (never NaN, and
    finite whenever p < 1 mathematically, even where p rounds to 1 in the working dtype).

    Degenerate rows: when A(i) holds a single column, p ≡ 1 whatever the features. Then T⁺_i = 0 if that
    column is a positive, and if it is a negative ``log(1 − p) = log 0``, so T⁻_i = +inf (exact, not hidden)
    when η > 0; gradients stay finite (that term is a constant).
    """
    if normalize_by not in ("batch", "pairs"):
        raise ValueError(f"normalize_by must be 'batch' or 'pairs', got {normalize_by!r}")
    anchors, columns, valid, pos = build_contrast(
        features, labels, contrast_mode=contrast_mode, normalize=normalize,
        ref_features=ref_features, ref_labels=ref_labels)
    neg = valid & ~pos
    n_cols = columns.shape[0]

    s = anchors @ columns.T / temperature
    lse = masked_logsumexp(s, valid)
    log_p = s - lse[:, None]
    zero = torch.zeros_like(s)

    # log(1 − p_ij), accurate everywhere. For every column but the row's largest one p <= 1/2 and
    # log1mexp(log p) is accurate. For the largest column p may round to 1 (fp32: runner-up ~17 nats
    # behind, reachable at τ = 0.07), where log1mexp(log p) would give -inf; there we use the exact identity
    # log(1 − p_in) = log Σ_{k∈A(i), k≠n} exp(s_ik) − LSE_i.
    top = torch.nn.functional.one_hot(s.masked_fill(~valid, float("-inf")).argmax(dim=1), n_cols).bool() & valid
    lse_without_top = masked_logsumexp(s, valid & ~top)
    safe_log_p = torch.where(valid & ~top, log_p, torch.full_like(log_p, -1.0))  # dummy off the used entries
    log1m_p = torch.where(top, lse_without_top[:, None] - lse[:, None], log1mexp(safe_log_p))
    # A row with a single candidate has p ≡ 1 whatever the features: log(1 − p) is the constant -inf.
    single = (valid.sum(dim=1) == 1)[:, None]
    log1m_p = torch.where(single, torch.full_like(log1m_p, float("-inf")), log1m_p)

    # T⁺ with the (differentiated) focal weight (1 − p)^γ = exp(γ log(1 − p))
    if gamma == 0:
        focal = torch.ones_like(s)
    else:
        focal = torch.exp(gamma * torch.where(valid, log1m_p, zero))
    t_pos = -torch.where(pos, focal * torch.where(valid, log_p, zero), zero).sum(dim=1)

    if normalize_by == "batch":
        t_pos = t_pos / n_cols
    else:
        t_pos = t_pos / pos.sum(dim=1).clamp(min=1).to(s.dtype)

    loss = t_pos
    if eta != 0:  # skip T⁻ entirely when η = 0 (0 · inf would be NaN on a degenerate row)
        t_neg = -torch.where(neg, log1m_p, zero).sum(dim=1)
        if normalize_by == "batch":
            t_neg = t_neg / n_cols
        else:
            t_neg = t_neg / neg.sum(dim=1).clamp(min=1).to(s.dtype)
        loss = loss + eta * t_neg
    return reduce(loss, reduction)


def fcl(features, labels=None, *, gamma=1.0, **kw):
    """Focal contrastive loss: ``afcl`` with η = 0 (Core-tuning's focal loss is γ = 1)."""
    return afcl(features, labels, gamma=gamma, eta=0.0, **kw)


def acl(features, labels=None, *, eta=1.0, **kw):
    """Asymmetric contrastive loss: ``afcl`` with γ = 0."""
    return afcl(features, labels, gamma=0.0, eta=eta, **kw)
