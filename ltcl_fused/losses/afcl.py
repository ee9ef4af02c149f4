"""CL / FCL / ACL / AFCL (SPEC.md section 2) on the row-statistics engine."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import _validation as V
from .. import backends
from ..engine import row_stats
from ._common import build_contrast, match_counts, reduce, reference_output


def afcl(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, gamma: float = 0.0, eta: float = 0.0,
         temperature: float = 0.07, normalize_by: str = "batch", contrast_mode: str = "all", normalize: bool = False,
         ref_features: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
         reduction: str = "mean", backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Asymmetric focal contrastive loss (Vito & Stefanus 2022): ``ℓ_i = T⁺_i + η T⁻_i``.

    ``T⁺_i = −(1/N) Σ_{P(i)} (1 − p_ip)^γ log p_ip`` and ``T⁻_i = −(1/N) Σ_{N(i)} log(1 − p_in)``,
    N the number of contrast columns (``normalize_by="batch"``, the released code), or 1/|P(i)| and
    1/|N(i)| (``normalize_by="pairs"``). γ = η = 0 is CL, η = 0 FCL, γ = 0 ACL. Computed stably: a
    finite input never gives NaN. Returned in float32 (float64 for float64 features).
    """
    return _afcl("ltcl_fused.afcl", features, labels, gamma, eta, temperature, normalize_by, contrast_mode, normalize,
                 ref_features, ref_labels, reduction, backend, check_finite)


def _afcl(fn, features, labels, gamma, eta, temperature, normalize_by, contrast_mode, normalize, ref_features,
          ref_labels, reduction, backend, check_finite):
    """afcl / fcl / acl under the name ``fn`` (their errors name the function the user called)."""
    tau = V.check_positive(fn, "temperature", temperature)
    gamma = V.check_nonnegative(fn, "gamma", gamma)
    eta = V.check_nonnegative(fn, "eta", eta)
    V.check_choice(fn, "normalize_by", normalize_by, ("batch", "pairs"))
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    backends.check_backend_name(backend, fn)
    chk = V.ValueChecks(fn, check_finite)
    P = build_contrast(fn, features, labels, ref_features=ref_features, ref_labels=ref_labels,
                       contrast_mode=contrast_mode, normalize=normalize, checks=chk)
    chk.run()
    if backend == "reference":
        from .. import reference as R
        return reference_output(R.afcl(features, labels, gamma=gamma, eta=eta, temperature=tau,
                                       normalize_by=normalize_by, contrast_mode=contrast_mode, normalize=normalize,
                                       ref_features=ref_features, ref_labels=ref_labels, reduction=reduction),
                                features)
    eng = backends.resolve(backend, features.device, "rowstats", fn, dtype=P.A.dtype)
    focal = gamma > 0 or eta > 0
    st = row_stats(eng, P.A, P.C, P.a_lab, P.c_lab, self_offset=0, inv_tau=1.0 / tau, gamma=gamma, focal=focal,
                   fn=fn)
    return reduce(afcl_from_stats(st, match_counts(P.a_lab, P.c_lab) - 1, P.N, eta, normalize_by, focal),
                  reduction)


def afcl_from_stats(st, npos, n_cols, eta, normalize_by, focal):
    """Per-anchor ``T⁺ + η T⁻`` from the row statistics (``npos`` = |P(i)|, ``n_cols`` = N)."""
    acc = st.lse.dtype
    nneg = (n_cols - 1) - npos
    if focal:
        t_pos, t_neg = st.fpos, st.fneg
    else:  # Σ_P −log p = |P| LSE − Σ_P s: no second pass needed
        lse = torch.where(npos > 0, st.lse, torch.zeros_like(st.lse))
        t_pos, t_neg = npos * lse - st.pos_sum, None
    if normalize_by == "batch":
        w_pos = w_neg = torch.full_like(st.lse, 1.0 / n_cols)
    else:
        w_pos = torch.where(npos > 0, 1.0 / npos.clamp(min=1).to(acc), 0.0)
        w_neg = torch.where(nneg > 0, 1.0 / nneg.clamp(min=1).to(acc), 0.0)
    loss = w_pos * t_pos
    if eta > 0:  # skipped at η = 0: 0·inf would be NaN on a degenerate row
        loss = loss + eta * w_neg * t_neg
    return loss



def fcl(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, gamma: float = 1.0, **kw: Any) -> torch.Tensor:
    """Focal contrastive loss: ``afcl`` with η = 0 (Core-tuning's FCL is γ = 1)."""
    if "eta" in kw:
        raise TypeError("ltcl_fused.fcl: `eta` is fixed to 0 (use ltcl_fused.afcl for both)")
    return _afcl("ltcl_fused.fcl", features, labels, gamma=gamma, eta=0.0, **_afcl_kw("ltcl_fused.fcl", kw))


def acl(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, eta: float = 1.0, **kw: Any) -> torch.Tensor:
    """Asymmetric contrastive loss: ``afcl`` with γ = 0."""
    if "gamma" in kw:
        raise TypeError("ltcl_fused.acl: `gamma` is fixed to 0 (use ltcl_fused.afcl for both)")
    return _afcl("ltcl_fused.acl", features, labels, gamma=0.0, eta=eta, **_afcl_kw("ltcl_fused.acl", kw))


_AFCL_DEFAULTS = dict(temperature=0.07, normalize_by="batch", contrast_mode="all", normalize=False, ref_features=None,
                      ref_labels=None, reduction="mean", backend="auto", check_finite=True)


def _afcl_kw(fn, kw):
    """afcl's keyword arguments for fcl / acl, with afcl's defaults (an unknown name is a TypeError)."""
    unknown = set(kw) - set(_AFCL_DEFAULTS)
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {', '.join(sorted(map(repr, unknown)))}")
    return {**_AFCL_DEFAULTS, **kw}
