"""Issue 13, items 4, 11 and 12, on every fused backend (torch, cpu, triton).

4.  ``check_finite=False`` skips the input check but never hides a NaN: a NaN feature (anywhere) gives a
    NaN loss, and a ±Inf feature a non-finite loss wherever the dense reference's is non-finite.
11. MTTV with ``upper=1`` keeps identical positive pairs (their cosine is computed as 1 + 2e-16): |cos| is
    clamped to 1 before the filter on every backend.
12. ACL/AFCL (η > 0) on rows whose only column is a negative (p ≡ 1): the loss is the constant +inf, its
    gradient with respect to the features 0 (as the reference's), on every backend.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused.backends import get_engine

BACKENDS = ["torch", "cpu", "triton"]
B, D = 6, 8


def _available(backend):
    reason = get_engine(backend).unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def _losses():
    g = torch.Generator().manual_seed(1)
    queue = F.normalize(torch.randn(12, D, generator=g, dtype=torch.float64), dim=-1)
    q_lab = torch.arange(12) % 3
    protos = F.normalize(torch.randn(3, D, generator=g, dtype=torch.float64), dim=-1)

    def rescom_bad_queue(x, y, be):  # the non-finite value in the queue (mining must not drop it)
        keys = torch.cat([queue[:3].to(x.dtype), x.reshape(-1, D)[:8], x.reshape(-1, D)[-1:]])
        clean = F.normalize(torch.nan_to_num(x, nan=0.3, posinf=0.3, neginf=-0.3), dim=-1)
        return lf.rescom(clean, y, keys, q_lab, k_pos=1, k_neg=4, backend=be, check_finite=False)

    return {
        "supcon": lambda x, y, be: lf.supcon(x, y, backend=be, check_finite=False),
        "cl": lambda x, y, be: lf.afcl(x, y, backend=be, check_finite=False),
        "fcl": lambda x, y, be: lf.fcl(x, y, gamma=2.0, backend=be, check_finite=False),
        "fcl-0.5": lambda x, y, be: lf.fcl(x, y, gamma=0.5, backend=be, check_finite=False),
        "acl": lambda x, y, be: lf.acl(x, y, eta=1.0, backend=be, check_finite=False),
        "afcl": lambda x, y, be: lf.afcl(x, y, gamma=2.0, eta=1.0, backend=be, check_finite=False),
        "bcl": lambda x, y, be: lf.bcl(x, y, protos.to(x.dtype), backend=be, check_finite=False),
        "rescom": lambda x, y, be: lf.rescom(x, y, queue.to(x.dtype), q_lab, k_pos=1, k_neg=4, backend=be,
                                             check_finite=False),
        "rescom-queue": rescom_bad_queue,
        "dcl": lambda x, y, be: lf.dcl(x[:, 0], x[:, 1], backend=be, check_finite=False),
        "hcl": lambda x, y, be: lf.hcl(x[:, 0], x[:, 1], backend=be, check_finite=False),
        "bayesian_cl": lambda x, y, be: lf.bayesian_cl(x[:, 0], x[:, 1], backend=be, check_finite=False),
        "mttv": lambda x, y, be: lf.mttv(x.reshape(-1, D), backend=be, check_finite=False),
    }


LOSSES = _losses()
# (sample, view, feature) positions: first row / first view, a middle one, the last row of the last view
POSITIONS = [(0, 0, 0), (1, 0, 3), (2, 1, 0), (5, 1, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_nonfinite_features_never_give_a_finite_loss(backend, loss):
    _available(backend)
    fn = LOSSES[loss]
    base = F.normalize(torch.randn(B, 2, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for dtype, value, pos in itertools.product((torch.float64, torch.float32), (float("nan"), float("inf"),
                                                                                 float("-inf")), POSITIONS):
        x = base.clone()
        x[pos] = value
        x = x.to(dtype)
        what = f"{loss} {backend} {dtype} {value} at {pos}"
        got = fn(x, y, backend)
        ref = fn(x, y, "reference")
        if value != value:  # NaN input -> NaN loss
            assert torch.isnan(got), f"{what}: {got.item()} (reference {ref.item()})"
        elif not torch.isfinite(ref):
            assert not torch.isfinite(got), f"{what}: {got.item()} where the reference gives {ref.item()}"


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_mttv_upper_one_keeps_identical_pairs(backend):
    if backend != "reference":
        _available(backend)
    e = torch.tensor([[1., 1, 1], [1, 1, 1], [1, -1, 0], [1, -1, 0]], dtype=torch.float64)
    r = lf.mttv(e, lower=0.0, upper=1.0, reduction="none", backend=backend)
    # rows 0/1 and 2/3 are identical pairs (cos = 1), the cross cosines are 0: r = e^{1/t} / (e^{1/t} + 2)
    t = 0.3
    want = torch.exp(torch.tensor(1 / t, dtype=torch.float64)) / (torch.exp(torch.tensor(1 / t, dtype=torch.float64)) + 2)
    torch.testing.assert_close(r, want.expand(4), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_mttv_upper_one_class(backend, dtype):
    """Pairs of (numerically) identical rows, rows of several norms, ``upper=1``: every backend keeps what
    the reference keeps (the cosine's rounding above 1 is clamped away), for both filters."""
    _available(backend)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    e = torch.stack([base, base * 3.7], 1).reshape(12, 5).to(dtype)  # rows 2k, 2k+1 parallel
    for filt, lower in (("both", 0.0), ("both", 0.05), ("low", 0.05)):
        kw = dict(lower=lower, upper=1.0, filter=filt, reduction="none")
        ref = lf.mttv(e.double(), backend="reference", **kw)
        got = lf.mttv(e, backend=backend, **kw)
        assert (ref > 0).all()  # every positive kept
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_single_negative_column_inf_loss_zero_gradient(backend, gamma):
    """N = 2, two classes: each row's only column is a negative, p ≡ 1, T⁻ = +inf is a constant of the
    features, so its gradient is 0 (exactly, on every backend), the loss +inf."""
    if backend != "reference":
        _available(backend)
    for dtype in (torch.float64, torch.float32):
        x = F.normalize(torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=dtype), dim=-1)
        x.requires_grad_(True)
        loss = lf.afcl(x, torch.tensor([0, 1]), gamma=gamma, eta=1.0, temperature=0.5, backend=backend)
        loss.backward()
        assert loss.item() == float("inf")
        assert torch.equal(x.grad, torch.zeros_like(x)), (backend, x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_column_rows_beside_normal_rows(backend):
    """A mixed batch via ref_features: the gradient of the finite rows is the reference's, the +inf rows add 0."""
    _available(backend)
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 0, 1, 1])
    kw = dict(gamma=0.5, eta=2.0, temperature=0.5, reduction="none")
    xs = {}
    for be in (backend, "reference"):
        xs[be] = x.clone().requires_grad_(True)
        per = lf.afcl(xs[be], y, **kw, backend=be)
        assert torch.isfinite(per).all()
        per.sum().backward()
    torch.testing.assert_close(xs[backend].grad, xs["reference"].grad, rtol=1e-10, atol=1e-12)
    # now the same rows as single-column problems: each alone against one negative column
    for i in range(4):
        pair = torch.stack([x[i], x[(i + 2) % 4]]).clone().requires_grad_(True)
        lab = torch.tensor([0, 1])
        v = lf.afcl(pair, lab, **kw, backend=backend)
        assert torch.isinf(v).all()
        v[0].backward()
        assert torch.equal(pair.grad, torch.zeros_like(pair.grad))
