"""DCL, HCL, the Bayesian contrastive loss and MTTV over torch.distributed, exact in value and gradient.

Global batch and ordering (the single-process loss of the concatenated batch):
* ``dcl`` / ``hcl`` / ``bayesian_cl(z1, z2)``: rank r passes its ``B_r`` pairs. The global views are
  ``z1 = cat_r z1_r``, ``z2 = cat_r z2_r`` (rank order), i.e. the single-process call on those; its 2B
  anchors are ``[z1; z2]``. Rank r computes the rows of its own anchors ``[z1_r; z2_r]`` (global anchors
  ``off_r + b`` and ``B + off_r + b``, ``off_r = Σ_{q<r} B_q``) against every rank's columns; every
  negative on every rank counts (``M = 2B − 2`` global) and the Bayesian weights rank each pair among
  ALL of its row's M negatives. ``reduction="none"`` returns this rank's ``2B_r`` values in the order
  ``[z1_r; z2_r]``.
* ``mttv(embeddings)``: rank r passes its interleaved pairs ``[2P_r, D]``; the global embeddings are their
  concatenation in rank order (pairs stay interleaved). ``L = −log((1/2P) Σ_i r_i)`` needs the global sum
  of the ratios: one all-reduce. ``reduction="none"`` returns this rank's ratios r [2P_r].

Reduction and gradients follow ``ltcl_fused.distributed`` (see ``losses.py``): "mean"/"sum" give the
global value on every rank; backward gives this rank's share (``grad_sync="mean"``: times the world size,
what DDP averages; ``"sum"``: the shares sum to the gradient). ``mode="gather"`` all-gathers the columns
(differentiably) and runs the single-process engine; ``mode="ring"`` passes column blocks around the ring
(``ssl_ring.py``; what it holds per rank is described there and in docs/distributed_ssl.md).

Input agreement: every rank validates its own inputs and the ranks then exchange, in one all-gather,
whether they succeeded, their sizes, D, dtype and every hyperparameter (bit pattern), the mode and the
reduction: a bad input on one rank raises there and a RuntimeError on every other rank (none hangs), and
arguments that differ between ranks raise a ValueError on every rank.
"""
from __future__ import annotations

import struct

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _validation as V
from .. import backends
from ..engine.ssl_contract import ssl_row_stats
from ..losses import ssl as S
from . import ssl_ring
from .gather import all_gather_rows, world
from .losses import GRAD_SYNCS, MODES, _DTYPES, _agree, _consistent, _offsets, _reduce

__all__ = ["dcl", "hcl", "bayesian_cl", "mttv"]


def _bits(v) -> int:
    """A hyperparameter as an int64 (its float64 bit pattern), for the agreement all-gather."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _validate(fn, mode, grad_sync, backend, body):
    """Run this rank's checks (the common arguments, then ``body()``); return (error or None, body's result)."""
    try:
        V.check_choice(fn, "mode", mode, MODES)
        V.check_choice(fn, "grad_sync", grad_sync, GRAD_SYNCS)
        backends.check_backend_name(backend, fn)
        if backend == "reference":
            raise ValueError(f"{fn}: `backend`='reference' is the dense single-process oracle and has no "
                             f"distributed form; use 'auto' or a fused backend (or the plain loss on gathered "
                             f"features)")
        return None, body()
    except (TypeError, ValueError) as e:
        return e, None


def _agree_all(fn, err, rows_local, D, dtype, mode, reduction, grad_sync, params, dev, group):
    """One all-gather: [rows, D, dtype, mode, reduction, grad_sync, rank budget, *params]; checks agreement."""
    if err is not None and not (dist.is_available() and dist.is_initialized()):
        raise err  # nothing to agree with: report the input error itself
    names = ["the feature dimension D", "the features' dtype", "`mode`", "`reduction`", "`grad_sync`",
             "LTCL_RING_RANK_ELEMENTS"] + [f"`{k}`" for k in params]
    meta = [0] * (len(names) + 1)
    if err is None:
        meta = [rows_local, D, _DTYPES.index(dtype), MODES.index(mode), V.REDUCTIONS.index(reduction),
                GRAD_SYNCS.index(grad_sync), ssl_ring.RANK_BUDGET_ELEMENTS] + [_bits(v) for v in params.values()]
    rows = _agree(fn, err, meta, dev, group)
    for idx, what in enumerate(names, start=1):
        _consistent(fn, rows, idx, what)
    return [r[0] for r in rows]


def _row_stats(fn, eng_op, backend, mode, X, partner, sizes, inv_tau, cfg, group):
    """SSL row statistics of this rank's rows X (its own column block) against every rank's columns."""
    rank, W = world(group)
    eng = backends.resolve(backend, X.device, eng_op, fn)
    if mode == "gather" or W == 1:
        C = all_gather_rows(X, sizes, group)
        return ssl_row_stats(eng, X, C, partner, self_offset=_offsets(sizes)[rank], inv_tau=inv_tau, cfg=cfg)
    return ssl_ring.ring_ssl_row_stats(eng, X, X, partner, sizes, sizes, anchor_offset=0, inv_tau=inv_tau,
                                       cfg=cfg, group=group)


def _two_view_problem(fn, z1, z2, check_finite, check_args, mode, reduction, grad_sync, backend, group, params):
    """Validate on this rank, agree with the others; the local rows [z1; z2], their global partners, sizes."""
    dev = z1.device if isinstance(z1, torch.Tensor) else torch.device("cpu")

    def body():
        S._two_views(fn, z1, z2, check_finite)
        return check_args()

    err, checked = _validate(fn, mode, grad_sync, backend, body)
    ok = err is None
    sizes = _agree_all(fn, err, 2 * z1.shape[0] if ok else 0, z1.shape[1] if ok else 0,
                       z1.dtype if ok else torch.float32, mode, reduction, grad_sync, params, dev, group)
    rank, _ = world(group)
    X = torch.cat([z1, z2], 0)
    n = X.shape[0]
    B = n // 2
    i = torch.arange(n, device=dev)
    partner = _offsets(sizes)[rank] + (i + B) % n
    return checked, X, partner, sizes


def dcl(z1, z2, *, temperature=0.5, tau_plus=0.1, debiased=True, reduction="mean", backend="auto",
        check_finite=True, mode="gather", group=None, grad_sync="mean"):
    """``ltcl_fused.dcl`` over the global batch of all ranks of ``group`` (see the module docstring)."""
    fn = "ltcl_fused.distributed.dcl"
    params = dict(temperature=temperature, tau_plus=tau_plus, debiased=debiased)
    (t, tau_plus), X, partner, sizes = _two_view_problem(
        fn, z1, z2, check_finite, lambda: S.check_dcl_args(fn, temperature, tau_plus, debiased, reduction), mode,
        reduction, grad_sync, backend, group, params)
    st = _row_stats(fn, "ssl", backend, mode, X, partner, sizes, 1.0 / t, S.dcl_config(), group)
    loss = S.dcl_from_stats(st, sum(sizes) - 2, tau_plus, t, debiased, "none")
    return _reduce(loss, reduction, sum(sizes), grad_sync, group)


def hcl(z1, z2, *, temperature=0.5, tau_plus=0.1, beta=1.0, reduction="mean", backend="auto", check_finite=True,
        mode="gather", group=None, grad_sync="mean"):
    """``ltcl_fused.hcl`` over the global batch of all ranks of ``group`` (see the module docstring)."""
    fn = "ltcl_fused.distributed.hcl"
    params = dict(temperature=temperature, tau_plus=tau_plus, beta=beta)
    (t, tau_plus, beta), X, partner, sizes = _two_view_problem(
        fn, z1, z2, check_finite, lambda: S.check_hcl_args(fn, temperature, tau_plus, beta, reduction), mode,
        reduction, grad_sync, backend, group, params)
    st = _row_stats(fn, "ssl", backend, mode, X, partner, sizes, 1.0 / t, S.hcl_config(beta), group)
    loss = S.hcl_from_stats(st, sum(sizes) - 2, tau_plus, t, "none")
    return _reduce(loss, reduction, sum(sizes), grad_sync, group)


def bayesian_cl(z1, z2, *, alpha=0.5, beta=1.0, tau_plus=0.1, temperature=0.5, reduction="mean", backend="auto",
                check_finite=True, mode="gather", group=None, grad_sync="mean"):
    """``ltcl_fused.bayesian_cl`` over the global batch: the exact empirical CDF of every pair among ALL of
    its row's negatives on every rank (ring mode: see ``ssl_ring.py`` for the rank sweeps)."""
    fn = "ltcl_fused.distributed.bayesian_cl"
    params = dict(alpha=alpha, beta=beta, tau_plus=tau_plus, temperature=temperature)
    (alpha, beta, tau_plus, t), X, partner, sizes = _two_view_problem(
        fn, z1, z2, check_finite, lambda: S.check_bayes_args(fn, alpha, beta, tau_plus, temperature, reduction),
        mode, reduction, grad_sync, backend, group, params)
    _, W = world(group)
    op = "ssl_ranked" if mode == "ring" and W > 1 else "ssl"
    st = _row_stats(fn, op, backend, mode, X, partner, sizes, 1.0 / t, S.bayes_config(alpha, beta, tau_plus), group)
    return _reduce(S.bayes_from_stats(st, "none"), reduction, sum(sizes), grad_sync, group)


class _GlobalNegLogMean(torch.autograd.Function):
    """Value ``−log(Σ_ranks local_sum / n)`` on every rank (one all-reduce); backward: this rank's share
    ``−k/Σ`` of the gradient (k = world size for grad_sync="mean", else 1)."""

    @staticmethod
    def forward(ctx, local_sum, n, k, group):
        tot = local_sum.detach().clone()
        dist.all_reduce(tot, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(tot)
        ctx.k = k
        return -torch.log(tot / n)

    @staticmethod
    def backward(ctx, g):
        (tot,) = ctx.saved_tensors
        return -g * ctx.k / tot, None, None, None


def mttv(embeddings, *, lower=0.1, upper=0.9, temperature=0.3, filter="both", official_self_term=False,
         reduction="mean", backend="auto", check_finite=True, mode="gather", group=None, grad_sync="mean"):
    """``ltcl_fused.mttv`` over the global batch: this rank's interleaved pairs against every rank's rows;
    ``L = −log((1/2P) Σ_i r_i)`` with the sum over all ranks (one all-reduce). See the module docstring."""
    fn = "ltcl_fused.distributed.mttv"
    dev = embeddings.device if isinstance(embeddings, torch.Tensor) else torch.device("cpu")
    params = dict(lower=lower, upper=upper, temperature=temperature, filter=("both", "low").index(filter)
                  if filter in ("both", "low") else -1, official_self_term=official_self_term)

    def body():
        S.check_mttv_embeddings(fn, embeddings, check_finite)
        return S.check_mttv_args(fn, lower, upper, temperature, filter, official_self_term, reduction)

    err, checked = _validate(fn, mode, grad_sync, backend, body)
    ok = err is None
    sizes = _agree_all(fn, err, embeddings.shape[0] if ok else 0, embeddings.shape[1] if ok else 0,
                       embeddings.dtype if ok else torch.float32, mode, reduction, grad_sync, params, dev, group)
    rank, W = world(group)
    lower, upper, t = checked
    Z = F.normalize(embeddings, dim=1)
    partner = _offsets(sizes)[rank] + (torch.arange(Z.shape[0], device=dev) ^ 1)
    cfg = S.mttv_config(lower, upper, filter, official_self_term)
    st = _row_stats(fn, "ssl", backend, mode, Z, partner, sizes, 1.0 / t, cfg, group)
    r = S.mttv_ratios(st, t, official_self_term)
    if reduction == "none":
        return r
    k = float(W) if grad_sync == "mean" else 1.0
    return _GlobalNegLogMean.apply(r.sum(), float(sum(sizes)), k, group)
