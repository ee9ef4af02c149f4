"""Fused ResCom L_con (SPEC.md section 4) against ltcl_fused.reference.rescom: loss and gradients.

The fused path = engine row statistics for the batch block + streaming mining + a gathered mined block.
Every backend that can run both parts here is tested; the reference is the dense oracle.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused import reference as R
from ltcl_fused.losses.rescom import resolve_mining

from _truth import check


def _runs(backend):
    dev = torch.device("cpu")
    try:
        resolve_mining(backend, dev, "test")
        lf.backends.resolve(backend, dev, "rowstats", "test")
        return True
    except (lf.BackendUnavailable, NotImplementedError):
        return False


BACKENDS = [pytest.param(b, marks=[] if _runs(b) else [pytest.mark.skip(reason=f"{b!r} cannot run rescom here")])
            for b in ("torch", "triton", "cpu")]


def _problem(b, C, K, D, dtype, seed=0, views=True):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 2, D) if views else (b, D)
    f = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    y = torch.randint(0, C, (b,), generator=g)
    q = F.normalize(torch.randn(C * K, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    ql = torch.arange(C).repeat_interleave(K)
    w = R.effective_number_weights(torch.randint(1, 50, (C,), generator=g), 0.99).to(dtype)
    return f.requires_grad_(), y, q, ql, w


def _both(f, y, q, ql, backend, **kw):
    out = lf.rescom(f, y, q, ql, backend=backend, **kw)
    ref = R.rescom(f, y, q, ql, **kw)
    return out, ref


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10)}  # fp32: tests/_truth.py


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,C,K,D,k_pos,k_neg,views", [
    (6, 3, 4, 5, 1, 3, True),
    (9, 5, 10, 17, 1, 40, True),          # CIFAR-like K=10, k_pos=1
    (13, 4, 120, 8, 100, 300, False),     # k in the hundreds, [N, D] input
])
def test_loss_and_grad_match_reference(backend, dtype, b, C, K, D, k_pos, k_neg, views):
    if backend == "triton" and k_neg > 100 and dtype == torch.float32:
        pytest.skip("interpreter time: the large Triton case runs in float64 only")
    f, y, q, ql, w = _problem(b, C, K, D, dtype, seed=b + K)
    for reduction in ("mean", "none"):
        if dtype != torch.float64:  # against the fp64 truth (tests/_truth.py); the queue gets no gradient
            kw = dict(k_pos=k_pos, k_neg=k_neg, temperature=0.2, reduction=reduction)
            check(lambda f, q, w: lf.rescom(f, y, q, ql, backend=backend, class_weights=w, **kw),
                  lambda f, q, w: R.rescom(f, y, q, ql, class_weights=w, **kw), [f.detach(), q, w], grad=[0],
                  what=reduction)
            continue
        kw = dict(k_pos=k_pos, k_neg=k_neg, temperature=0.2, class_weights=w, reduction=reduction)
        out, ref = _both(f, y, q, ql, backend, **kw)
        torch.testing.assert_close(out, ref.to(out.dtype), **TOL[dtype])
        gw = torch.rand(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        g1, = torch.autograd.grad((out * gw).sum(), f)
        g2, = torch.autograd.grad((ref * gw.to(ref.dtype)).sum(), f)
        torch.testing.assert_close(g1, g2, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_no_weights_and_cifar_temperature(backend):
    f, y, q, ql, _ = _problem(8, 3, 6, 4, torch.float64, seed=3)
    out, ref = _both(f, y, q, ql, backend, k_pos=2, k_neg=7, temperature=0.07, reduction="sum")
    torch.testing.assert_close(out, ref)


def test_gradcheck_torch_backend():
    f, y, q, ql, w = _problem(4, 2, 3, 3, torch.float64, seed=4)
    torch.autograd.gradcheck(lambda x: lf.rescom(x, y, q, ql, k_pos=2, k_neg=3, class_weights=w, backend="torch"),
                             (f,), eps=1e-6, atol=1e-7)


def test_queue_gets_no_gradient_and_is_not_modified():
    f, y, q, ql, w = _problem(5, 3, 4, 6, torch.float64)
    q = q.clone().requires_grad_()
    before = q.detach().clone()
    lf.rescom(f, y, q, ql, k_pos=1, k_neg=5, backend="torch").backward()
    assert q.grad is None and f.grad is not None
    assert torch.equal(q.detach(), before)


def test_single_anchor_and_empty_mining():
    """M = 1 (no batch column): the row is the mined keys only; k = 0 everywhere gives 0 loss, finite grad."""
    g = torch.Generator().manual_seed(5)
    f = F.normalize(torch.randn(1, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    y = torch.tensor([1])
    q = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=-1)
    ql = torch.tensor([0, 1, 2] * 3)
    out, ref = _both(f, y, q, ql, "torch", k_pos=2, k_neg=3)
    torch.testing.assert_close(out, ref)
    zero = lf.rescom(f, y, q, ql, k_pos=0, k_neg=0, backend="torch")
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.isfinite(f.grad).all()


def _dense_allow_fewer(f, y, q, ql, k_pos, k_neg, tau, w):
    """Independent dense check of allow_fewer: take min(k, #candidates) mined keys per anchor."""
    X = f.reshape(-1, f.shape[-1]) if f.dim() == 2 else f.transpose(0, 1).reshape(-1, f.shape[-1])
    lab = y.repeat(X.shape[0] // y.shape[0])
    losses = []
    for i in range(X.shape[0]):
        sim_q = (q @ X[i]).detach()
        same = ql == lab[i]
        pos_keys = torch.nonzero(same).flatten()[sim_q[same].argsort()[:k_pos]]
        neg_keys = torch.nonzero(~same).flatten()[sim_q[~same].argsort(descending=True)[:k_neg]]
        others = torch.tensor([j for j in range(X.shape[0]) if j != i], dtype=torch.long)
        logits = torch.cat([X[others] @ X[i], q[pos_keys] @ X[i], q[neg_keys] @ X[i]]) / tau
        is_pos = torch.cat([lab[others] == lab[i], torch.ones(len(pos_keys), dtype=torch.bool),
                            torch.zeros(len(neg_keys), dtype=torch.bool)])
        logp = logits - torch.logsumexp(logits, 0)
        losses.append(-(logp[is_pos]).sum() / is_pos.sum() * w[lab[i]] if is_pos.any() else logits.sum() * 0)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_allow_fewer_uses_every_available_key(backend):
    f, y, q, ql, w = _problem(7, 4, 5, 4, torch.float64, seed=6)
    q, ql = q[ql != 2], ql[ql != 2]                      # class 2 has no key yet (queue still filling)
    q, ql = q[:-3], ql[:-3]                              # class 3 has only 2 keys
    y[0] = 2
    with pytest.raises(ValueError, match="k_pos"):
        lf.rescom(f, y, q, ql, k_pos=3, k_neg=8, backend=backend)
    out = lf.rescom(f, y, q, ql, k_pos=3, k_neg=8, class_weights=w, backend=backend, allow_fewer=True)
    exp = _dense_allow_fewer(f, y, q, ql, 3, 8, 0.2, w)
    torch.testing.assert_close(out, exp)
    g1, = torch.autograd.grad(out, f)
    g2, = torch.autograd.grad(exp, f)
    torch.testing.assert_close(g1, g2)


def test_bad_arguments_name_the_argument():
    f, y, q, ql, w = _problem(4, 2, 3, 5, torch.float32)
    y[0] = 1
    with pytest.raises(ValueError, match="k_neg"):
        lf.rescom(f, y, q, ql, k_pos=1, k_neg=4)         # only 3 other-class keys
    with pytest.raises(ValueError, match="temperature"):
        lf.rescom(f, y, q, ql, k_pos=1, k_neg=1, temperature=0)
    with pytest.raises(ValueError, match="queue"):
        lf.rescom(f, y, q[:, :3], ql, k_pos=1, k_neg=1)
    with pytest.raises(ValueError, match="queue_labels"):
        lf.rescom(f, y, q, ql[:2], k_pos=1, k_neg=1)
    with pytest.raises(ValueError, match="labels"):
        lf.rescom(f, y[:3], q, ql, k_pos=1, k_neg=1)
    with pytest.raises(ValueError, match="class_weights"):
        lf.rescom(f, y, q, ql, k_pos=1, k_neg=1, class_weights=torch.ones(1))
    with pytest.raises(ValueError, match="reduction"):
        lf.rescom(f, y, q, ql, k_pos=1, k_neg=1, reduction="avg")
    with pytest.raises(ValueError, match="features"):
        lf.rescom(f.detach().clone().fill_(math.inf), y, q, ql, k_pos=1, k_neg=1)


def test_training_step_with_the_queue():
    """The README recipe: enqueue view-0 features, mine from the filled slots, step; loss matches the reference."""
    torch.manual_seed(0)
    C, K, D, b = 4, 3, 8, 6
    head = torch.nn.Linear(5, D).double()
    queue = lf.ClassBalancedQueue(C, K, D, dtype=torch.float64)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(b, 2, 5, dtype=torch.float64)
        y = torch.randint(0, C, (b,))
        z = F.normalize(head(x), dim=-1)                 # [b, 2, D]
        keys, key_labels = queue.keys()
        loss = lf.rescom(z, y, keys, key_labels, k_pos=1, k_neg=4, allow_fewer=True, backend="torch")
        if bool((queue.filled >= 1).all()) and keys.shape[0] - K >= 4:
            torch.testing.assert_close(loss, R.rescom(z, y, keys, key_labels, k_pos=1, k_neg=4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        queue.enqueue(z[:, 0].detach(), y)
        assert torch.isfinite(loss)
