"""The C++ CPU engine's symmetric path for the self-supervised contract (csrc/cpu/ssl_cpu.cpp: C is A,
self_offset 0, no Bayesian weights; one GEMM per pair of row blocks, strip::sym_forward_tiles /
sym_backward_tiles).

Expected values come from the dense SSL contract (ltcl_fused.engine.ssl_contract.dense_forward / dense_backward,
whose dA + dC is the gradient through one tensor used as A and C) and ltcl_fused.reference; fp32 results are
held to the fp64 truth (tests/_truth.py). LTCL_CPU_SYM_BLOCK (read at every call) gives many tiles on small N.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused.backends import get_engine
from ltcl_fused.backends.cpp_engine import CPUEngine
from ltcl_fused.engine.ssl_contract import SSLConfig, dense_backward, dense_forward

from _cpp import built, spy_symmetric  # noqa: F401 (built: the autouse fixture)
from _truth import check

F64, F32 = torch.float64, torch.float32

CONFIGS = {
    "dcl": SSLConfig(),
    "hcl": SSLConfig(scales=(0.7, 1.7)),
    "hcl-beta0": SSLConfig(scales=(0.0, 1.0)),
    "three-scales-neg": SSLConfig(scales=(-0.5, 1.0, 2.5)),
    "mttv-both": SSLConfig(exclude_partner=False, filter="both", lower=0.1, upper=0.9),
    "mttv-both-self": SSLConfig(exclude_partner=False, include_self=True, filter="both", lower=0.1, upper=0.9),
    "mttv-low-self": SSLConfig(exclude_partner=False, include_self=True, filter="low", lower=0.2),
}
NAMES = ("lse", "pos", "pos_in")


def eng():
    return get_engine("cpu")


def _problem(N, D, dtype, seed=0, paired=False):
    """paired: partners in mutual pairs (i, i + N // 2), a few pairs without (-1), as two views give them: the
    CPU engine's fused backward tiles then apply (tests/test_symmetric_cpu_fused.py); else random partners."""
    g = torch.Generator().manual_seed(seed)
    X = F.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    if not paired:
        return X.to(dtype), torch.randint(-1, N, (N,), generator=g)  # -1: no positive
    h = N // 2
    partner = torch.full((N,), -1, dtype=torch.long)
    partner[:h] = torch.arange(h) + h
    partner[h:2 * h] = torch.arange(h)
    drop = torch.arange(0, h, 7)
    partner[drop] = -1
    partner[drop + h] = -1
    return X.to(dtype), partner


def _coefs(K, N, acc, seed):
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(K, N, generator=g, dtype=F64).to(acc)
    coef[:, ::5] = 0  # dead terms contribute exactly 0
    return coef, torch.randn(N, generator=g, dtype=F64).to(acc)


def _sym_fwd(X, partner, it, cfg):
    return eng().ssl_forward(X, X, partner, 0, it, cfg, symmetric=True)


def _sym_bwd(X, partner, it, cfg, lse, coef, cpos):
    dX, none = eng().ssl_backward(X, X, partner, 0, it, cfg, lse, coef, cpos, symmetric=True)
    assert none is None
    return dX


def _dense_bwd(X, partner, it, cfg, lse, coef, cpos):
    dA, dC = dense_backward(X, X, partner, 0, it, cfg, lse, coef, cpos)
    return dA + dC


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("N", [1, 2, 17, 65, 130])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_symmetric_ssl_contract_fp64(name, N, block, paired, monkeypatch):
    if block is not None:
        monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", str(block))
    cfg = CONFIGS[name]
    X, partner = _problem(N, 9, F64, seed=N, paired=paired)
    ref = dense_forward(X, X, partner, 0, 2.0, cfg)
    got = _sym_fwd(X, partner, 2.0, cfg)
    for n, a, b in zip(NAMES, got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, n
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=lambda m: f"{name} {n}: {m}")
    coef, cpos = _coefs(len(cfg.scales), N, F64, seed=N + 1)
    torch.testing.assert_close(_sym_bwd(X, partner, 2.0, cfg, ref.lse, coef, cpos),
                               _dense_bwd(X, partner, 2.0, cfg, ref.lse, coef, cpos), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_symmetric_ssl_contract_fp32(name, paired, monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    cfg = CONFIGS[name]
    X, partner = _problem(203, 24, F32, seed=3, paired=paired)
    check(lambda X: _sym_fwd(X, partner, 3.0, cfg), lambda X: dense_forward(X, X, partner, 0, 3.0, cfg), [X],
          grad=False, what=name, names=NAMES)
    lse = dense_forward(X.double(), X.double(), partner, 0, 3.0, cfg).lse.float()
    coef, cpos = _coefs(len(cfg.scales), 203, F32, seed=4)
    check(lambda X, lse, coef, cpos: _sym_bwd(X, partner, 3.0, cfg, lse, coef, cpos),
          lambda X, lse, coef, cpos: _dense_bwd(X, partner, 3.0, cfg, lse, coef, cpos),
          [X, lse, coef, cpos], grad=False, what=name, names=["dX"], value_floor=0)


def test_symmetric_ssl_matches_general_path(monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "24")
    X, partner = _problem(100, 7, F64, seed=9)
    for name, cfg in CONFIGS.items():
        sym = _sym_fwd(X, partner, 1.5, cfg)
        gen = eng().ssl_forward(X, X, partner, 0, 1.5, cfg)
        for n, a, b in zip(NAMES, sym, gen):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name} {n}: {m}")
        coef, cpos = _coefs(len(cfg.scales), 100, F64, seed=10)
        dA, dC = eng().ssl_backward(X, X, partner, 0, 1.5, cfg, gen.lse, coef, cpos)
        torch.testing.assert_close(_sym_bwd(X, partner, 1.5, cfg, gen.lse, coef, cpos), dA + dC,
                                   rtol=1e-12, atol=1e-12)


def test_symmetric_ssl_empty_and_poisoned_rows(monkeypatch):
    """Rows whose set is empty (lse = -inf, zero gradient) and rows that meet a NaN feature (lse NaN), as in the
    dense contract."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    X, partner = _problem(40, 6, F64, seed=12)
    # the filter drops every entry of a row whose cosines all lie outside [0.3, 0.35]: X[0] orthogonal to the rest
    X[0] = 0
    X[0, 0] = 1
    X[1:, 0] = 0
    X[1:] = F.normalize(X[1:], dim=1)
    cfg = SSLConfig(exclude_partner=False, filter="both", lower=0.3, upper=0.35)
    Xn = X.clone()
    Xn[7, 2] = math.nan
    for Z in (X, Xn):
        ref = dense_forward(Z, Z, partner, 0, 2.0, cfg)
        got = _sym_fwd(Z, partner, 2.0, cfg)
        for n, a, b in zip(NAMES, got, ref):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, equal_nan=True, msg=lambda m: f"{n}: {m}")
    assert torch.isneginf(_sym_fwd(X, partner, 2.0, cfg).lse[0, 0])  # row 0's set is empty
    assert torch.isnan(_sym_fwd(Xn, partner, 2.0, cfg).lse).all()  # every row meets row 7's NaN
    ref = dense_forward(X, X, partner, 0, 2.0, cfg)
    coef, cpos = _coefs(1, 40, F64, seed=13)
    torch.testing.assert_close(_sym_bwd(X, partner, 2.0, cfg, ref.lse, coef, cpos),
                               _dense_bwd(X, partner, 2.0, cfg, ref.lse, coef, cpos), rtol=1e-11, atol=1e-11)


def test_symmetric_ssl_bit_identical_for_any_thread_count(monkeypatch):
    """1, 2 and 5 threads (5 workers on 2 cores: the backward's per-block ordering is exercised)."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "64")
    X, partner = _problem(650, 130, F32, seed=5)
    old = torch.get_num_threads()
    res = {}
    try:
        for nt in (1, 2, 5):
            torch.set_num_threads(nt)
            for name in ("hcl", "mttv-both"):
                cfg = CONFIGS[name]
                st = _sym_fwd(X, partner, 1 / 0.2, cfg)
                coef, cpos = _coefs(len(cfg.scales), 650, F32, seed=6)
                res[(nt, name)] = tuple(st) + (_sym_bwd(X, partner, 1 / 0.2, cfg, st.lse, coef, cpos),)
    finally:
        torch.set_num_threads(old)
    for name in ("hcl", "mttv-both"):
        for nt in (2, 5):
            for a, b in zip(res[(1, name)], res[(nt, name)]):
                assert torch.equal(a, b), (name, nt)


def test_symmetric_ssl_op_checks_its_inputs():
    X, partner = _problem(10, 4, F64)
    args = (1.0, [1.0], True, False, 0, 0.0, 1.0)
    op = torch.ops.ltcl_fused
    with pytest.raises(RuntimeError, match="C to be A"):
        op.ssl_fwd(X, X.clone(), partner, 0, *args, [], True)
    with pytest.raises(RuntimeError, match="self_offset == 0"):
        op.ssl_fwd(X, X, partner, -1, *args, [], True)
    with pytest.raises(RuntimeError, match="Bayesian"):
        op.ssl_fwd(X, X, partner, 0, *args, [0.5, 1.0, 0.1], True)


# ------------------------------------------------------------------ losses: the path is taken, and right

LOSSES = [
    ("dcl", lambda z1, z2, E, b: lf.dcl(z1, z2, backend=b)),
    ("dcl_biased_sum", lambda z1, z2, E, b: lf.dcl(z1, z2, debiased=False, reduction="sum", backend=b)),
    ("hcl", lambda z1, z2, E, b: lf.hcl(z1, z2, beta=0.5, backend=b)),
    ("mttv", lambda z1, z2, E, b: lf.mttv(E, backend=b)),
    ("mttv_low_self", lambda z1, z2, E, b: lf.mttv(E, filter="low", official_self_term=True, lower=0.05,
                                                   reduction="none", backend=b)),
]


def test_losses_take_the_symmetric_path(monkeypatch):
    calls = spy_symmetric(monkeypatch, CPUEngine, "ssl")
    g = torch.Generator().manual_seed(2)
    z1, z2, E = (torch.randn(n, 8, generator=g).requires_grad_(True) for n in (12, 12, 24))
    for name, fn in LOSSES:
        calls.clear()
        fn(z1, z2, E, "cpu").sum().backward()
        assert calls == [("fwd", True), ("bwd", True, True)], name
    calls.clear()
    lf.bayesian_cl(z1, z2, backend="cpu").backward()  # the Bayesian weights: the general path
    assert calls == [("fwd", False), ("bwd", False, False)]


@pytest.mark.parametrize("B", [1, 2, 33])
@pytest.mark.parametrize("name,fn", LOSSES, ids=[c[0] for c in LOSSES])
def test_losses_vs_reference(name, fn, B, monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    g = torch.Generator().manual_seed(B)
    z1, z2 = torch.randn(B, 11, generator=g, dtype=F64), torch.randn(B, 11, generator=g, dtype=F64)
    E = torch.randn(2 * B, 11, generator=g, dtype=F64)
    out = {}
    for b in ("cpu", "reference"):
        ins = [t.clone().requires_grad_(True) for t in (z1, z2, E)]
        loss = fn(*ins, b)
        grads = torch.autograd.grad(loss.sum(), ins, allow_unused=True)
        out[b] = (loss.detach(),) + tuple(torch.zeros_like(t) if gr is None else gr for t, gr in zip(ins, grads))
    for a, r in zip(out["cpu"], out["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, equal_nan=True, msg=lambda m: f"{name}: {m}")
    if B > 1:  # fp32 against the fp64 truth
        check(lambda z1, z2, E: fn(z1, z2, E, "cpu"), lambda z1, z2, E: fn(z1, z2, E, "reference"),
              [z1.float(), z2.float(), E.float()], what=name)


def test_gradcheck_fp64_symmetric_ssl(monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "8")
    g = torch.Generator().manual_seed(11)
    z1 = (torch.randn(7, 5, generator=g, dtype=F64)).requires_grad_(True)
    z2 = (torch.randn(7, 5, generator=g, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lf.dcl(a, b, backend="cpu"), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: lf.hcl(a, b, beta=1.0, backend="cpu"), (z1, z2))
    E = torch.randn(14, 5, generator=g, dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: lf.mttv(e, filter="low", lower=0.05, backend="cpu"), (E,))
