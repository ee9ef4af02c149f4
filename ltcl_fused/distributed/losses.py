"""SupCon, AFCL, BCL and ResCom over torch.distributed, exact in value and gradient.

Every rank passes its own slice of the batch. The global contrast columns are every rank's flattened
columns in rank order (``[rank 0's rows | rank 1's rows | ...]``; the loss does not depend on column
order, and ranks may hold different numbers of samples). Each rank computes the rows of its own anchors
with the row-statistics engine (``row_stats``), finding its self columns from its offset in that order,
and combines the row statistics exactly as the single-process losses do.

Reduction convention (see docs/distributed.md): ``"mean"`` and ``"sum"`` return, on every rank,
the loss of the GLOBAL batch (the mean over all ranks' anchors), the value one process would compute on
the concatenated batch. Its backward gives this rank's share of the gradient: with ``grad_sync="mean"``
(default, what DistributedDataParallel and FSDP do) the shares are scaled by the world size so that the
average over ranks is the exact gradient; with ``grad_sync="sum"`` the shares sum to it (and the
gradient reaching this rank's ``features`` is then exactly the matching slice of the single-process
gradient). Never multiply the loss by the world size yourself. ``"none"`` returns this rank's per-anchor
values (flattened view-major over the local batch), unscaled.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _validation as V
from .. import backends
from ..engine import acc_dtype, row_stats
from ..losses._common import build_contrast, flatten_views, match_counts
from ..losses.afcl import afcl_from_stats
from ..losses.rescom import _check_keys, check_class_weights, rescom_from_stats
from ..losses.supcon import supcon_from_stats
from .gather import all_gather_nograd, all_gather_rows, world
from .ring import ring_row_stats

__all__ = ["supcon", "afcl", "fcl", "acl", "bcl", "rescom"]

MODES = ("gather", "ring")
GRAD_SYNCS = ("mean", "sum")


# ---------------------------------------------------------------------------------------------------------------
# agreement between ranks: a bad input on one rank must raise everywhere, not leave the others hanging
# ---------------------------------------------------------------------------------------------------------------


def _agree(fn: str, err: Optional[BaseException], meta: List[int], device, group) -> List[List[int]]:
    """All-gather ``[ok] + meta`` (ints) from every rank; raise on every rank if any rank failed."""
    rank, W = world(group)
    t = torch.tensor([0 if err is None else 1] + [int(m) for m in meta], dtype=torch.int64, device=device)
    out = torch.empty(W * t.numel(), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(out, t, group=group)
    rows = out.view(W, -1).tolist()
    if err is not None:
        raise err
    bad = [r for r in range(W) if rows[r][0]]
    if bad:
        raise RuntimeError(f"{fn}: rank(s) {bad} rejected their inputs (see the error raised there); "
                           f"every rank stops so that none waits forever in a collective")
    return [row[1:] for row in rows]


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_common(fn, mode, grad_sync, backend, group):
    V.check_choice(fn, "mode", mode, MODES)
    V.check_choice(fn, "grad_sync", grad_sync, GRAD_SYNCS)
    backends.check_backend_name(backend, fn)
    if backend == "reference":
        raise ValueError(f"{fn}: `backend`='reference' is the dense single-process oracle and has no distributed "
                         f"form; use 'auto' or a fused backend (or the plain loss on gathered features)")
    world(group)


def _consistent(fn, rows, idx, what):
    vals = {r[idx] for r in rows}
    if len(vals) > 1:
        raise ValueError(f"{fn}: {what} differs between ranks ({[r[idx] for r in rows]}); every rank must pass "
                         f"the same")


def _offsets(sizes):
    off = [0]
    for s in sizes:
        off.append(off[-1] + int(s))
    return off


class _GlobalReduce(torch.autograd.Function):
    """Value: Σ over ranks of ``local`` times ``scale`` (the same on every rank); backward: ``grad · gscale``."""

    @staticmethod
    def forward(ctx, local, scale, gscale, group):
        ctx.gscale = gscale
        tot = local.detach().clone()
        dist.all_reduce(tot, op=dist.ReduceOp.SUM, group=group)
        return tot * scale

    @staticmethod
    def backward(ctx, g):
        return g * ctx.gscale, None, None, None


def _reduce(loss, reduction, n_global, grad_sync, group):
    if reduction == "none":
        return loss
    _, W = world(group)
    k = float(W) if grad_sync == "mean" else 1.0
    scale = 1.0 / n_global if reduction == "mean" else 1.0
    return _GlobalReduce.apply(loss.sum(), scale, scale * k, group)


def _stats(eng, mode, A, C_local, a_lab, c_lab_glob, col_sizes, rank, inv_tau, group, *, bias_same=None,
           bias_other=None, gamma=0.0, focal=False):
    """Row statistics of the local anchors (rows 0.. of this rank's column block) against the global columns."""
    if mode == "gather":
        C = all_gather_rows(C_local, col_sizes, group)
        return row_stats(eng, A, C, a_lab, c_lab_glob, self_offset=_offsets(col_sizes)[rank], inv_tau=inv_tau,
                         bias_same=bias_same, bias_other=bias_other, gamma=gamma, focal=focal)
    return ring_row_stats(eng, A, C_local, a_lab, c_lab_glob, col_sizes, anchor_offset=0, inv_tau=inv_tau,
                          bias_same=bias_same, bias_other=bias_other, gamma=gamma, focal=focal, group=group)


class _Problem:
    """The global contrast problem seen from one rank (supcon / afcl layout)."""

    def __init__(self, fn, features, labels, ref_features, ref_labels, contrast_mode, normalize, check_finite,
                 group):
        rank, W = world(group)
        dev = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
        err, P = None, None
        try:
            P = build_contrast(fn, features, labels, ref_features=ref_features, ref_labels=ref_labels,
                               contrast_mode=contrast_mode, normalize=normalize, check_finite=check_finite)
        except (TypeError, ValueError) as e:
            err = e
        meta = [0] * 7 if P is None else [P.N, P.M, P.B, P.N - P.X.shape[0], P.X.shape[1], int(labels is not None),
                                          _DTYPES.index(P.X.dtype)]
        rows = _agree(fn, err, meta, dev, group)
        _consistent(fn, rows, 4, "the feature dimension D")
        _consistent(fn, rows, 5, "whether `labels` is given")
        _consistent(fn, rows, 6, "the features' dtype")
        self.rank, self.W, self.P = rank, W, P
        self.col_sizes = [r[0] for r in rows]
        self.m_global = sum(r[1] for r in rows)
        self.n_global = sum(self.col_sizes)
        a_lab, c_lab = P.a_lab, P.c_lab
        if labels is None:  # SimCLR: globally unique sample ids (and unique ids for reference rows)
            b_off = _offsets([r[2] for r in rows])
            r_off = _offsets([r[3] for r in rows])
            base = torch.arange(P.B, device=dev, dtype=torch.int64) + b_off[rank]
            lab = base.repeat(P.V)
            rlab = b_off[-1] + r_off[rank] + torch.arange(P.N - P.X.shape[0], device=dev, dtype=torch.int64)
            c_lab = torch.cat([lab, rlab])
            a_lab = lab[: P.M]
        self.a_lab = a_lab
        self.c_lab_glob = all_gather_nograd(c_lab, self.col_sizes, group)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def supcon(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, temperature: float = 0.07,
           base_temperature: Optional[float] = None, contrast_mode: str = "all", normalize: bool = False,
           ref_features: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
           reduction: str = "mean", backend: str = "auto", check_finite: bool = True, mode: str = "gather",
           group: Any = None, grad_sync: str = "mean") -> torch.Tensor:
    """``ltcl_fused.supcon`` over the global batch of all ranks of ``group`` (see the module docstring).

    ``features`` / ``labels`` (and ``ref_features`` / ``ref_labels``, extra columns contributed by this
    rank) are this rank's slice. ``labels=None`` is SimCLR with globally unique sample ids.
    ``mode="gather"`` all-gathers the columns; ``mode="ring"`` passes column blocks around the ring so that
    no rank holds all global features.
    """
    fn = "ltcl_fused.distributed.supcon"
    tau = V.check_positive(fn, "temperature", temperature)
    tau_b = tau if base_temperature is None else V.check_positive(fn, "base_temperature", base_temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    _check_common(fn, mode, grad_sync, backend, group)
    pb = _Problem(fn, features, labels, ref_features, ref_labels, contrast_mode, normalize, check_finite, group)
    P = pb.P
    eng = backends.resolve(backend, P.X.device, "rowstats", fn, dtype=P.X.dtype)
    st = _stats(eng, mode, P.A, P.C, pb.a_lab, pb.c_lab_glob, pb.col_sizes, pb.rank, 1.0 / tau, group)
    loss = supcon_from_stats(st.lse, st.pos_sum, match_counts(pb.a_lab, pb.c_lab_glob) - 1, tau / tau_b)
    return _reduce(loss, reduction, pb.m_global, grad_sync, group)


def afcl(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, gamma: float = 0.0, eta: float = 0.0,
         temperature: float = 0.07, normalize_by: str = "batch", contrast_mode: str = "all", normalize: bool = False,
         ref_features: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
         reduction: str = "mean", backend: str = "auto", check_finite: bool = True, mode: str = "gather",
         group: Any = None, grad_sync: str = "mean") -> torch.Tensor:
    """``ltcl_fused.afcl`` over the global batch; N (``normalize_by="batch"``) counts the GLOBAL columns.

    In ring mode a focal loss (γ > 0 or η > 0) makes a second ring sweep for the terms that need the final
    global log-sum-exp.
    """
    fn = "ltcl_fused.distributed.afcl"
    tau = V.check_positive(fn, "temperature", temperature)
    gamma = V.check_nonnegative(fn, "gamma", gamma)
    eta = V.check_nonnegative(fn, "eta", eta)
    V.check_choice(fn, "normalize_by", normalize_by, ("batch", "pairs"))
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    _check_common(fn, mode, grad_sync, backend, group)
    pb = _Problem(fn, features, labels, ref_features, ref_labels, contrast_mode, normalize, check_finite, group)
    P = pb.P
    eng = backends.resolve(backend, P.X.device, "rowstats", fn, dtype=P.X.dtype)
    focal = gamma > 0 or eta > 0
    st = _stats(eng, mode, P.A, P.C, pb.a_lab, pb.c_lab_glob, pb.col_sizes, pb.rank, 1.0 / tau, group,
                gamma=gamma, focal=focal)
    npos = match_counts(pb.a_lab, pb.c_lab_glob) - 1
    loss = afcl_from_stats(st, npos, pb.n_global, eta, normalize_by, focal)
    return _reduce(loss, reduction, pb.m_global, grad_sync, group)


def fcl(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, gamma: float = 1.0, **kw: Any) -> torch.Tensor:
    """Distributed focal contrastive loss: ``afcl`` with η = 0."""
    if "eta" in kw:
        raise TypeError("ltcl_fused.distributed.fcl: `eta` is fixed to 0 (use ltcl_fused.distributed.afcl)")
    return afcl(features, labels, gamma=gamma, eta=0.0, **kw)


def acl(features: torch.Tensor, labels: Optional[torch.Tensor] = None, *, eta: float = 1.0, **kw: Any) -> torch.Tensor:
    """Distributed asymmetric contrastive loss: ``afcl`` with γ = 0."""
    if "gamma" in kw:
        raise TypeError("ltcl_fused.distributed.acl: `gamma` is fixed to 0 (use ltcl_fused.distributed.afcl)")
    return afcl(features, labels, gamma=0.0, eta=eta, **kw)


def bcl(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *, temperature: float = 0.07,
        normalize: bool = False, reduction: str = "mean", backend: str = "auto", check_finite: bool = True,
        mode: str = "gather", group: Any = None, grad_sync: str = "mean") -> torch.Tensor:
    """``ltcl_fused.bcl`` over the global batch. ``prototypes`` (the same ``[C, D]`` on every rank, e.g. a
    replicated parameter) are columns once, not once per rank; class counts are global.

    Each rank's prototype gradient is its share (the contribution of its anchors, times the world size with
    ``grad_sync="mean"``): DDP's averaging, or a sum with ``grad_sync="sum"``, yields the exact gradient.
    """
    fn = "ltcl_fused.distributed.bcl"
    tau = V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    _check_common(fn, mode, grad_sync, backend, group)
    rank, W = world(group)
    dev = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    err = None
    try:
        V.check_features(fn, "features", features)
        V.check_features(fn, "prototypes", prototypes, ranks=(2,))
        V.check_same(fn, "prototypes", prototypes, features)
        X, B, Vw = flatten_views(features)
        V.check_labels(fn, "labels", labels, B, dev, f"one label per sample of `features` {V._shape(features)}")
        n_cls = prototypes.shape[0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
            raise ValueError(f"{fn}: `labels` must lie in [0, {n_cls}) (one prototype per class), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        V.check_finite(fn, "features", features, check_finite)
        V.check_finite(fn, "prototypes", prototypes, check_finite)
    except (TypeError, ValueError) as e:
        err = e
    meta = [0] * 4 if err else [X.shape[0], X.shape[1], n_cls, _DTYPES.index(X.dtype)]
    rows = _agree(fn, err, meta, dev, group)
    _consistent(fn, rows, 1, "the feature dimension D")
    _consistent(fn, rows, 2, "the number of prototypes")
    _consistent(fn, rows, 3, "the features' dtype")
    sizes = [r[0] for r in rows]
    if normalize:
        X, prototypes = F.normalize(X, dim=-1), F.normalize(prototypes, dim=-1)
    X = X.contiguous()
    lab = labels.to(torch.int64).repeat(Vw)
    lab_glob = all_gather_nograd(lab, sizes, group)
    p_lab = torch.arange(n_cls, device=dev)
    cnt = (torch.bincount(lab_glob, minlength=n_cls) + 1).to(torch.float64)  # V·n_c + 1 (its prototype)
    acc = acc_dtype(X.dtype)

    def biases(c_lab):
        return (-torch.log((cnt - 1).clamp(min=1)))[c_lab].to(acc), (-torch.log(cnt))[c_lab].to(acc)

    eng = backends.resolve(backend, dev, "rowstats", fn, dtype=X.dtype)
    inv_tau = 1.0 / tau
    if mode == "gather":
        C = torch.cat([all_gather_rows(X, sizes, group), prototypes], 0)
        c_lab = torch.cat([lab_glob, p_lab])
        bs, bo = biases(c_lab)
        st = row_stats(eng, X, C, lab, c_lab, self_offset=_offsets(sizes)[rank], inv_tau=inv_tau,
                       bias_same=bs, bias_other=bo)
        lse, pos_sum = st.lse, st.pos_sum
    else:  # the batch columns travel around the ring; every rank holds the prototypes, reduced locally
        bs, bo = biases(lab_glob)
        st = ring_row_stats(eng, X, X, lab, lab_glob, sizes, anchor_offset=0, inv_tau=inv_tau, bias_same=bs,
                            bias_other=bo, group=group)
        ps, po = biases(p_lab)
        sp = row_stats(eng, X, prototypes, lab, p_lab, self_offset=-1, inv_tau=inv_tau, bias_same=ps,
                       bias_other=po)
        lse, pos_sum = torch.logaddexp(st.lse, sp.lse), st.pos_sum + sp.pos_sum  # every row has its prototype
    npos = (cnt[lab] - 1).to(acc)  # every other column of the class, prototype included (>= 1)
    return _reduce(lse - pos_sum / npos, reduction, sum(sizes), grad_sync, group)


def _check_candidates(fn, lab, q_lab, k_pos, k_neg, allow_fewer):
    """Every anchor needs ``k_pos`` same-class and ``k_neg`` other-class keys unless ``allow_fewer``."""
    if allow_fewer or lab.numel() == 0:
        return
    same = match_counts(lab, q_lab)
    for name, k, cnt, kind in (("k_pos", k_pos, same, "same-class"), ("k_neg", k_neg, q_lab.numel() - same,
                                                                         "other-class")):
        if k and k > int(cnt.min()):
            i = int(cnt.argmin())
            raise ValueError(f"{fn}: `{name}`={k} but anchor (flattened row) {i} of this rank (class {int(lab[i])}) "
                             f"has only {int(cnt[i])} {kind} keys in `queue`; lower `{name}` or pass "
                             f"allow_fewer=True")


def rescom(features: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor, *,
           k_pos: int = 1, k_neg: int = 400, temperature: float = 0.2, class_weights: Optional[torch.Tensor] = None,
           reduction: str = "mean", backend: str = "auto", allow_fewer: bool = False, check_finite: bool = True,
           mode: str = "gather", group: Any = None, grad_sync: str = "mean") -> torch.Tensor:
    """ResCom's L_con over the global batch: this rank's anchors against every rank's batch columns plus
    their own mined keys of the class-balanced queue (the same queue on every rank: fill it with
    ``ltcl_fused.distributed.ClassBalancedQueue``, which enqueues the gathered features in rank order).

    "mean" is ``(1/2b_global) Σ_i w_{y_i} ℓ_i`` over all ranks' anchors.
    """
    fn = "ltcl_fused.distributed.rescom"
    tau = V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    _check_common(fn, mode, grad_sync, backend, group)
    from ..losses.rescom import hard_pair_mining  # the single-process streaming miner (all backends)
    rank, W = world(group)
    dev = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    err = None
    try:
        V.check_features(fn, "features", features)
        _check_keys(fn, "queue", queue, features, "features")  # may be empty: a queue that is filling up
        X, B, Vw = flatten_views(features)
        V.check_labels(fn, "labels", labels, B, dev, f"one label per sample of `features` {V._shape(features)}")
        V.check_labels(fn, "queue_labels", queue_labels, queue.shape[0], dev, "one per queue row")
        k_pos = V.check_int(fn, "k_pos", k_pos, 0)
        k_neg = V.check_int(fn, "k_neg", k_neg, 0)
        V.check_finite(fn, "features", features, check_finite)
        V.check_finite(fn, "queue", queue, check_finite)
        lab = labels.to(torch.int64).repeat(Vw)
        q_lab = queue_labels.to(torch.int64)
        w = check_class_weights(fn, class_weights, lab, dev)
        _check_candidates(fn, lab, q_lab, k_pos, k_neg, allow_fewer)
    except (TypeError, ValueError) as e:
        err = e
    meta = [0] * 3 if err else [X.shape[0], X.shape[1], _DTYPES.index(X.dtype)]
    rows = _agree(fn, err, meta, dev, group)
    _consistent(fn, rows, 1, "the feature dimension D")
    _consistent(fn, rows, 2, "the features' dtype")
    sizes = [r[0] for r in rows]
    X = X.contiguous()
    lab_glob = all_gather_nograd(lab, sizes, group)
    inv_tau = 1.0 / tau

    keys = queue.detach()
    pos_idx, neg_idx = hard_pair_mining(X.detach(), lab, keys, q_lab, k_pos=k_pos, k_neg=k_neg, backend=backend,
                                        allow_fewer=allow_fewer, check_finite=False)
    eng = backends.resolve(backend, dev, "rowstats", fn, dtype=X.dtype)
    st = _stats(eng, mode, X, X, lab, lab_glob, sizes, rank, inv_tau, group)
    loss = rescom_from_stats(st, match_counts(lab, lab_glob) - 1, sum(sizes) - 1, X, lab, keys, pos_idx, neg_idx,
                             inv_tau, w)
    return _reduce(loss, reduction, sum(sizes), grad_sync, group)
