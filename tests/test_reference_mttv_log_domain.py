"""Issue 13 item 10: the reference MTTV (the oracle) is computed in the log domain. ``exp(cos/t)`` overflows at
fp32 t <= 0.01 / fp64 t <= 1e-3; the loss and its gradient must stay finite and match an independent truth:
the value in 40-digit mpmath, the gradient from a separate per-pair fp64 log-domain transcription."""
import math

import mpmath as mp
import pytest
import torch

import ltcl_fused as lf
from ltcl_fused import reference as R


def _mp_loss(E, t, official=False):
    """SPEC.md section 6 with filter "low", lower = 0 (every entry kept), straight from the formula in mpmath."""
    mp.mp.dps = 40
    rows = [[mp.mpf(v) for v in r] for r in E.double().tolist()]
    z = [[v / mp.sqrt(mp.fsum(w * w for w in r)) for v in r] for r in rows]
    n = len(z)
    s = [[mp.fsum(a * b for a, b in zip(z[i], z[k])) / t for k in range(n)] for i in range(n)]
    r = []
    for i in range(n):
        if official:  # Σ over every kept column (self included) minus e^{1/t}
            den = mp.fsum(mp.exp(v) for v in s[i]) - mp.exp(1 / mp.mpf(t))
        else:
            den = mp.fsum(mp.exp(s[i][k]) for k in range(n) if k != i)
        r.append(mp.exp(s[i][i ^ 1]) / den)
    return float(-mp.log(mp.fsum(r) / n))


def _pairwise_loss(E, t):
    """The same loss as a per-pair fp64 transcription in the log domain (autograd gives the true gradient)."""
    z = E / E.norm(dim=1, keepdim=True)
    n = E.shape[0]
    log_r = []
    for i in range(n):
        s = torch.stack([z[i] @ z[k] for k in range(n) if k != i]) / t
        log_r.append((z[i] @ z[i ^ 1]) / t - torch.logsumexp(s, 0))
    return math.log(n) - torch.logsumexp(torch.stack(log_r), 0)


def _embeddings(t, seed):
    """2B = 10 rows around one direction, spread so that the cosines differ by O(t): the softmax at
    temperature t is not saturated (a saturated one has a gradient of e^{-100} and nothing to test)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(6, generator=g, dtype=torch.float64)
    return u + math.sqrt(t) * u.norm() * torch.randn(10, 6, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("t", [0.05, 0.01, 2e-3, 1e-3, 1e-4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reference_mttv_is_finite_and_exact_at_small_temperature(t, dtype):
    E = _embeddings(t, seed=int(1 / t)).to(dtype)  # the inputs as the run in `dtype` sees them
    x = E.clone().requires_grad_()
    loss = R.mttv(x, lower=0.0, filter="low", temperature=t)
    loss.backward()
    xt = E.double().clone().requires_grad_()
    _pairwise_loss(xt, t).backward()
    # the logits s = cos/t carry an absolute rounding error of a few eps/t in `dtype`
    tol = 4 * torch.finfo(dtype).eps / t
    loss = loss.detach()
    assert loss.dtype == dtype and math.isfinite(float(loss)) and bool(torch.isfinite(x.grad).all())
    assert abs(float(loss) - _mp_loss(E, t)) <= tol + 4 * torch.finfo(dtype).eps
    scale = float(xt.grad.abs().max())
    assert scale > 1e-3  # a live gradient
    torch.testing.assert_close(x.grad.double(), xt.grad, rtol=0, atol=tol * scale)
    # the public reference backend is this function; the fused torch backend meets the same truth
    torch.testing.assert_close(lf.mttv(E, lower=0.0, filter="low", temperature=t, backend="reference").double(),
                               loss.detach().double(), rtol=0, atol=0)
    fused = lf.mttv(E, lower=0.0, filter="low", temperature=t, backend="torch")
    assert abs(float(fused) - _mp_loss(E, t)) <= tol + 4 * torch.finfo(dtype).eps


def test_reference_official_self_term_matches_mpmath():
    E = _embeddings(0.01, seed=7)
    got = R.mttv(E, lower=0.0, filter="low", temperature=0.01, official_self_term=True)
    assert abs(float(got) - _mp_loss(E, 0.01, official=True)) <= 1e-9
    # no overflow at a temperature where e^{1/t} itself is out of range
    E = _embeddings(1e-3, seed=8)
    got = R.mttv(E, lower=0.0, filter="low", temperature=1e-3, official_self_term=True)
    assert abs(float(got) - _mp_loss(E, 1e-3, official=True)) <= 1e-6
