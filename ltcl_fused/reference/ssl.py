"""Self-supervised debiasing family (SPEC.md section 5): SimCLR, DCL, HCL, Bayesian CL. Dense reference.

Two views ``z1, z2 [B, D]`` give 2B anchors in the order ``[z1; z2]``; the positive of anchor i is its other
view, the negatives are the other ``M = 2B − 2`` columns; ``s_ij = z_i·z_j / t``, ``e_ij = exp(s_ij)``,
``ℓ_i = −log(e⁺_i / (e⁺_i + Ng_i))``.

Numerics: every row is evaluated with a detached per-row shift ``m_i = max_j s_ij`` over its positive and
negatives (``e' = exp(s − m)``, ``Ng' = Ng·exp(−m)``), which leaves ``ℓ_i`` unchanged but cannot overflow;
the clamp floor ``M e^{−1/t}`` is shifted the same way.
"""
import torch

from ._common import reduce


def _two_view_scores(z1, z2, temperature):
    """Return ``s_pos [2B]``, ``s_neg [2B, M]`` (each row's negatives, column order kept), shift ``m [2B]``."""
    B = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    n = 2 * B
    s = z @ z.T / temperature
    rows = torch.arange(n, device=z.device)
    partner = (rows + B) % n
    s_pos = s[rows, partner]
    neg = (rows[:, None] != rows[None, :]) & (partner[:, None] != rows[None, :])
    s_neg = s[neg].reshape(n, n - 2)
    m = torch.cat([s_pos[:, None], s_neg], dim=1).amax(dim=1).detach()
    return s_pos, s_neg, m


def _finish(s_pos, m, ng_shifted, reduction):
    """``ℓ_i = log(e⁺ + Ng) − s⁺`` evaluated in shifted units."""
    loss = torch.log(torch.exp(s_pos - m) + ng_shifted) - (s_pos - m)
    return reduce(loss, reduction)


def dcl(z1, z2, *, temperature=0.5, tau_plus=0.1, debiased=True, reduction="mean"):
    """Debiased contrastive loss (Chuang et al. 2020); ``debiased=False`` gives SimCLR (``Ng = Σ_n e_in``).

    ``Ng = max((Σ_n e_in − τ⁺ M e⁺) / (1 − τ⁺), M e^{−1/t})``.
    """
    s_pos, s_neg, m = _two_view_scores(z1, z2, temperature)
    M = s_neg.shape[1]
    e_pos = torch.exp(s_pos - m)
    ng = torch.exp(s_neg - m[:, None]).sum(dim=1)
    if debiased:
        floor = M * torch.exp(-1.0 / temperature - m)
        ng = torch.clamp((ng - tau_plus * M * e_pos) / (1.0 - tau_plus), min=floor)
    return _finish(s_pos, m, ng, reduction)


def hcl(z1, z2, *, temperature=0.5, tau_plus=0.1, beta=1.0, reduction="mean"):
    """Hard negative contrastive loss (Robinson et al. 2021); the importance weights are not detached.

    ``Ng = max((M Σ_n e_in^{1+β} / Σ_n e_in^β − τ⁺ M e⁺) / (1 − τ⁺), M e^{−1/t})``; the ratio is formed as
    ``exp(LSE((1+β)s) − LSE(βs))``. With no negatives (B = 1) the reweighted sum is 0.
    """
    s_pos, s_neg, m = _two_view_scores(z1, z2, temperature)
    M = s_neg.shape[1]
    e_pos = torch.exp(s_pos - m)
    if M > 0:
        log_ratio = torch.logsumexp((1.0 + beta) * s_neg, dim=1) - torch.logsumexp(beta * s_neg, dim=1)
        reweighted = M * torch.exp(log_ratio - m)
    else:
        reweighted = torch.zeros_like(e_pos)
    floor = M * torch.exp(-1.0 / temperature - m)
    ng = torch.clamp((reweighted - tau_plus * M * e_pos) / (1.0 - tau_plus), min=floor)
    return _finish(s_pos, m, ng, reduction)


def bayesian_weights(u, *, alpha, beta, tau_plus):
    """ω(u) of the Bayesian contrastive loss for empirical CDF values ``u`` (SPEC.md section 5)."""
    tau_minus = 1.0 - tau_plus
    a = (1.0 - 2.0 * alpha) * (tau_minus - tau_plus) + 1e-3
    b = 2.0 * (alpha * tau_minus + (1.0 - alpha) * tau_plus)
    # the root (−b + sqrt(b² + 4au)) / (2a) written without the cancellation (a = 1e-3 at α = 0.5)
    x = 2.0 * u / (b + torch.sqrt(b * b + 4.0 * a * u))
    phi1, phi2 = 2.0 * (1.0 - x), 2.0 * x
    psi_tn = alpha * phi1 + (1.0 - alpha) * phi2
    psi_fn = (1.0 - alpha) * phi1 + alpha * phi2
    psi_htn = (alpha * (1.0 - beta) * phi1 + (1.0 - alpha) * beta * phi2) / (
        alpha * (1.0 - beta) + (1.0 - alpha) * beta + 1e-3)
    return psi_htn / (tau_minus * psi_tn + tau_plus * psi_fn)


def bayesian_cl(z1, z2, *, alpha=0.5, beta=1.0, tau_plus=0.1, temperature=0.5, reduction="mean"):
    """Bayesian contrastive loss (Liu et al.; liubin06/BCL ``estimator='BCL'``): ``Ng_i = Σ_n ω_in e_in``.

    ``u_ij = (1/M) #{k ∈ neg(i): e_ik <= e_ij}`` is the exact empirical CDF within the row, ties counted
    (compared on s, which orders exactly like e = exp(s)). ω is piecewise constant: no gradient through it.
    """
    s_pos, s_neg, m = _two_view_scores(z1, z2, temperature)
    M = s_neg.shape[1]
    with torch.no_grad():
        # u[i, j] = #{k : s_neg[i, k] <= s_neg[i, j]} / M   (dense [2B, M, M] comparison)
        u = (s_neg[:, None, :] <= s_neg[:, :, None]).sum(dim=2).to(s_neg.dtype) / max(M, 1)
        omega = bayesian_weights(u, alpha=alpha, beta=beta, tau_plus=tau_plus)
    ng = (omega * torch.exp(s_neg - m[:, None])).sum(dim=1)
    return _finish(s_pos, m, ng, reduction)
