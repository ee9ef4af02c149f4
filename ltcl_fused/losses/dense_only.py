"""Public entry points whose fused paths are still to come: validated, then computed by the dense reference.

``backend="auto"`` and ``"reference"`` run ``ltcl_fused.reference`` (O(N²) memory); naming a fused
backend raises NotImplementedError with the issue that brings it.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from .. import backends

_PLANNED = {
    "dcl": "fused self-supervised family, issue #7",
    "hcl": "fused self-supervised family, issue #7",
    "bayesian_cl": "fused self-supervised family, issue #7",
    "mttv": "fused MTTV, issue #7",
}


def _route(name: str, backend) -> None:
    fn = f"ltcl_fused.{name}"
    backends.check_backend_name(backend, fn)
    if backend not in ("auto", "reference"):
        raise NotImplementedError(f"{fn}: backend {backend!r} is not implemented yet ({_PLANNED[name]}); "
                                  f"use backend='auto' or 'reference'")


def _two_views(fn, z1, z2, check_finite):
    V.check_features(fn, "z1", z1, ranks=(2,))
    V.check_features(fn, "z2", z2, ranks=(2,))
    V.check_same(fn, "z2", z2, z1, "z1")
    if z1.shape != z2.shape:
        raise ValueError(f"{fn}: `z1` and `z2` must have the same shape [B, D], got {V._shape(z1)} and {V._shape(z2)}")
    V.check_finite(fn, "z1", z1, check_finite)
    V.check_finite(fn, "z2", z2, check_finite)


def dcl(z1, z2, *, temperature=0.5, tau_plus=0.1, debiased=True, reduction="mean", backend="auto",
        check_finite=True):
    """Debiased contrastive loss (Chuang et al. 2020); ``debiased=False`` is SimCLR."""
    fn = "ltcl_fused.dcl"
    _route("dcl", backend)
    _two_views(fn, z1, z2, check_finite)
    V.check_positive(fn, "temperature", temperature)
    V.check_range(fn, "tau_plus", tau_plus, 0.0, 1.0, hi_open=True)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    from .. import reference as R
    return R.dcl(z1, z2, temperature=temperature, tau_plus=tau_plus, debiased=debiased, reduction=reduction)


def hcl(z1, z2, *, temperature=0.5, tau_plus=0.1, beta=1.0, reduction="mean", backend="auto", check_finite=True):
    """Hard-negative contrastive loss (Robinson et al. 2021)."""
    fn = "ltcl_fused.hcl"
    _route("hcl", backend)
    _two_views(fn, z1, z2, check_finite)
    V.check_positive(fn, "temperature", temperature)
    V.check_range(fn, "tau_plus", tau_plus, 0.0, 1.0, hi_open=True)
    V.check_nonnegative(fn, "beta", beta)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    from .. import reference as R
    return R.hcl(z1, z2, temperature=temperature, tau_plus=tau_plus, beta=beta, reduction=reduction)


def bayesian_cl(z1, z2, *, alpha=0.5, beta=1.0, tau_plus=0.1, temperature=0.5, reduction="mean", backend="auto",
                check_finite=True):
    """Bayesian self-supervised contrastive loss (Liu et al.), exact within-row ranks."""
    fn = "ltcl_fused.bayesian_cl"
    _route("bayesian_cl", backend)
    _two_views(fn, z1, z2, check_finite)
    V.check_range(fn, "alpha", alpha, 0.5, 1.0)
    V.check_range(fn, "beta", beta, 0.5, 1.0)
    V.check_range(fn, "tau_plus", tau_plus, 0.0, 1.0, hi_open=True)
    V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    from .. import reference as R
    return R.bayesian_cl(z1, z2, alpha=alpha, beta=beta, tau_plus=tau_plus, temperature=temperature,
                         reduction=reduction)


def mttv(embeddings, *, lower=0.1, upper=0.9, temperature=0.3, filter="both", official_self_term=False,
         reduction="mean", backend="auto", check_finite=True):
    """MTTV loss with the extreme-feature filter (SPEC.md section 6); rows 2k and 2k+1 are positives."""
    fn = "ltcl_fused.mttv"
    _route("mttv", backend)
    V.check_features(fn, "embeddings", embeddings, ranks=(2,))
    if embeddings.shape[0] % 2:
        raise ValueError(f"{fn}: `embeddings` must have an even number of rows (interleaved pairs), "
                         f"got {embeddings.shape[0]}")
    V.check_finite(fn, "embeddings", embeddings, check_finite)
    V.check_range(fn, "lower", lower, 0.0, 1.0)
    V.check_range(fn, "upper", upper, 0.0, 1.0)
    if lower > upper:
        raise ValueError(f"{fn}: `lower` ({lower}) must not exceed `upper` ({upper})")
    V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "filter", filter, ("both", "low"))
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    from .. import reference as R
    return R.mttv(embeddings, lower=lower, upper=upper, temperature=temperature, filter=filter,
                  official_self_term=official_self_term, reduction=reduction)
