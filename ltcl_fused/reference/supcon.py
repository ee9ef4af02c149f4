"""SupCon / SimCLR (SPEC.md section 1), dense reference."""
import torch

from ._common import build_contrast, masked_logsumexp, reduce


def supcon(features, labels=None, *, temperature=0.07, base_temperature=None, contrast_mode="all",
           normalize=False, ref_features=None, ref_labels=None, reduction="mean"):
    """Supervised contrastive loss (Khosla et al. 2020); ``labels=None`` gives SimCLR.

    ``ℓ_i = −(τ/τ_base) · (1/|P(i)|) Σ_{p∈P(i)} (s_ip − LSE_i)`` with ``s = a cᵀ/τ`` and ``LSE_i`` over A(i).
    An anchor without positives contributes 0 and still counts in the mean. ``reduction="none"`` returns
    ``[M]`` per-anchor values (M = V·B for contrast_mode "all", B for "one").
    """
    tau = temperature
    tau_base = tau if base_temperature is None else base_temperature
    anchors, columns, valid, pos = build_contrast(
        features, labels, contrast_mode=contrast_mode, normalize=normalize,
        ref_features=ref_features, ref_labels=ref_labels)

    s = anchors @ columns.T / tau                            # s_ij
    lse = masked_logsumexp(s, valid)                         # LSE_i over A(i)
    log_p = s - lse[:, None]                                 # log p_ij
    n_pos = pos.sum(dim=1)
    sum_log_p_pos = torch.where(pos, log_p, torch.zeros_like(log_p)).sum(dim=1)
    # |P(i)| = 0: the sum is 0, divide by 1 -> ℓ_i = 0
    loss = -(tau / tau_base) * sum_log_p_pos / n_pos.clamp(min=1).to(s.dtype)
    return reduce(loss, reduction)
