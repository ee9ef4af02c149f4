"""backend="cpu" for the self-supervised family: the C++ ops ssl_fwd/ssl_bwd (csrc/cpu/ssl_cpu.cpp) against
the dense SSL oracle for every config variant (fp64 1e-10, fp32), dcl/hcl/bayesian_cl/mttv against
ltcl_fused.reference (values and gradients), fp64 gradcheck, exact Bayesian ranks with ties,
1 vs 2 threads bit-identical, torch.library.opcheck."""

import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused import ext
from ltcl_fused import reference as R
from ltcl_fused.backends import get_engine
from ltcl_fused.engine.ssl_contract import SSLConfig, dense_backward, dense_forward

from _truth import assert_within, check

F64, F32 = torch.float64, torch.float32


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = ext.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the C++ extension does not build here: {reason}")


def eng():
    return get_engine("cpu")


CONFIGS = {
    "neg": SSLConfig(),
    "hcl": SSLConfig(scales=(0.7, 1.7)),
    "hcl-beta0": SSLConfig(scales=(0.0, 1.0)),
    "three-scales-neg": SSLConfig(scales=(-0.5, 1.0, 2.5)),
    "bayes": SSLConfig(bayes=(0.5, 1.0, 0.1)),
    "bayes-a8b6": SSLConfig(bayes=(0.8, 0.6, 0.3)),
    "bayes-scale2": SSLConfig(scales=(2.0,), bayes=(0.6, 0.9, 0.1)),
    "bayes-omega0": SSLConfig(bayes=(1.0, 1.0, 0.1)),  # ω ≡ 0: lse = -inf, zero gradient
    "mttv-both": SSLConfig(exclude_partner=False, filter="both", lower=0.1, upper=0.9),
    "mttv-both-self": SSLConfig(exclude_partner=False, include_self=True, filter="both", lower=0.1, upper=0.9),
    "mttv-low": SSLConfig(exclude_partner=False, filter="low", lower=0.2),
    "mttv-low-self": SSLConfig(exclude_partner=False, include_self=True, filter="low", lower=0.2),
}

# (M, N, D, self_offset); A is C[self_offset : self_offset + M] when self_offset >= 0
SHAPES = [(1, 1, 3, 0), (2, 2, 5, 0), (37, 37, 17, 0), (20, 57, 3, 37), (37, 129, 17, -1), (129, 129, 130, 0),
          (300, 300, 17, 0)]


def _problem(M, N, D, self_offset, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: exact dot products, exact ties in every dtype
        base = torch.randint(-2, 3, (max(1, N // 3), D), generator=g).double() / 2
        C = base[torch.randint(0, base.shape[0], (N,), generator=g)]
    else:
        C = F.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    A = C[self_offset:self_offset + M].clone() if self_offset >= 0 else \
        F.normalize(torch.randn(M, D, generator=g, dtype=F64), dim=1)
    partner = torch.randint(-1, N, (M,), generator=g)
    return A.to(dtype), C.to(dtype), partner


def _check_engine(cfg, M, N, D, so, dtype, tol, seed=0, ties=False, inv_tau=2.0):
    """fp64: the oracle to ``tol``; fp32 (``tol`` None): the fp64 truth rule of tests/_truth.py."""
    A, C, partner = _problem(M, N, D, so, dtype, seed=seed, ties=ties)
    st = eng().ssl_forward(A, C, partner, so, inv_tau, cfg)
    ref = dense_forward(A, C, partner, so, inv_tau, cfg)
    for name, a, b in zip(("lse", "pos", "pos_in"), st, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if dtype == F64:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    if dtype != F64:
        check(lambda A, C: eng().ssl_forward(A, C, partner, so, inv_tau, cfg),
              lambda A, C: dense_forward(A, C, partner, so, inv_tau, cfg), [A, C], grad=False,
              names=("lse", "pos", "pos_in"))
    g = torch.Generator().manual_seed(seed + 1)
    acc = ref.lse.dtype
    coef = torch.randn(ref.lse.shape, generator=g, dtype=F64).to(acc)
    coef[:, ::3] = 0  # zero coefficients contribute exactly 0
    cpos = torch.randn(M, generator=g, dtype=F64).to(acc)
    dA, dC = eng().ssl_backward(A, C, partner, so, inv_tau, cfg, ref.lse, coef, cpos)
    rA, rC = dense_backward(A, C, partner, so, inv_tau, cfg, ref.lse, coef, cpos)
    assert dA.dtype == A.dtype and dC.dtype == C.dtype
    assert torch.isfinite(dA).all() and torch.isfinite(dC).all()
    if dtype == F64:
        torch.testing.assert_close(dA, rA, rtol=tol, atol=tol)
        torch.testing.assert_close(dC, rC, rtol=tol, atol=tol)
    else:
        check(lambda A, C, L, co, cp: eng().ssl_backward(A, C, partner, so, inv_tau, cfg, L, co, cp),
              lambda A, C, L, co, cp: dense_backward(A, C, partner, so, inv_tau, cfg, L, co, cp),
              [A, C, ref.lse, coef, cpos], grad=False, names=("dA", "dC"), value_floor=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("M,N,D,so", SHAPES, ids=[f"{m}x{n}x{d}s{s}" for m, n, d, s in SHAPES])
def test_engine_matches_oracle_fp64(name, M, N, D, so, monkeypatch):
    monkeypatch.setenv("LTCL_CPU_BLOCK_ROWS", "16")  # several row blocks ...
    monkeypatch.setenv("LTCL_CPU_SUPER_BYTES", "40000")  # ... and several backward super-blocks
    _check_engine(CONFIGS[name], M, N, D, so, F64, 1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_matches_oracle_fp32(name):
    for M, N, D, so in SHAPES[2:]:
        _check_engine(CONFIGS[name], M, N, D, so, F32, None)


@pytest.mark.parametrize("name", ["bayes", "bayes-a8b6", "bayes-scale2", "mttv-both", "neg"])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, None)])
def test_engine_exact_ties(name, dtype, tol):
    """Integer-valued features: many exactly tied similarities per row (ties count as <=) and filter
    values exactly on the thresholds (|g| = 0.5 etc.)."""
    _check_engine(CONFIGS[name], 60, 60, 5, 0, dtype, tol, seed=3, ties=True, inv_tau=0.5)
    cfg = SSLConfig(exclude_partner=False, filter="both", lower=0.5, upper=1.5)  # thresholds hit exactly
    _check_engine(cfg, 60, 60, 5, 0, dtype, tol, seed=4, ties=True)


def test_hand_worked_bayes_ranks():
    A = torch.tensor([[1.0]], dtype=F64)
    C = torch.tensor([[1.0], [2.0], [2.0], [3.0], [5.0]], dtype=F64)
    ab = (0.6, 0.8, 0.2)
    from ltcl_fused.engine.ssl_contract import bayes_omega
    u = torch.tensor([0.25, 0.75, 0.75, 1.0], dtype=F64)  # the two 2's both see three values <= 2
    want = torch.log((bayes_omega(u, *ab) * torch.exp(torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=F64))).sum())
    for dt in (F64, F32):
        st = eng().ssl_forward(A.to(dt), C.to(dt), torch.tensor([4]), -1, 1.0, SSLConfig(bayes=ab))
        if dt == F64:
            assert abs(float(st.lse[0, 0]) - float(want)) < 1e-12
        else:  # the hand-worked value is the truth; the fp32 oracle's own error sets the bound
            ref = dense_forward(A.to(dt), C.to(dt), torch.tensor([4]), -1, 1.0, SSLConfig(bayes=ab))
            assert_within(st.lse[0, 0], ref.lse[0, 0], want, what="lse")
        assert float(st.pos[0]) == 5.0 and float(st.pos_in[0]) == 0.0


def test_signed_zeros_tie():
    """-0.0 and +0.0 compare equal, so they share a rank (the radix keys canonicalise the zero)."""
    A = torch.tensor([[1.0], [2.0]], dtype=F64)
    C = torch.tensor([[-0.0], [0.0], [1.0], [-1.0], [-0.0], [0.5]], dtype=F64)
    partner = torch.tensor([5, -1])
    cfg = SSLConfig(bayes=(0.7, 0.6, 0.2))
    st = eng().ssl_forward(A, C, partner, -1, 1.0, cfg)
    ref = dense_forward(A, C, partner, -1, 1.0, cfg)
    torch.testing.assert_close(st.lse, ref.lse, rtol=1e-12, atol=1e-12)
    check(lambda A, C: eng().ssl_forward(A, C, partner, -1, 1.0, cfg).lse,
          lambda A, C: dense_forward(A, C, partner, -1, 1.0, cfg).lse, [A.float(), C.float()], grad=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    A, C, partner = _problem(40, 40, 16, 0, dtype, seed=5)
    for cfg in (CONFIGS["hcl"], CONFIGS["bayes"], CONFIGS["mttv-both"]):
        # the oracle on 16-bit inputs accumulates in fp32 too: its error is the bound's yardstick
        st, _ = check(lambda A, C: eng().ssl_forward(A, C, partner, 0, 2.0, cfg),
                      lambda A, C: dense_forward(A, C, partner, 0, 2.0, cfg), [A, C], grad=False,
                      names=("lse", "pos", "pos_in"))
        assert st[0].dtype == F32
        ref = dense_forward(A, C, partner, 0, 2.0, cfg)
        coef, cpos = torch.ones_like(ref.lse), torch.ones_like(ref.pos)
        (dA, dC), _ = check(lambda A, C, L, co, cp: eng().ssl_backward(A, C, partner, 0, 2.0, cfg, L, co, cp),
                            lambda A, C, L, co, cp: dense_backward(A, C, partner, 0, 2.0, cfg, L, co, cp),
                            [A, C, ref.lse, coef, cpos], grad=False, names=("dA", "dC"), value_floor=0)
        assert dA.dtype == dtype


# ------------------------------------------------------------------ the losses vs ltcl_fused.reference

def _views(B, D, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z1 + 0.7 * z2, dim=1)
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
    if inputs[0].dtype != F64:
        (v,), _ = check(lambda *x: getattr(lf, name)(*x, reduction=reduction, backend="cpu", **kw),
                        lambda *x: getattr(R, name)(*x, reduction=reduction, **kw), inputs, what=name, grad_floor=grad_floor)
        return v
    nan_ok = name == "mttv" and kw.get("official_self_term", False) and kw.get("filter", "both") == "both"
    v, g = _value_and_grads(getattr(lf, name), inputs, reduction=reduction, backend="cpu", **kw)
    rv, rg = _value_and_grads(getattr(R, name), inputs, reduction=reduction, **kw)
    torch.testing.assert_close(v, rv.to(v.dtype), rtol=tol, atol=tol, equal_nan=nan_ok)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=nan_ok)
    return v


TWO_VIEW_CASES = [
    ("dcl", {}), ("dcl", dict(debiased=False)), ("dcl", dict(tau_plus=0.0, temperature=0.2)),
    ("dcl", dict(tau_plus=0.5, temperature=1.0)),
    ("hcl", {}), ("hcl", dict(beta=0.0)), ("hcl", dict(beta=0.5, tau_plus=0.0)),
    ("hcl", dict(beta=3.0, tau_plus=0.3, temperature=0.3)),
    ("bayesian_cl", {}), ("bayesian_cl", dict(alpha=0.5, beta=0.5)), ("bayesian_cl", dict(alpha=0.75, beta=0.5)),
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
                                       ("bayesian_cl", dict(alpha=0.6, beta=0.8), 200),
                                       ("bayesian_cl", dict(alpha=1.0, beta=0.5), 150)])
def test_two_view_losses_match_reference_fp32_few_hundred(name, kw, B):
    z = _views(B, 32, F32, seed=7)
    _compare(name, z, None, reduction="sum", **kw)


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (0.8, 0.5), (1.0, 0.7)])
def test_bayesian_ties_match_reference(alpha, beta):
    g = torch.Generator().manual_seed(2)
    base = torch.randint(-2, 3, (6, 5), generator=g).double() / 2  # exact dots: exact ties in fp32 too
    z1 = base[torch.randint(0, 6, (25,), generator=g)]
    z2 = base[torch.randint(0, 6, (25,), generator=g)]
    for dt, tol in ((F64, 1e-10), (F32, None)):
        _compare("bayesian_cl", [z1.to(dt), z2.to(dt)], tol, reduction="none", alpha=alpha, beta=beta)


@pytest.mark.parametrize("filt", ["both", "low"])
@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("B", [1, 2, 9, 150])
def test_mttv_matches_reference(filt, official, B):
    g = torch.Generator().manual_seed(11 + B)
    E = torch.randn(2 * B, 6, generator=g, dtype=F64)
    E[1::2] = E[0::2] + 0.8 * E[1::2]
    for reduction in ("mean", "none"):
        _compare("mttv", [E], 1e-10, reduction=reduction, filter=filt, official_self_term=official)
    kw = dict(lower=0.05, upper=0.95, temperature=0.5, filter=filt, official_self_term=official)
    # B = 1: r ≡ 1 (or 0), so the gradient is 0 in exact arithmetic and fp32 returns rounding noise
    _compare("mttv", [E.float()], None, grad_floor=1.0 if B == 1 else 0.0, **kw)


@pytest.mark.parametrize("name", ["dcl", "hcl", "bayesian_cl"])
def test_large_norms_do_not_overflow(name):
    z = _views(20, 8, F64, seed=3, scale=30.0)  # s up to 1800 with t = 0.5
    v = _compare(name, z, 1e-9, reduction="none")
    assert torch.isfinite(v).all()
    v32, g32 = _value_and_grads(getattr(lf, name), [x.float() for x in z], backend="cpu")
    assert torch.isfinite(v32) and all(torch.isfinite(x).all() for x in g32)


def test_auto_picks_cpu_and_b1():
    z1, z2 = _views(6, 4, F64, seed=1)
    E = torch.randn(8, 4, dtype=F64)
    for fn, args in [(lf.dcl, (z1, z2)), (lf.hcl, (z1, z2)), (lf.bayesian_cl, (z1, z2)), (lf.mttv, (E,))]:
        assert torch.equal(fn(*args, backend="auto"), fn(*args, backend="cpu"))
    x1, x2 = _views(1, 4, F64, seed=2)  # B = 1: no negatives
    for name in ("dcl", "hcl", "bayesian_cl"):
        v, g = _value_and_grads(getattr(lf, name), [x1, x2], backend="cpu")
        assert torch.isfinite(v) and all(torch.isfinite(t).all() for t in g)


# ------------------------------------------------------------------ gradcheck, determinism, registration

@pytest.mark.parametrize("name,kw", [("dcl", {}), ("dcl", dict(debiased=False)), ("hcl", dict(beta=0.7)),
                                     ("bayesian_cl", dict(alpha=0.7, beta=0.6))])
def test_gradcheck_two_view(name, kw):
    z1, z2 = _views(4, 3, F64, seed=5)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: getattr(lf, name)(a, b, backend="cpu", **kw), (z1, z2))


@pytest.mark.parametrize("filt,official", [("both", False), ("low", True)])
def test_gradcheck_mttv(filt, official):
    g = torch.Generator().manual_seed(4)
    E = torch.randn(8, 4, generator=g, dtype=F64)
    E[1::2] = E[0::2] + 0.5 * E[1::2]
    E.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: lf.mttv(e, filter=filt, official_self_term=official,
                                                      backend="cpu"), (E,))


def _op_args(cfg):
    from ltcl_fused.backends.cpp_engine import _ssl_args
    return _ssl_args(0, 2.0, cfg)[1:]  # (self_offset is passed separately below)


def test_gradcheck_op_autograd_formula():
    A, C, partner = _problem(7, 9, 4, 0, F64, seed=8)
    A.requires_grad_(True)
    C.requires_grad_(True)
    for name in ("hcl", "bayes-a8b6", "mttv-low-self"):
        args = _op_args(CONFIGS[name])

        def f(A, C):
            lse, pos, _ = torch.ops.ltcl_fused.ssl_fwd(A, C, partner, 0, *args)
            return lse, pos

        assert torch.autograd.gradcheck(f, (A, C))


def test_one_and_two_threads_bit_identical(monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SUPER_BYTES", str(1 << 20))  # several backward super-blocks
    A, C, partner = _problem(600, 700, 130, 50, F32, seed=9)
    old = torch.get_num_threads()
    res = {}
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for name in ("hcl", "bayes", "mttv-both"):
                cfg = CONFIGS[name]
                st = eng().ssl_forward(A, C, partner, 50, 2.0, cfg)
                coef = torch.linspace(-1, 1, st.lse.numel()).reshape(st.lse.shape)
                gr = eng().ssl_backward(A, C, partner, 50, 2.0, cfg, st.lse, coef, torch.ones_like(st.pos))
                res[nt, name] = tuple(st) + tuple(gr)
    finally:
        torch.set_num_threads(old)
    for name in ("hcl", "bayes", "mttv-both"):
        for t1, t2 in zip(res[1, name], res[2, name]):
            assert torch.equal(t1, t2), name


@pytest.mark.parametrize("name", ["neg", "hcl", "bayes", "mttv-both-self"])
def test_opcheck(name):
    A, C, partner = _problem(9, 13, 5, 2, F64, seed=10)
    args = _op_args(CONFIGS[name])
    torch.library.opcheck(torch.ops.ltcl_fused.ssl_fwd.default,
                          (A.clone().requires_grad_(True), C.clone().requires_grad_(True), partner, 2, *args))
    lse, pos, _ = torch.ops.ltcl_fused.ssl_fwd(A, C, partner, 2, *args)
    coef = torch.randn(lse.shape, dtype=F64)
    torch.library.opcheck(torch.ops.ltcl_fused.ssl_bwd.default,
                          (A, C, partner, 2, *args, lse, coef, torch.randn(9, dtype=F64)))


def test_bad_arguments_are_rejected():
    A, C, partner = _problem(4, 4, 3, 0, F32)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.ltcl_fused.ssl_fwd(A, C, partner, 0, 1.0, [], True, False, 0, 0.0, 1.0, [])
    with pytest.raises(RuntimeError, match="bayes"):
        torch.ops.ltcl_fused.ssl_fwd(A, C, partner, 0, 1.0, [1.0, 2.0], True, False, 0, 0.0, 1.0, [0.5, 1.0, 0.1])
    with pytest.raises(RuntimeError, match="partner"):
        torch.ops.ltcl_fused.ssl_fwd(A, C, partner[:2], 0, 1.0, [1.0], True, False, 0, 0.0, 1.0, [])
