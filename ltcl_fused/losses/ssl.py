"""The self-supervised family (SPEC.md sections 5 and 6) on the SSL row statistics: DCL, HCL, Bayesian CL, MTTV.

Each loss asks an engine for a few per-anchor statistics (``ltcl_fused/engine/ssl_contract.py``) and
finishes in PyTorch on [2B] vectors, so the 2B×2B similarity matrix is never materialised on the
"torch" backend (memory O(block · 2B)). All four are computed in the log domain: finite inputs never
overflow, whatever the feature norms and the temperature. The loss is returned in float32 (float64
for float64 inputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _validation as V
from .. import backends
from ..engine.ssl_contract import SSLConfig, ssl_row_stats
from ._common import reduce, reference_output

def _engine(backend, device, fn, dtype=None):
    """The engine for the "ssl" operation; None means the dense reference."""
    return backends.resolve(backend, device, "ssl", fn, dtype=dtype)


def _two_views(fn, z1, z2, check_finite):
    V.check_features(fn, "z1", z1, ranks=(2,))
    V.check_features(fn, "z2", z2, ranks=(2,))
    V.check_same(fn, "z2", z2, z1, "z1")
    if z1.shape != z2.shape:
        raise ValueError(f"{fn}: `z1` and `z2` must have the same shape [B, D], got {V._shape(z1)} and {V._shape(z2)}")
    chk = V.ValueChecks(fn, check_finite)
    chk.finite("z1", z1)
    chk.finite("z2", z2)
    chk.run()


_check_bool = V.check_bool


def _two_view_stats(eng, z1, z2, temperature, cfg, fn):
    """SSL row statistics of the 2B anchors [z1; z2]; the positive of i is (i + B) mod 2B."""
    B = z1.shape[0]
    X = torch.cat([z1, z2], 0)
    rows = torch.arange(2 * B, device=X.device)
    return ssl_row_stats(eng, X, X, (rows + B) % (2 * B), self_offset=0, inv_tau=1.0 / temperature, cfg=cfg, fn=fn)


def _log1mexp(x):
    """log(1 − exp(x)) for x < 0; each branch only sees inputs of its own domain (no NaN gradients)."""
    near = x > -math.log(2.0)
    xn = torch.where(near, x, -1.0)
    xf = torch.where(near, -1.0, x)
    return torch.where(near, torch.log(-torch.expm1(xn)), torch.log1p(-torch.exp(xf)))


def _log_debiased(log_sum, s_pos, M, tau_plus, temperature):
    """log max((exp(log_sum) − τ⁺ M e^{s⁺}) / (1 − τ⁺), M e^{−1/t}), stably in the log domain (NaN stays NaN)."""
    floor = math.log(M) - 1.0 / temperature
    if tau_plus > 0:
        c = math.log(tau_plus * M) + s_pos
        ok = c < log_sum  # the numerator is positive
        d = torch.where(ok, c - log_sum, -1.0)
        log_raw = torch.where(ok | torch.isnan(log_sum), log_sum + _log1mexp(d), -math.inf)
    else:
        log_raw = log_sum
    log_raw = log_raw - math.log1p(-tau_plus)
    return torch.where(log_raw < floor, torch.full_like(log_raw, floor), log_raw)  # torch.clamp's tie rule


def _finish(log_ng, s_pos, reduction):
    """ℓ_i = −log(e⁺ / (e⁺ + Ng)) = log(1 + exp(log Ng − s⁺))."""
    return reduce(torch.logaddexp(torch.zeros_like(s_pos), log_ng - s_pos), reduction)


# ---------------------------------------------------------------------------------------------------------------
# argument checks and the finishing step on the row statistics, shared with ltcl_fused.distributed
# (M = the number of negatives per anchor, 2B − 2 over the whole batch)
# ---------------------------------------------------------------------------------------------------------------

def check_dcl_args(fn, temperature, tau_plus, debiased, reduction):
    t = V.check_positive(fn, "temperature", temperature)
    tau_plus = V.check_range(fn, "tau_plus", tau_plus, 0.0, 1.0, hi_open=True)
    _check_bool(fn, "debiased", debiased)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    return t, tau_plus


def check_hcl_args(fn, temperature, tau_plus, beta, reduction):
    t = V.check_positive(fn, "temperature", temperature)
    tau_plus = V.check_range(fn, "tau_plus", tau_plus, 0.0, 1.0, hi_open=True)
    beta = V.check_nonnegative(fn, "beta", beta)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    return t, tau_plus, beta


def check_bayes_args(fn, alpha, beta, tau_plus, temperature, reduction):
    alpha = V.check_range(fn, "alpha", alpha, 0.5, 1.0)
    beta = V.check_range(fn, "beta", beta, 0.5, 1.0)
    tau_plus = V.check_range(fn, "tau_plus", tau_plus, 0.0, 1.0, hi_open=True)
    t = V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    return alpha, beta, tau_plus, t


def check_mttv_args(fn, lower, upper, temperature, filter, official_self_term, reduction):
    lower = V.check_range(fn, "lower", lower, 0.0, 1.0)
    upper = V.check_range(fn, "upper", upper, 0.0, 1.0)
    if lower > upper:
        raise ValueError(f"{fn}: `lower` ({lower}) must not exceed `upper` ({upper})")
    t = V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "filter", filter, ("both", "low"))
    _check_bool(fn, "official_self_term", official_self_term)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    return lower, upper, t


def check_mttv_embeddings(fn, embeddings, check_finite):
    V.check_features(fn, "embeddings", embeddings, ranks=(2,))
    if embeddings.shape[0] % 2:
        raise ValueError(f"{fn}: `embeddings` must have an even number of rows (interleaved pairs), "
                         f"got {embeddings.shape[0]}")
    V.check_finite(fn, "embeddings", embeddings, V.check_bool(fn, "check_finite", check_finite))


def dcl_config():
    return SSLConfig(scales=(1.0,))


def hcl_config(beta):
    return SSLConfig(scales=(beta, 1.0 + beta))


def bayes_config(alpha, beta, tau_plus):
    return SSLConfig(scales=(1.0,), bayes=(alpha, beta, tau_plus))


def mttv_config(lower, upper, filter, official_self_term):
    return SSLConfig(scales=(1.0,), exclude_partner=False, include_self=official_self_term, filter=filter,
                     lower=lower, upper=upper)


def dcl_from_stats(st, M, tau_plus, t, debiased, reduction):
    if M == 0:  # no negatives: Ng = 0, ℓ = 0
        return reduce(0.0 * st.pos, reduction)
    log_ng = _log_debiased(st.lse[0], st.pos, M, tau_plus, t) if debiased else st.lse[0]
    return _finish(log_ng, st.pos, reduction)


def hcl_from_stats(st, M, tau_plus, t, reduction):
    if M == 0:
        return reduce(0.0 * st.pos, reduction)
    log_reweighted = math.log(M) + st.lse[1] - st.lse[0]
    return _finish(_log_debiased(log_reweighted, st.pos, M, tau_plus, t), st.pos, reduction)


def bayes_from_stats(st, reduction):
    return _finish(st.lse[0], st.pos, reduction)  # lse = log Σ ω e; −inf (Ng = 0) gives ℓ = 0


def mttv_ratios(st, t, official_self_term):
    """The ratios r [rows] from the filtered row statistics."""
    lse, kept = st.lse[0], st.pos_in > 0
    if official_self_term:
        # e^{s⁺} / (e^{lse} − e^{1/t}), scaled by e^{−1/t} (cos <= 1, so nothing overflows)
        num = torch.exp(st.pos - 1.0 / t)
        den = torch.expm1(lse - 1.0 / t)
        r = torch.where(kept, num / torch.where(kept, den, 1.0), 0.0)
    else:
        # the positive is in the set when kept, so lse is finite there
        r = torch.where(kept, torch.exp(st.pos - torch.where(kept, lse, st.pos)), 0.0)
    return torch.where(torch.isnan(lse), lse, r)  # a poisoned row (non-finite input) stays NaN


def dcl(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.5, tau_plus: float = 0.1, debiased: bool = True,
        reduction: str = "mean", backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Debiased contrastive loss (Chuang et al. 2020); ``debiased=False`` is SimCLR.

    Anchors are the 2B rows ``[z1; z2]`` (features used as given), the positive of each is its other
    view and the other ``M = 2B − 2`` rows are negatives; ``s = z·z/t``.
    ``Ng_i = max((Σ_n e^{s_in} − τ⁺ M e^{s⁺_i}) / (1 − τ⁺), M e^{−1/t})`` (SimCLR: ``Σ_n e^{s_in}``) and
    ``ℓ_i = −log(e^{s⁺_i} / (e^{s⁺_i} + Ng_i))``; ``reduction="none"`` gives the 2B values.
    One streaming pass: the masked log-sum-exp of each row over its negatives.
    """
    fn = "ltcl_fused.dcl"
    backends.check_backend_name(backend, fn)
    _two_views(fn, z1, z2, check_finite)
    t, tau_plus = check_dcl_args(fn, temperature, tau_plus, debiased, reduction)
    eng = _engine(backend, z1.device, fn, z1.dtype)
    if eng is None:
        from .. import reference as R
        return reference_output(R.dcl(z1, z2, temperature=t, tau_plus=tau_plus, debiased=debiased,
                                      reduction=reduction), z1)
    st = _two_view_stats(eng, z1, z2, t, dcl_config(), fn)
    return dcl_from_stats(st, 2 * z1.shape[0] - 2, tau_plus, t, debiased, reduction)


def hcl(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0,
        reduction: str = "mean", backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Hard-negative contrastive loss (Robinson et al. 2021), importance weights not detached.

    ``Ng_i = max((M Σ_n e_in^{1+β} / Σ_n e_in^β − τ⁺ M e⁺_i) / (1 − τ⁺), M e^{−1/t})``, with the ratio
    formed as ``exp(LSE((1+β)s) − LSE(βs))`` over the negatives: one pass with two LSE accumulators.
    Anchors, positives and ``reduction`` as in :func:`dcl`; no negatives (B = 1) gives 0.
    """
    fn = "ltcl_fused.hcl"
    backends.check_backend_name(backend, fn)
    _two_views(fn, z1, z2, check_finite)
    t, tau_plus, beta = check_hcl_args(fn, temperature, tau_plus, beta, reduction)
    eng = _engine(backend, z1.device, fn, z1.dtype)
    if eng is None:
        from .. import reference as R
        return reference_output(R.hcl(z1, z2, temperature=t, tau_plus=tau_plus, beta=beta, reduction=reduction),
                                z1)
    st = _two_view_stats(eng, z1, z2, t, hcl_config(beta), fn)
    return hcl_from_stats(st, 2 * z1.shape[0] - 2, tau_plus, t, reduction)


def bayesian_cl(z1: torch.Tensor, z2: torch.Tensor, *, alpha: float = 0.5, beta: float = 1.0, tau_plus: float = 0.1,
                temperature: float = 0.5, reduction: str = "mean", backend: str = "auto",
                check_finite: bool = True) -> torch.Tensor:
    """Bayesian self-supervised contrastive loss (Liu et al.; liubin06/BCL ``estimator='BCL'``), exact ranks.

    ``Ng_i = Σ_n ω(u_in) e_in`` with ``u_in`` the exact empirical CDF of ``s_in`` among the row's M
    negatives (ties count as <=) and ω of SPEC.md section 5 (α location in [0.5, 1], β concentration in
    [0.5, 1]); ω is piecewise constant and carries no gradient. The ranks are exact, not approximated:
    each block of anchor rows is sorted and every entry's CDF is found by binary search
    (O(block · 2B) memory, O(4B² log 2B) time). ``ℓ_i`` and ``reduction`` as in :func:`dcl`.
    """
    fn = "ltcl_fused.bayesian_cl"
    backends.check_backend_name(backend, fn)
    _two_views(fn, z1, z2, check_finite)
    alpha, beta, tau_plus, t = check_bayes_args(fn, alpha, beta, tau_plus, temperature, reduction)
    eng = _engine(backend, z1.device, fn, z1.dtype)
    if eng is None:
        from .. import reference as R
        return reference_output(R.bayesian_cl(z1, z2, alpha=alpha, beta=beta, tau_plus=tau_plus, temperature=t,
                                              reduction=reduction), z1)
    st = _two_view_stats(eng, z1, z2, t, bayes_config(alpha, beta, tau_plus), fn)
    return bayes_from_stats(st, reduction)


def mttv(embeddings: torch.Tensor, *, lower: float = 0.1, upper: float = 0.9, temperature: float = 0.3,
         filter: str = "both", official_self_term: bool = False, reduction: str = "mean", backend: str = "auto",
         check_finite: bool = True) -> torch.Tensor:
    """MTTV loss with the extreme-feature filter (SPEC.md section 6); rows 2k and 2k+1 are positives.

    Rows are L2-normalised first (differentiably, ``F.normalize``), ``cos = ẑ ẑᵀ``. Entry (i, k) is
    dropped when ``|cos_ik| < lower`` or (``filter="both"``) ``|cos_ik| > upper`` (|cos| clamped to 1 first, so
    ``upper=1`` keeps identical pairs whose cosine rounds to 1 + 2e-16); the filter is a mask
    with no gradient. ``r_i = 1[pos kept] exp(cos_{i,i⁺}/t) / Σ_{k≠i, kept} exp(cos_ik/t)`` and
    ``L = −log((1/2B) Σ_i r_i)``. ``official_self_term=True`` uses the released code's denominator
    ``Σ_{k kept, self included if kept} exp(cos_ik/t) − e^{1/t}`` (which can be <= 0 under "both": then
    L may be NaN, as in the released code). ``reduction="none"`` returns the ratios ``r [2B]``;
    "mean" and "sum" both return L (the log of a mean ratio is not a sum of per-row terms).
    One streaming pass: the filtered log-sum-exp of each row and its positive's value.
    """
    fn = "ltcl_fused.mttv"
    backends.check_backend_name(backend, fn)
    check_mttv_embeddings(fn, embeddings, check_finite)
    lower, upper, t = check_mttv_args(fn, lower, upper, temperature, filter, official_self_term, reduction)
    eng = _engine(backend, embeddings.device, fn, embeddings.dtype)
    if eng is None:
        from .. import reference as R
        return reference_output(R.mttv(embeddings, lower=lower, upper=upper, temperature=t, filter=filter,
                                       official_self_term=official_self_term, reduction=reduction), embeddings)
    Z = F.normalize(embeddings, dim=1)
    n = Z.shape[0]
    partner = torch.arange(n, device=Z.device) ^ 1
    cfg = mttv_config(lower, upper, filter, official_self_term)
    st = ssl_row_stats(eng, Z, Z, partner, self_offset=0, inv_tau=1.0 / t, cfg=cfg, fn=fn)
    r = mttv_ratios(st, t, official_self_term)
    if reduction == "none":
        return r
    return -torch.log(r.mean())
