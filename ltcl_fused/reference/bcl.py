"""BCL, balanced contrastive learning (SPEC.md section 3; FlamieZhu/Balanced-Contrastive-Learning BalSCL)."""
import torch
import torch.nn.functional as F

from ._common import flatten_views, masked_logsumexp, reduce


def bcl(features, labels, prototypes, *, temperature=0.07, normalize=False, reduction="mean"):
    """Balanced contrastive loss with class-averaging and class-complement.

    Columns = the V·B flattened views, then the C prototypes (prototype c has label c); anchors = the views.
    ``cnt_c`` = number of columns of class c = V·n_c + 1.
    ``D_i = Σ_{j∈A(i)} exp(s_ij) / (cnt[y_j] − 1[y_j = y_i])`` (class-averaged denominator),
    ``ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} (s_ip − log D_i)``, P(i) = every other column of class y_i (its prototype
    included, so never empty). Not scaled by τ/τ_base. Gradients reach the prototypes.
    """
    flat, flat_labels, _, B, V = flatten_views(features, labels)
    if normalize:
        flat = F.normalize(flat, dim=-1)
        prototypes = F.normalize(prototypes, dim=-1)
    C = prototypes.shape[0]
    M = flat.shape[0]
    if M and (int(flat_labels.min()) < 0 or int(flat_labels.max()) >= C):
        raise ValueError(f"bcl: labels must lie in [0, {C}) (one prototype per class)")

    columns = torch.cat([flat, prototypes], dim=0)
    col_labels = torch.cat([flat_labels, torch.arange(C, device=flat.device)])
    n_cols = columns.shape[0]

    is_self = torch.arange(M, device=flat.device)[:, None] == torch.arange(n_cols, device=flat.device)[None, :]
    valid = ~is_self
    same = flat_labels[:, None] == col_labels[None, :]
    pos = same & valid

    cnt = torch.bincount(col_labels, minlength=C)                       # V·n_c + 1
    group_size = cnt[col_labels][None, :] - same.long()                # |G_{y_j} \ {i}| >= 1
    s = flat @ columns.T / temperature
    log_d = masked_logsumexp(s - torch.log(group_size.to(s.dtype)), valid)  # log D_i
    n_pos = pos.sum(dim=1)
    sum_pos = torch.where(pos, s - log_d[:, None], torch.zeros_like(s)).sum(dim=1)
    loss = -sum_pos / n_pos.clamp(min=1).to(s.dtype)
    return reduce(loss, reduction)
