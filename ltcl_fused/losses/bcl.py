"""Balanced contrastive learning (SPEC.md section 3): class-averaged SupCon with class prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from .. import backends
from ..engine import row_stats
from ._common import class_counts, flatten_views, reduce, reference_output


def bcl(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *, temperature: float = 0.07,
        normalize: bool = False, reduction: str = "mean", backend: str = "auto",
        check_finite: bool = True) -> torch.Tensor:
    """BCL loss of Zhu et al. 2022 (``BalSCL``): columns are the V·B views then the C prototypes.

    ``D_i = Σ_c (1/|G_c \\ {i}|) Σ_{j∈G_c\\{i}} exp(s_ij)``, ``ℓ_i = −(1/|P(i)|) Σ_P (s_ip − log D_i)``,
    mean over the V·B anchors. Gradients reach ``features`` and ``prototypes``. ``labels`` must lie in
    [0, C): checked with the finiteness in one host read, or (``check_finite=False``) a label out of range
    makes the loss NaN without any read.
    """
    fn = "ltcl_fused.bcl"
    tau = V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    backends.check_backend_name(backend, fn)
    V.check_features(fn, "features", features)
    V.check_features(fn, "prototypes", prototypes, ranks=(2,))
    V.check_same(fn, "prototypes", prototypes, features)
    X, B, Vw = flatten_views(features)
    V.check_labels(fn, "labels", labels, B, features.device, f"one label per sample of `features` {V._shape(features)}")
    n_cls = prototypes.shape[0]
    chk = V.ValueChecks(fn, check_finite)
    base = V.label_range(chk, "labels", labels, n_cls, "one prototype per class")  # clamped: safe to index
    chk.finite("features", features)
    chk.finite("prototypes", prototypes)
    chk.run()  # the one host read (none with check_finite=False: a bad label then makes the loss NaN)
    if backend == "reference":
        from .. import reference as R
        return chk.poison(reference_output(R.bcl(features, base, prototypes, temperature=tau, normalize=normalize,
                                                 reduction=reduction), features))
    if normalize:
        X, prototypes = F.normalize(X, dim=-1), F.normalize(prototypes, dim=-1)
    dev = features.device
    lab = base.repeat(Vw)
    c_lab = torch.cat([lab, torch.arange(n_cls, device=dev)])
    cnt = class_counts(c_lab, n_cls).to(torch.float64)  # V·n_c + 1 per class
    bias_other = (-torch.log(cnt))[c_lab]
    bias_same = (-torch.log((cnt - 1).clamp(min=1)))[c_lab]  # own class: anchor i itself is not counted
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    bias_same, bias_other = bias_same.to(acc), bias_other.to(acc)
    eng = backends.resolve(backend, dev, "rowstats", fn, dtype=X.dtype)
    # two column blocks: the batch against itself (C is A: the engine's symmetric path, about half the work)
    # and the prototypes; the row statistics merge exactly (lse by logaddexp, the positives' sums add) and
    # autograd carries each block's gradient through the merge
    nb = X.shape[0]
    st_b = row_stats(eng, X, X, lab, lab, self_offset=0, inv_tau=1.0 / tau, bias_same=bias_same[:nb],
                     bias_other=bias_other[:nb], fn=fn)
    st_p = row_stats(eng, X, prototypes, lab, c_lab[nb:], self_offset=-1, inv_tau=1.0 / tau,
                     bias_same=bias_same[nb:], bias_other=bias_other[nb:], fn=fn)
    lse = torch.logaddexp(st_b.lse, st_p.lse)
    npos = (cnt[lab] - 1).to(acc)  # every other column of the class, prototype included (>= 1)
    return chk.poison(reduce(lse - (st_b.pos_sum + st_p.pos_sum) / npos, reduction))
