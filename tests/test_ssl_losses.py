"""DCL, HCL, Bayesian CL and MTTV on the chunked "torch" path against ltcl_fused.reference (values and
gradients), hand-worked cases, fp64 gradcheck, exact Bayesian ranks with ties, routing and input errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused import reference as R
from ltcl_fused import backends
from ltcl_fused.backends import ssl_torch

from _truth import check

F64, F32 = torch.float64, torch.float32


def _views(B, D, dtype, seed, scale=1.0, normalize=True):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    if normalize:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z1 + 0.7 * z2, dim=1)  # positives correlated
    return (scale * z1).to(dtype), (scale * z2).to(dtype)


def _value_and_grads(fn, inputs, **kw):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs, **kw)
    if out.dim() == 0:
        out.backward()
    else:
        (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)).sum().backward()
    return out.detach(), [x.grad for x in xs]


def _compare(name, inputs, tol, reduction="mean", grad_floor=0.0, **kw):
    """fp64: the reference to ``tol``; fp32 (``tol`` None): the fp64 truth rule of tests/_truth.py.
    NaN only where the released MTTV code's denominator allows it (official_self_term, filter "both")."""
    ours = getattr(lf, name)
    ref = getattr(R, name)
    if inputs[0].dtype != F64:
        (v,), _ = check(lambda *x: ours(*x, reduction=reduction, backend="torch", **kw),
                        lambda *x: ref(*x, reduction=reduction, **kw), inputs, what=name, grad_floor=grad_floor)
        return v
    nan_ok = name == "mttv" and kw.get("official_self_term", False) and kw.get("filter", "both") == "both"
    v, g = _value_and_grads(ours, inputs, reduction=reduction, backend="torch", **kw)
    rv, rg = _value_and_grads(ref, inputs, reduction=reduction, **kw)
    torch.testing.assert_close(v, rv.to(v.dtype), rtol=tol, atol=tol, equal_nan=nan_ok)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=nan_ok)
    return v


TWO_VIEW_CASES = [
    ("dcl", {}),
    ("dcl", dict(debiased=False)),
    ("dcl", dict(tau_plus=0.0, temperature=0.2)),
    ("dcl", dict(tau_plus=0.5, temperature=1.0)),
    ("hcl", {}),
    ("hcl", dict(beta=0.0)),
    ("hcl", dict(beta=0.5, tau_plus=0.0)),
    ("hcl", dict(beta=3.0, tau_plus=0.3, temperature=0.3)),
    ("bayesian_cl", {}),
    ("bayesian_cl", dict(alpha=0.75, beta=0.5)),
    ("bayesian_cl", dict(alpha=1.0, beta=0.75, tau_plus=0.0)),
    ("bayesian_cl", dict(alpha=0.9, beta=0.9, tau_plus=0.3, temperature=0.2)),
    ("bayesian_cl", dict(alpha=1.0, beta=1.0)),  # ω ≡ 0: Ng = 0, loss 0
]


@pytest.mark.parametrize("name,kw", TWO_VIEW_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TWO_VIEW_CASES)])
@pytest.mark.parametrize("B", [1, 2, 37])
def test_two_view_losses_match_reference_fp64(name, kw, B):
    z = _views(B, 7, F64, seed=B)
    for reduction in ("mean", "none"):
        _compare(name, z, 1e-10, reduction=reduction, **kw)


@pytest.mark.parametrize("name,kw,B", [("dcl", {}, 300), ("hcl", dict(beta=1.0), 300),
                                       ("bayesian_cl", dict(alpha=0.6, beta=0.8), 200)])  # (the dense Bayesian
def test_two_view_losses_match_reference_fp32_few_hundred(name, kw, B, monkeypatch):  # reference is O(B³))
    monkeypatch.setattr(ssl_torch, "BLOCK_ELEMENTS", 50_000)  # several row blocks
    z = _views(B, 32, F32, seed=7)
    _compare(name, z, None, reduction="sum", **kw)


@pytest.mark.parametrize("name", ["dcl", "hcl", "bayesian_cl"])
def test_large_norms_do_not_overflow(name):
    z = _views(20, 8, F64, seed=3, scale=30.0)  # s up to 1800 with t = 0.5
    v = _compare(name, z, 1e-9, reduction="none")
    assert torch.isfinite(v).all()
    v32, _ = _value_and_grads(getattr(lf, name), [x.float() for x in z], backend="torch")
    assert torch.isfinite(v32)


@pytest.mark.parametrize("filt", ["both", "low"])
@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("B", [1, 2, 9, 150])
def test_mttv_matches_reference(filt, official, B, monkeypatch):
    monkeypatch.setattr(ssl_torch, "BLOCK_ELEMENTS", 4096)
    g = torch.Generator().manual_seed(11 + B)
    E = torch.randn(2 * B, 6, generator=g, dtype=F64)
    E[1::2] = E[0::2] + 0.8 * E[1::2]  # pairs correlated
    for reduction in ("mean", "none"):
        _compare("mttv", [E], 1e-10, reduction=reduction, filter=filt, official_self_term=official)
    kw = dict(lower=0.05, upper=0.95, temperature=0.5, filter=filt, official_self_term=official)
    # B = 1: r ≡ 1 (or 0), so the gradient is 0 in exact arithmetic and fp32 returns rounding noise
    _compare("mttv", [E.float()], None, grad_floor=1.0 if B == 1 else 0.0, **kw)


def test_mttv_sum_is_the_loss_and_none_the_ratios():
    E = torch.randn(10, 5, dtype=F64)
    r = lf.mttv(E, reduction="none", backend="torch")
    assert r.shape == (10,)
    L = lf.mttv(E, reduction="sum", backend="torch")
    torch.testing.assert_close(L, -torch.log(r.mean()))
    torch.testing.assert_close(L, lf.mttv(E, backend="torch"))


def test_hand_worked_dcl_and_hcl():
    # B = 2, D = 1: rows z = [1, 0.5 | 0.8, -1]; t = 1, τ⁺ = 0.25
    z1, z2 = torch.tensor([[1.0], [0.5]], dtype=F64), torch.tensor([[0.8], [-1.0]], dtype=F64)
    z = [1.0, 0.5, 0.8, -1.0]
    M, t, tp, beta = 2, 1.0, 0.25, 2.0
    want_d, want_h = [], []
    for i in range(4):
        p = (i + 2) % 4
        pos = math.exp(z[i] * z[p] / t)
        negs = [math.exp(z[i] * z[j] / t) for j in range(4) if j not in (i, p)]
        ng = max((sum(negs) - tp * M * pos) / (1 - tp), M * math.exp(-1 / t))
        want_d.append(-math.log(pos / (pos + ng)))
        rw = M * sum(e ** (1 + beta) for e in negs) / sum(e ** beta for e in negs)
        ng = max((rw - tp * M * pos) / (1 - tp), M * math.exp(-1 / t))
        want_h.append(-math.log(pos / (pos + ng)))
    got = lf.dcl(z1, z2, temperature=t, tau_plus=tp, reduction="none", backend="torch")
    torch.testing.assert_close(got, torch.tensor(want_d, dtype=F64), rtol=1e-12, atol=1e-12)
    got = lf.hcl(z1, z2, temperature=t, tau_plus=tp, beta=beta, reduction="none", backend="torch")
    torch.testing.assert_close(got, torch.tensor(want_h, dtype=F64), rtol=1e-12, atol=1e-12)


def _omega(u, a, b, tp):
    tm = 1 - tp
    A = (1 - 2 * a) * (tm - tp) + 1e-3
    Bq = 2 * (a * tm + (1 - a) * tp)
    x = (-Bq + math.sqrt(Bq * Bq + 4 * A * u)) / (2 * A)
    p1, p2 = 2 * (1 - x), 2 * x
    htn = (a * (1 - b) * p1 + (1 - a) * b * p2) / (a * (1 - b) + (1 - a) * b + 1e-3)
    return htn / (tm * (a * p1 + (1 - a) * p2) + tp * ((1 - a) * p1 + a * p2))


def test_hand_worked_bayesian_with_ties():
    # B = 3, D = 1, values chosen so rows have tied negatives: z = [1, 1, 2 | 0.5, 1, -1]
    z1, z2 = torch.tensor([[1.0], [1.0], [2.0]], dtype=F64), torch.tensor([[0.5], [1.0], [-1.0]], dtype=F64)
    z = [1.0, 1.0, 2.0, 0.5, 1.0, -1.0]
    a, b, tp, t = 0.7, 0.6, 0.1, 0.5
    want = []
    for i in range(6):
        p = (i + 3) % 6
        negs = [z[i] * z[j] / t for j in range(6) if j not in (i, p)]
        M = len(negs)
        ng = sum(_omega(sum(1 for k in negs if k <= s) / M, a, b, tp) * math.exp(s) for s in negs)
        pos = math.exp(z[i] * z[p] / t)
        want.append(-math.log(pos / (pos + ng)))
    got = lf.bayesian_cl(z1, z2, alpha=a, beta=b, tau_plus=tp, temperature=t, reduction="none", backend="torch")
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (0.8, 0.5), (1.0, 0.7)])
def test_bayesian_ties_match_reference(alpha, beta, monkeypatch):
    monkeypatch.setattr(ssl_torch, "BLOCK_ELEMENTS", 200)
    g = torch.Generator().manual_seed(2)
    base = torch.randint(-2, 3, (6, 5), generator=g).double() / 2  # exact dots: exact ties in fp32 too
    z1 = base[torch.randint(0, 6, (25,), generator=g)]
    z2 = base[torch.randint(0, 6, (25,), generator=g)]
    for dt, tol in ((F64, 1e-10), (F32, None)):
        _compare("bayesian_cl", [z1.to(dt), z2.to(dt)], tol, reduction="none", alpha=alpha, beta=beta)


def test_mttv_hand_worked():
    # 4 unit vectors in 2-D at angles 0°, 30°, 80°, 150°; pairs (0,1), (2,3); t = 0.5
    ang = [0.0, 30.0, 80.0, 150.0]
    E = torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in ang], dtype=F64) * 3.0
    cos = [[math.cos(math.radians(x - y)) for y in ang] for x in ang]
    t, lo, hi = 0.5, 0.2, 0.9
    for filt in ("both", "low"):
        def kept(i, j):
            c = abs(cos[i][j])
            return c >= lo and (filt == "low" or c <= hi)
        r = []
        for i in range(4):
            p = i ^ 1
            den = sum(math.exp(cos[i][k] / t) for k in range(4) if k != i and kept(i, k))
            r.append(math.exp(cos[i][p] / t) / den if kept(i, p) else 0.0)
        got = lf.mttv(E, lower=lo, upper=hi, temperature=t, filter=filt, reduction="none", backend="torch")
        torch.testing.assert_close(got, torch.tensor(r, dtype=F64), rtol=1e-12, atol=1e-12)
        L = lf.mttv(E, lower=lo, upper=hi, temperature=t, filter=filt, backend="torch")
        assert abs(float(L) + math.log(sum(r) / 4)) < 1e-12
    # with "both", cos(0°, 30°) = 0.866 is kept and cos(80°, 150°) = 0.342 too; cos(0°, 80°) = 0.17 is dropped


@pytest.mark.parametrize("name,kw", [("dcl", {}), ("dcl", dict(debiased=False)), ("hcl", dict(beta=0.7)),
                                     ("bayesian_cl", dict(alpha=0.7, beta=0.8))])
def test_gradcheck_two_view(name, kw):
    z1, z2 = _views(3, 4, F64, seed=5)
    z1, z2 = z1.requires_grad_(True), z2.requires_grad_(True)
    fn = getattr(lf, name)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, reduction="none", backend="torch", **kw), (z1, z2))


@pytest.mark.parametrize("filt", ["both", "low"])
@pytest.mark.parametrize("official", [False, True])
def test_gradcheck_mttv(filt, official):
    g = torch.Generator().manual_seed(8)
    E = torch.randn(6, 4, generator=g, dtype=F64).requires_grad_(True)
    kw = dict(lower=0.05, upper=0.97, temperature=0.5, filter=filt, official_self_term=official, backend="torch")
    if official and filt == "both":
        kw["temperature"] = 2.0  # keep the released code's denominator positive here
    assert torch.isfinite(lf.mttv(E, **kw))
    assert torch.autograd.gradcheck(lambda x: lf.mttv(x, **kw), (E,))
    assert torch.autograd.gradcheck(lambda x: lf.mttv(x, reduction="none", **kw), (E,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_no_worse_than_dense(dtype):
    z = _views(64, 16, F64, seed=9)
    E = torch.cat(z)[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    for name, inp, kw in [("dcl", z, {}), ("hcl", z, {}), ("bayesian_cl", z, {}), ("mttv", [E], {})]:
        (ours,), _ = check(lambda *x: getattr(lf, name)(*x, backend="torch", **kw),
                           lambda *x: getattr(R, name)(*x, **kw), [x.to(dtype) for x in inp], what=name)
        assert ours.dtype == torch.float32


def test_backend_routing():
    z1, z2 = _views(4, 3, F64, seed=1)
    E = torch.randn(8, 3, dtype=F64)
    calls = [(lf.dcl, (z1, z2)), (lf.hcl, (z1, z2)), (lf.bayesian_cl, (z1, z2)), (lf.mttv, (E,))]
    for fn, args in calls:
        for b in ("triton", "cuda", "cpu"):
            if "ssl" in backends.get_engine(b).ops:
                continue  # that fused engine has landed: tested in its own files
            # never a silent fallback: either "cannot run here" (e.g. cuda on CPU tensors) or "not implemented"
            with pytest.raises((NotImplementedError, backends.BackendUnavailable)) as ei:
                fn(*args, backend=b)
            assert repr(b) in str(ei.value) and "backend" in str(ei.value)
            if isinstance(ei.value, NotImplementedError):
                assert "'ssl'" in str(ei.value)
        with pytest.raises(ValueError, match="backend"):
            fn(*args, backend="gpu")
        ref = getattr(R, fn.__name__)(*args)
        torch.testing.assert_close(fn(*args, backend="reference"), ref, rtol=0, atol=0)
        picked = backends.resolve("auto", args[0].device, "ssl", "test").name  # cpu when the extension builds
        torch.testing.assert_close(fn(*args, backend="auto"), fn(*args, backend=picked), rtol=0, atol=0)
        torch.testing.assert_close(fn(*args, backend="torch"), ref, rtol=1e-10, atol=1e-12)


def test_bad_inputs_name_the_argument():
    z1, z2 = _views(4, 3, F32, seed=1)
    with pytest.raises(TypeError, match="`debiased`"):
        lf.dcl(z1, z2, debiased=1)
    with pytest.raises(ValueError, match="`beta`"):
        lf.hcl(z1, z2, beta=-0.5)
    with pytest.raises(ValueError, match="`tau_plus`"):
        lf.bayesian_cl(z1, z2, tau_plus=-0.1)
    with pytest.raises(TypeError, match="`z2`"):
        lf.dcl(z1, z2.double())
    with pytest.raises(ValueError, match="`z1`"):
        lf.hcl(torch.full((4, 3), float("nan")), z2)
    with pytest.raises(ValueError, match="`reduction`"):
        lf.bayesian_cl(z1, z2, reduction="avg")
    with pytest.raises(TypeError, match="`official_self_term`"):
        lf.mttv(torch.randn(4, 3), official_self_term="yes")
    with pytest.raises(ValueError, match="`upper`"):
        lf.mttv(torch.randn(4, 3), upper=1.5)
    with pytest.raises(ValueError, match="`temperature`"):
        lf.mttv(torch.randn(4, 3), temperature=-1)
    with pytest.raises(ValueError, match="`embeddings`"):
        lf.mttv(torch.randn(4, 3, 2))


class _FakeFusedSSL:
    """A stand-in for a future fused engine that lists "ssl": the dense oracle, counting its calls."""

    def __init__(self, name, reason=None):
        from ltcl_fused.engine.ssl_contract import DenseSSLEngine
        self.name, self.ops, self._reason, self._dense, self.calls = name, frozenset({"ssl"}), reason, DenseSSLEngine(), 0

    def unavailable_reason(self, device):
        return self._reason

    def ssl_forward(self, *a):
        self.calls += 1
        return self._dense.ssl_forward(*a)

    def ssl_backward(self, *a):
        return self._dense.ssl_backward(*a)


def test_a_fused_engine_listing_ssl_is_used(monkeypatch):
    from ltcl_fused import backends
    cache = dict(backends._cache)
    monkeypatch.setattr(backends, "_cache", cache)
    z1, z2 = _views(5, 3, F64, seed=2)
    cache["cpu"] = eng = _FakeFusedSSL("cpu")
    want = R.hcl(z1, z2)
    torch.testing.assert_close(lf.hcl(z1, z2, backend="auto"), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lf.hcl(z1, z2, backend="cpu"), want, rtol=1e-10, atol=1e-12)
    assert eng.calls == 2
    monkeypatch.setattr(backends, "_warned", set())
    cache["cpu"] = eng = _FakeFusedSSL("cpu", reason="no compiler")  # auto skips it, a named call says why
    with pytest.warns(RuntimeWarning, match="no compiler"):
        torch.testing.assert_close(lf.hcl(z1, z2, backend="auto"), want, rtol=1e-10, atol=1e-12)
    assert eng.calls == 0
    with pytest.raises(backends.BackendUnavailable, match="no compiler"):
        lf.hcl(z1, z2, backend="cpu")
