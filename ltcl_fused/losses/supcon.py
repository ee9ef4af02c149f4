"""SupCon / SimCLR (SPEC.md section 1) on the row-statistics engine."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .. import backends
from ..engine import row_stats
from ._common import build_contrast, match_counts, reduce, reference_output


def supcon(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, temperature: float = 0.07,
           base_temperature: Optional[float] = None, contrast_mode: str = "all", normalize: bool = False,
           ref_features: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
           reduction: str = "mean", backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020); SimCLR's NT-Xent when ``labels`` is None.

    ``ℓ_i = −(τ/τ_base) (1/|P(i)|) Σ_{p∈P(i)} (s_ip − LSE_i)``; an anchor without positives gives 0
    and still counts in the mean. ``features`` is ``[N, D]`` or ``[B, V, D]`` (flattened view-major);
    ``reduction="none"`` returns the per-anchor values in that flattened order. The loss is returned
    in float32 (float64 for float64 features).
    """
    fn = "ltcl_fused.supcon"
    tau = V.check_positive(fn, "temperature", temperature)
    tau_b = tau if base_temperature is None else V.check_positive(fn, "base_temperature", base_temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    backends.check_backend_name(backend, fn)
    chk = V.ValueChecks(fn, check_finite)
    P = build_contrast(fn, features, labels, ref_features=ref_features, ref_labels=ref_labels,
                       contrast_mode=contrast_mode, normalize=normalize, checks=chk)
    chk.run()
    if backend == "reference":
        from .. import reference as R
        return reference_output(R.supcon(features, labels, temperature=tau, base_temperature=base_temperature,
                                         contrast_mode=contrast_mode, normalize=normalize, ref_features=ref_features,
                                         ref_labels=ref_labels, reduction=reduction), features)
    eng = backends.resolve(backend, features.device, "rowstats", fn, dtype=P.A.dtype)
    st = row_stats(eng, P.A, P.C, P.a_lab, P.c_lab, self_offset=0, inv_tau=1.0 / tau, fn=fn)
    return reduce(supcon_from_stats(st.lse, st.pos_sum, match_counts(P.a_lab, P.c_lab) - 1, tau / tau_b), reduction)


def supcon_from_stats(lse, pos_sum, npos, scale):
    """Per-anchor SupCon from the row statistics; 0 for anchors without positives."""
    has = npos > 0
    lse = torch.where(has, lse, torch.zeros_like(lse))
    mean_log_prob_pos = (pos_sum - npos * lse) / npos.clamp(min=1)
    return torch.where(has, -scale * mean_log_prob_pos, torch.zeros_like(lse))
