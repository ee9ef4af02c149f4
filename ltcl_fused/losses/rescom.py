"""ResCom (SPEC.md section 4) on the fused backends: streaming hard-pair mining and the mined L_con.

``hard_pair_mining`` streams over the keys tile by tile with a per-row top-k state (never M × Q) on the
"torch", "triton" and "cpu" backends. ``rescom`` gets the batch block (self excluded) from the
row-statistics engine (``lse_batch``, ``pos_sum``) and the mined part from a small gathered
M × (k_pos + k_neg) block; the row's log-sum-exp is ``logaddexp(lse_batch, lse_mined)``, so autograd hands
the engine's backward the right ``g_lse``.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Tuple

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _validation as V
from .. import backends
from ..engine import acc_dtype, row_stats
from ._common import flatten_views, match_counts, reduce, reference_output

# ---------------------------------------------------------------------------------------------------------------
# mining backends (contract: ltcl_fused/backends/mining_torch.py)
# ---------------------------------------------------------------------------------------------------------------


def _torch_mine(A, a_lab, K, k_lab, k_pos, k_neg):
    from ..backends import mining_torch
    return mining_torch.mine(A, a_lab, K, k_lab, k_pos, k_neg)


def _triton_module():
    """``ltcl_fused.triton_kernels.topk_mining`` (installed, or the source folder loaded by the Triton engine)."""
    import importlib
    from ..backends.triton_engine import _load_kernels
    _load_kernels()  # makes ltcl_fused.triton_kernels importable from a source checkout
    return importlib.import_module("ltcl_fused.triton_kernels.topk_mining")


def _triton_mine(A, a_lab, K, k_lab, k_pos, k_neg):
    return _triton_module().topk_mining(A, a_lab, K, k_lab, k_pos, k_neg)


def _triton_reason(device):
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"Triton does not import ({type(e).__name__}: {e})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"


def _cpu_op():
    """The C++ mining op ``torch.ops.ltcl_fused.topk_mining`` (building the extension if needed) or a reason."""
    try:
        from .. import ext
    except ImportError:
        return None, "the C++ extension loader ltcl_fused.ext is not available"
    try:
        ext.load()
        return torch.ops.ltcl_fused.topk_mining, None
    except Exception as e:  # noqa: BLE001 - the reason is reported, never hidden
        return None, f"the C++ extension has no mining op ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _cpu_mine(A, a_lab, K, k_lab, k_pos, k_neg):
    op, reason = _cpu_op()
    if op is None:
        raise backends.BackendUnavailable(reason)
    return op(A.contiguous(), a_lab.contiguous(), K.contiguous(), k_lab.contiguous(), k_pos, k_neg)


def _cpu_reason(device):
    if device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got device {device}"
    return _cpu_op()[1]


_MINERS = {"torch": (_torch_mine, lambda device: None), "triton": (_triton_mine, _triton_reason),
           "cpu": (_cpu_mine, _cpu_reason)}
_warned = set()


def _impl(name: str):
    """The mining function of backend ``name`` (an engine's own ``mine`` first, then the built-in table)."""
    eng = backends.get_engine(name)
    if "mining" in eng.ops and hasattr(eng, "mine"):
        return eng.mine
    return _MINERS[name][0]


def resolve_mining(backend: str, device: torch.device, fn: str, dtype=None):
    """The mining function for ``backend`` on ``device`` (for inputs of ``dtype``, when given: an engine whose
    ``dtype_reason("mining", dtype)`` refuses it counts as unavailable); None means the dense reference.

    An engine that lists ``"mining"`` in its ``ops`` and has a ``mine`` method (same contract) takes
    precedence over the built-in table, so the engines can take the op over without changes here.
    """
    name = _resolve_mining_name(backend, device, fn, dtype)
    return None if name is None else _impl(name)


def _mining_name(backend: str, device_type: str, device_index, fn: str, dtype=None):
    # Runs eagerly even under torch.compile (the choice is a constant of the compiled graph), like
    # backends._resolve_name; the C++ extension is built or loaded here, never while tracing.
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return _resolve_mining_name(backend, device, fn, dtype)


_mining_name._dynamo_marked_constant = True


def _resolve_mining_name(backend: str, device: torch.device, fn: str, dtype=None):
    backends.check_backend_name(backend, fn)
    if backend == "reference":
        return None
    names = [backend] if backend != "auto" else list(backends.auto_order(device))
    for name in names:
        eng = backends.get_engine(name)
        if "mining" in eng.ops and hasattr(eng, "mine"):
            reason = eng.unavailable_reason(device)
        elif name in _MINERS:
            reason = eng.unavailable_reason(device) or _MINERS[name][1](device)
        else:
            if backend != "auto":
                raise NotImplementedError(f"{fn}: backend {name!r} does not implement hard-pair mining yet; "
                                          f"use backend='torch', 'triton', 'cpu' or 'auto'")
            continue
        if reason is None and dtype is not None and hasattr(eng, "dtype_reason"):
            reason = eng.dtype_reason("mining", dtype)
        if reason is None:
            return name
        if backend != "auto":
            raise backends.BackendUnavailable(f"{fn}: backend {name!r} is unavailable: {reason}")
        if (name, reason) not in _warned:
            _warned.add((name, reason))
            warnings.warn(f"ltcl_fused: backend {name!r} unavailable for mining ({reason}); falling back",
                          RuntimeWarning, stacklevel=4)
    raise backends.BackendUnavailable(f"{fn}: no backend can run hard-pair mining on device {device}")


@torch.library.custom_op("ltcl_fused::mine", mutates_args=())
def _mine_op(A: torch.Tensor, a_lab: torch.Tensor, K: torch.Tensor, k_lab: torch.Tensor, k_pos: int, k_neg: int,
             backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mining on backend ``backend`` as one opaque op: torch.compile never traces the miners' host code
    (the C++ op, the Triton launcher, the streaming PyTorch loop); the indices carry no gradient."""
    pos_idx, neg_idx = _impl(backend)(A, a_lab, K, k_lab, k_pos, k_neg)
    return pos_idx.to(torch.int64).contiguous(), neg_idx.to(torch.int64).contiguous()


@_mine_op.register_fake
def _mine_fake(A, a_lab, K, k_lab, k_pos, k_neg, backend):
    M = A.shape[0]
    return A.new_empty((M, k_pos), dtype=torch.int64), A.new_empty((M, k_neg), dtype=torch.int64)


def _mine(backend_name, A, a_lab, K, k_lab, k_pos, k_neg):
    if backend_name == "torch":  # plain PyTorch without host syncs: torch.compile traces it as it is
        return _torch_mine(A.detach(), a_lab, K.detach(), k_lab, int(k_pos), int(k_neg))
    return _mine_op(A.detach(), a_lab, K.detach(), k_lab, int(k_pos), int(k_neg), backend_name)


# ---------------------------------------------------------------------------------------------------------------
# validation shared by both entry points
# ---------------------------------------------------------------------------------------------------------------


def _check_keys(fn, name, keys, ref, ref_name):
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{fn}: `{name}` must be a floating tensor, got {keys.dtype}")
    if keys.dim() != 2:
        raise ValueError(f"{fn}: `{name}` must be [Q, D], got shape {V._shape(keys)}")
    V.check_same(fn, name, keys, ref, ref_name)


def rescom_from_stats(st, n_batch_pos, n_batch_cols, X, lab, keys, pos_idx, neg_idx, inv_tau, w):
    """Per-anchor (weighted) ResCom ℓ_i from the batch block's row statistics plus the mined keys.

    The mined block is M × (k_pos + k_neg) gathered similarities (autograd to the anchors only); its
    log-sum-exp joins the batch block's with ``logaddexp``, so the engine's backward receives the right
    g_lse. ``n_batch_pos`` = same-class batch columns but self, ``n_batch_cols`` = batch columns but self.
    """
    acc = acc_dtype(X.dtype)
    Xa, Ka = X.to(acc), keys.to(acc)
    s_pos = _GatheredSim.apply(Xa, Ka, pos_idx, inv_tau)
    s_neg = _GatheredSim.apply(Xa, Ka, neg_idx, inv_tau)
    mined = torch.cat([s_pos, s_neg], dim=1)
    mined_valid = torch.cat([pos_idx, neg_idx], dim=1) >= 0
    pos_valid = pos_idx >= 0
    lse_mined = _masked_lse(mined, mined_valid)
    has_mined = mined_valid.any(dim=1)
    row_empty = ~has_mined if n_batch_cols == 0 else torch.zeros_like(has_mined)
    zero = torch.zeros_like(st.lse)
    # logaddexp(-inf, -inf) has a NaN gradient: a row with no column at all gets dummy zeros (its loss is 0)
    lse = torch.logaddexp(torch.where(row_empty, zero, st.lse), torch.where(row_empty, zero, lse_mined))
    npos = n_batch_pos.to(acc) + pos_valid.sum(dim=1).to(acc)
    pos_sum = st.pos_sum + torch.where(pos_valid, s_pos, torch.zeros_like(s_pos)).sum(dim=1)
    loss = torch.where(npos > 0, lse - pos_sum / npos.clamp(min=1), zero)
    return loss if w is None else w.to(acc)[lab.clamp(0, w.shape[0] - 1)] * loss  # (range checked by the caller)


def check_class_weights(fn, class_weights, lab, dev, checks: Optional[V.ValueChecks] = None):
    """``class_weights`` as a 1-D float tensor [C] on ``dev`` covering every label, finite and >= 0, or None.

    The value conditions are registered on ``checks`` (run by the caller); without it they are run here."""
    if class_weights is None:
        return None
    w = torch.as_tensor(class_weights, device=dev)
    if w.dim() != 1 or not w.dtype.is_floating_point or w.numel() == 0:
        raise ValueError(f"{fn}: `class_weights` must be a non-empty 1-D float tensor [C], got {w.dtype} {V._shape(w)}")
    chk = V.ValueChecks(fn, True) if checks is None else checks
    n = w.shape[0]
    w_lo, w_hi = torch.aminmax(w.detach())
    chk.require(torch.isfinite(w_lo) & torch.isfinite(w_hi), "`class_weights` contains NaN or Inf")
    chk.require(w_lo >= 0, "`class_weights` must be >= 0 (a negative weight flips the sign of a class's loss)",
                lambda: f", got a minimum of {float(w.min())}")
    if lab.numel():
        lo, hi = torch.aminmax(lab)
        chk.require((lo >= 0) & (hi < n), f"`class_weights` has {n} entries, so `labels` must lie in [0, {n})",
                    lambda: f", got values in [{int(lab.min())}, {int(lab.max())}]")
    if checks is None:
        chk.run()
    return w


def _candidates(fn, a_lab, k_lab, k_pos, k_neg, allow_fewer, checks: V.ValueChecks, what="anchor", note=""):
    """Register on ``checks``: every row has at least ``k_pos`` same-class and ``k_neg`` other-class keys
    (skipped with ``allow_fewer``). Fails naming k_pos / k_neg."""
    if allow_fewer or a_lab.numel() == 0 or (k_pos == 0 and k_neg == 0):
        return
    same = match_counts(a_lab, k_lab)
    for name, k, cnt, kind in (("k_pos", k_pos, same, "same-class"),
                               ("k_neg", k_neg, k_lab.numel() - same, "other-class")):
        if not k:
            continue

        def detail(cnt=cnt, kind=kind):
            i = int(cnt.argmin())
            return f": {what} {i} (class {int(a_lab[i])}) has only {int(cnt[i])} {kind} keys"
        chk_msg = (f"`{name}`={k} is more than some {what} has {kind} keys; lower `{name}` or pass "
                   f"allow_fewer=True (missing slots become -1){note}")
        checks.require(cnt.min() >= k, chk_msg, detail)


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def hard_pair_mining(anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                     *, k_pos: int, k_neg: int, backend: str = "auto", allow_fewer: bool = False,
                     check_finite: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per anchor, the ``k_pos`` least similar same-class keys and the ``k_neg`` most similar other-class keys.

    Similarity is ``anchors @ keys.T`` (accumulated in float32, float64 for float64 inputs), streamed over
    tiles of keys: memory O(M · (k + tile)), never M × Q. Returns int64 ``(pos_idx [M, k_pos],
    neg_idx [M, k_neg])`` indices into ``keys``; positives are in ascending, negatives in descending order of
    similarity. Ties are broken arbitrarily (compare the selected similarities, not indices).

    If some anchor has fewer than ``k_pos`` same-class (``k_neg`` other-class) keys, a ValueError names the
    argument; with ``allow_fewer=True`` every candidate is returned and the missing trailing slots are -1.
    The selection is not differentiable. The candidate-count and finiteness checks cost one host read;
    with ``check_finite=False`` none, and a row short of candidates gets -1 slots as with ``allow_fewer``.
    """
    fn = "ltcl_fused.hard_pair_mining"
    V.check_features(fn, "anchors", anchors, ranks=(2,))
    _check_keys(fn, "keys", keys, anchors, "anchors")
    V.check_labels(fn, "anchor_labels", anchor_labels, anchors.shape[0], anchors.device, "one per anchor")
    V.check_labels(fn, "key_labels", key_labels, keys.shape[0], anchors.device, "one per key")
    k_pos = V.check_int(fn, "k_pos", k_pos, 0)
    k_neg = V.check_int(fn, "k_neg", k_neg, 0)
    V.check_bool(fn, "allow_fewer", allow_fewer)
    backends.check_backend_name(backend, fn)
    chk = V.ValueChecks(fn, check_finite)
    chk.finite("anchors", anchors)
    chk.finite("keys", keys)
    a_lab, k_lab = anchor_labels.to(torch.int64), key_labels.to(torch.int64)
    reference = backend == "reference"
    _candidates(fn, a_lab, k_lab, k_pos, k_neg, allow_fewer and not reference, chk,
                note=" (backend='reference' cannot pad)" if reference and allow_fewer else "")
    chk.run()
    name = _mining_name(backend, anchors.device.type, anchors.device.index, fn, anchors.dtype)
    if name is None:
        from .. import reference as R
        return R.hard_pair_mining(anchors, a_lab, keys, k_lab, k_pos=k_pos, k_neg=k_neg)
    return _mine(name, anchors, a_lab, keys, k_lab, k_pos, k_neg)


class _GatheredSim(torch.autograd.Function):
    """``s_ij = inv_tau · A_i · K[idx_ij]`` (−inf where ``idx_ij < 0``); gradient to A only (K is detached).

    Forward gathers keys in row chunks (memory O(chunk · k · D)); backward is an embedding-bag sum
    ``dA_i = inv_tau Σ_j g_ij K[idx_ij]`` (memory O(M · D)).
    """

    @staticmethod
    def forward(ctx, A, K, idx, inv_tau):
        M, k = idx.shape
        valid = idx >= 0
        safe = idx.clamp(min=0)
        out = torch.full((M, k), -math.inf, dtype=A.dtype, device=A.device)
        if k and K.shape[0]:
            rows = max(1, (1 << 22) // max(1, k * A.shape[1]))
            for r0 in range(0, M, rows):
                r1 = min(M, r0 + rows)
                s = torch.einsum("md,mkd->mk", A[r0:r1], K[safe[r0:r1]]) * inv_tau
                out[r0:r1] = s.masked_fill(~valid[r0:r1], -math.inf)
        ctx.save_for_backward(K, safe, valid)
        ctx.inv_tau = inv_tau
        return out

    @staticmethod
    def backward(ctx, g):
        K, safe, valid = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g = torch.where(valid, g, torch.zeros_like(g))
        if safe.shape[1] == 0 or K.shape[0] == 0:
            return torch.zeros(safe.shape[0], K.shape[1], dtype=g.dtype, device=g.device), None, None, None
        dA = F.embedding_bag(safe, K, per_sample_weights=g.to(K.dtype).contiguous(), mode="sum") * ctx.inv_tau
        return dA, None, None, None


def _masked_lse(x, valid):
    """Row log-sum-exp over ``valid`` entries; −inf (with zero gradient) for a row without any."""
    empty = ~valid.any(dim=1, keepdim=True)
    x = x.masked_fill(~valid, -math.inf).masked_fill(empty, 0.0)
    return torch.logsumexp(x, dim=1).masked_fill(empty.squeeze(1), -math.inf)


def rescom(features: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor, *,
           k_pos: int = 1, k_neg: int = 400, temperature: float = 0.2, class_weights: Optional[torch.Tensor] = None,
           reduction: str = "mean", backend: str = "auto", allow_fewer: bool = False,
           check_finite: bool = True) -> torch.Tensor:
    """ResCom's contrastive loss L_con (SPEC.md section 4) with streaming mining and the fused batch block.

    ``features`` ``[2b, D]`` with ``labels [2b]``, or ``[b, V, D]`` with ``labels [b]`` (flattened
    view-major); ``queue [Q, D]`` / ``queue_labels [Q]`` are the class-balanced queue's keys (detached here).
    Row i: ``[batch columns except self | k_pos mined positives | k_neg mined negatives] / τ``, log-softmax
    over the whole row, ``ℓ_i = −(1/|P(i)|) Σ_{P(i)} log softmax`` with P(i) = same-class batch columns and
    the mined positives (0 if empty). ``class_weights [C]`` (e.g. ``effective_number_weights``) scale ℓ_i by
    ``w_{y_i}``; "mean" is ``(1/2b) Σ_i w_{y_i} ℓ_i`` (not divided by Σw), "sum" the sum, "none" the values.
    ``allow_fewer=True``: an anchor whose class has fewer than ``k_pos`` keys (or fewer than ``k_neg``
    other-class keys) uses all it has (e.g. while the queue fills up); otherwise that raises ValueError.
    Gradients flow to ``features`` (anchors and batch columns); the queue gets none. The loss is float32
    (float64 for float64 features). ``class_weights`` must be finite and >= 0 and cover every label. All
    value checks (finiteness, weights, candidates) cost one host read; with ``check_finite=False`` none, and
    a failed weight or candidate condition makes the loss NaN (docs/bad_inputs.md).
    """
    fn = "ltcl_fused.rescom"
    tau = V.check_positive(fn, "temperature", temperature)
    V.check_choice(fn, "reduction", reduction, V.REDUCTIONS)
    backends.check_backend_name(backend, fn)
    V.check_features(fn, "features", features)
    _check_keys(fn, "queue", queue, features, "features")
    X, B, Vw = flatten_views(features)
    dev = features.device
    V.check_labels(fn, "labels", labels, B, dev, f"one label per sample of `features` {V._shape(features)}")
    V.check_labels(fn, "queue_labels", queue_labels, queue.shape[0], dev, "one per queue row")
    k_pos = V.check_int(fn, "k_pos", k_pos, 0)
    k_neg = V.check_int(fn, "k_neg", k_neg, 0)
    V.check_bool(fn, "allow_fewer", allow_fewer)
    chk = V.ValueChecks(fn, check_finite)
    chk.finite("features", features)
    chk.finite("queue", queue)
    lab = labels.to(torch.int64).repeat(Vw)
    q_lab = queue_labels.to(torch.int64)
    w = check_class_weights(fn, class_weights, lab, dev, chk)
    reference = backend == "reference"
    _candidates(fn, lab, q_lab, k_pos, k_neg, allow_fewer and not reference, chk, what="anchor (flattened row)",
                note=" (backend='reference' cannot pad)" if reference and allow_fewer else "")
    chk.run()  # the one host read (none with check_finite=False: a failed condition then makes the loss NaN)
    if reference:
        from .. import reference as R
        y = labels if w is None else labels.clamp(0, w.shape[0] - 1)  # in range unless the loss is poisoned
        return chk.poison(reference_output(R.rescom(features, y, queue, queue_labels, k_pos=k_pos, k_neg=k_neg,
                                                    temperature=tau, class_weights=w, reduction=reduction),
                                           features))

    miner = _mining_name(backend, dev.type, dev.index, fn, X.dtype)
    eng = backends.resolve(backend, dev, "rowstats", fn, dtype=X.dtype)
    keys = queue.detach()
    pos_idx, neg_idx = _mine(miner, X, lab, keys, q_lab, k_pos, k_neg)

    inv_tau = 1.0 / tau
    # batch block: every other batch column, positives = same class (self excluded), through the engine
    st = row_stats(eng, X, X, lab, lab, self_offset=0, inv_tau=inv_tau, fn=fn)
    loss = rescom_from_stats(st, match_counts(lab, lab) - 1, X.shape[0] - 1, X, lab, keys, pos_idx, neg_idx,
                             inv_tau, w)
    return chk.poison(reduce(loss, reduction))
