"""MTTV loss with the extreme-feature filter (SPEC.md section 6; anonymouspersoncscv/MTTV `Our_xent_loss`)."""
import math

import torch
import torch.nn.functional as F

from ._common import masked_logsumexp


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
    # log domain throughout: s = cos/t reaches 1/t (1e4 at t = 1e-4), so exp(s) itself would overflow
    s = cos / temperature
    pos_kept = kept[rows, partner]
    s_pos = s[rows, partner]
    if official_self_term:
        # r = e^{s⁺} / (Σ_kept e^s − e^{1/t}), numerator and denominator scaled by e^{−1/t} (cos <= 1: no overflow)
        lse = masked_logsumexp(s, kept)
        den = torch.expm1(torch.where(pos_kept, lse, torch.zeros_like(lse)) - 1.0 / temperature)
        r = torch.where(pos_kept, torch.exp(s_pos - 1.0 / temperature) / torch.where(pos_kept, den, -1.0),
                        torch.zeros_like(s_pos))
        if reduction == "none":
            return r
        return -torch.log(r.mean())
    not_self = rows[:, None] != rows[None, :]
    lse = masked_logsumexp(s, kept & not_self)       # finite wherever the positive is kept (it is in the set)
    log_r = torch.where(pos_kept, s_pos - torch.where(pos_kept, lse, s_pos), torch.full_like(s_pos, -math.inf))
    if reduction == "none":
        return torch.exp(log_r)
    # L = −log((1/2B) Σ_i r_i) = log 2B − log Σ_i r_i; +inf when no positive is kept
    return math.log(n) - masked_logsumexp(log_r[None, :], pos_kept[None, :])[0]
