"""MTTV loss with the extreme-feature filter (SPEC.md section 6; anonymouspersoncscv/MTTV `Our_xent_loss`)."""
import math

import torch
import torch.nn.functional as F


def mttv(embeddings, *, lower=0.1, upper=0.9, temperature=0.3, filter="both", official_self_term=False,
         reduction="mean"):
    """``L = −log((1/2B) Σ_i r_i)`` with, for the interleaved pairs (2k, 2k+1),

    ``r_i = 1[pos kept] exp(cos_{i,i⁺}/t) / Σ_{k≠i, kept} exp(cos_ik/t)``.

    Entry (i, j) is dropped when ``|cos_ij| > upper`` or ``|cos_ij| < lower`` (``filter="both"``) or only
    when ``|cos_ij| < lower`` (``filter="low"``), |cos| clamped to 1 first; the filter is a detached mask
    (no gradient through it).
    ``official_self_term=True`` reproduces the released code's denominator
    ``Σ_{k kept (self included if kept)} exp(cos_ik/t) − e^{1/t}``, which can be <= 0 under ``"both"``
    (then r_i is negative or inf and L may be NaN, exactly as in the released code).
    A row whose positive is dropped has r_i = 0. If every r_i is 0, L = +inf.

    Reductions: ``"none"`` returns ``r [2B]``; the loss is the log of a mean ratio, not a sum of per-row
    terms, so ``"mean"`` and ``"sum"`` both return L.
    """
    if filter not in ("both", "low"):
        raise ValueError(f"filter must be 'both' or 'low', got {filter!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n = embeddings.shape[0]
    if n % 2:
        raise ValueError(f"mttv needs an even number of rows (interleaved pairs), got {n}")
    z = F.normalize(embeddings, dim=1)
    cos = z @ z.T
    with torch.no_grad():
        a = cos.abs().clamp(max=1.0)  # a cosine computed as 1 + 2e-16 is 1 (upper=1 keeps it); NaN stays NaN
        dropped = a < lower
        if filter == "both":
            dropped = dropped | (a > upper)
        kept = ~dropped
    rows = torch.arange(n, device=z.device)
    partner = rows ^ 1                               # 2k <-> 2k+1
    e = torch.exp(cos / temperature)
    zero = torch.zeros_like(e)
    if official_self_term:
        denom = torch.where(kept, e, zero).sum(dim=1) - math.exp(1.0 / temperature)
    else:
        not_self = rows[:, None] != rows[None, :]
        denom = torch.where(kept & not_self, e, zero).sum(dim=1)
    pos_kept = kept[rows, partner]
    num = e[rows, partner]
    safe_denom = torch.where(pos_kept, denom, torch.ones_like(denom))
    r = torch.where(pos_kept, num / safe_denom, torch.zeros_like(num))
    if reduction == "none":
        return r
    return -torch.log(r.mean())
