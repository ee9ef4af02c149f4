"""The C++ CPU engine above the symmetric forward's size limit (csrc/cpu/strip_common.h, sym_fwd_fits: its
per-(row, column block) partials grow as N^2 / b, so from N ~ 40000 fp32 the forward is the general one) keeps
the symmetric backward (sym_bwd_block: no per-block state, any number of tiles): 2.5 GEMM-equivalents per step
instead of the general path's 4. LTCL_CPU_SYM_FWD_BYTES=1 (read at every call) puts small problems in that mode.

Which kernels ran is proven by bits: the forward then equals the general forward exactly, and the backward the
symmetric backward of the same tile size (and not the general dA + dC). Losses against the reference in fp64
and against the fp64 truth in fp32, the dominant column at a large lead, bit-identical for any thread count.
"""
import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused.backends import get_engine
from ltcl_fused.engine.ssl_contract import SSLConfig

from _cpp import assert_cpu_matches_reference, built, coefs, op  # noqa: F401 (built: the autouse fixture)
from _truth import check

LARGE_N_MODE = ("LTCL_CPU_SYM_FWD_BYTES", "1")


def _problem(N=150, D=9, dtype=torch.float64, seed=0, n_cls=4):
    g = torch.Generator().manual_seed(seed)
    X = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return X, torch.randint(0, n_cls, (N,), generator=g)


@pytest.mark.parametrize("focal,gamma", [(False, 0.0), (True, 2.0), (True, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rowstats_kernels_that_run(focal, gamma, dtype, monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")  # five tiles a side
    X, lab = _problem(dtype=dtype)
    it = 1 / 0.3
    general = op().rowstats_fwd(X, X, lab, lab, None, None, 0, it, gamma, focal, False)
    symmetric = op().rowstats_fwd(X, X, lab, lab, None, None, 0, it, gamma, focal, True)
    monkeypatch.setenv(*LARGE_N_MODE)
    large = op().rowstats_fwd(X, X, lab, lab, None, None, 0, it, gamma, focal, True)
    for a, b in zip(large, general):
        assert torch.equal(a, b), "the forward above the limit is not the general forward"
    assert any(not torch.equal(a, b) for a, b in zip(symmetric, general)), "the two forwards are not told apart"
    lse, _, _, _, _, _, top, lrest = general
    co = coefs(X.shape[0], lse.dtype, seed=1)
    dX_large, _ = op().rowstats_bwd(X, X, lab, lab, None, None, 0, it, gamma, focal, lse, top, lrest, *co, True)
    monkeypatch.delenv(LARGE_N_MODE[0])
    dX_sym, _ = op().rowstats_bwd(X, X, lab, lab, None, None, 0, it, gamma, focal, lse, top, lrest, *co, True)
    dA, dC = op().rowstats_bwd(X, X, lab, lab, None, None, 0, it, gamma, focal, lse, top, lrest, *co, False)
    assert torch.equal(dX_large, dX_sym), "the backward above the limit is not the symmetric backward"
    assert not torch.equal(dX_large, dA + dC)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dX_large, dA + dC, **tol)


def test_ssl_kernels_that_run(monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    X, _ = _problem(N=140, D=7, seed=2)
    partner = torch.cat([torch.arange(70, 140), torch.arange(70)])
    cfg, eng = SSLConfig(scales=(0.7, 1.7)), get_engine("cpu")
    general = eng.ssl_forward(X, X, partner, 0, 2.0, cfg)
    monkeypatch.setenv(*LARGE_N_MODE)
    large = eng.ssl_forward(X, X, partner, 0, 2.0, cfg, symmetric=True)
    for a, b in zip(large, general):
        assert torch.equal(a, b)
    coef = torch.randn(general.lse.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cpos = torch.ones(140, dtype=torch.float64)
    dX_large, _ = eng.ssl_backward(X, X, partner, 0, 2.0, cfg, general.lse, coef, cpos, symmetric=True)
    monkeypatch.delenv(LARGE_N_MODE[0])
    dX_sym, _ = eng.ssl_backward(X, X, partner, 0, 2.0, cfg, general.lse, coef, cpos, symmetric=True)
    dA, dC = eng.ssl_backward(X, X, partner, 0, 2.0, cfg, general.lse, coef, cpos)
    assert torch.equal(dX_large, dX_sym) and not torch.equal(dX_large, dA + dC)
    torch.testing.assert_close(dX_large, dA + dC, rtol=1e-9, atol=1e-11)


LOSSES = [
    ("supcon", lambda x, y, b: lf.supcon(x, y, temperature=0.2, backend=b)),
    ("afcl", lambda x, y, b: lf.afcl(x, y, gamma=2.0, eta=5.0, temperature=0.2, backend=b)),
    ("fcl_g05", lambda x, y, b: lf.fcl(x, y, gamma=0.5, temperature=0.2, backend=b)),
    ("bcl", lambda x, y, b: lf.bcl(x, y, F.normalize(torch.ones(4, x.shape[-1], dtype=x.dtype) + torch.eye(
        4, x.shape[-1], dtype=x.dtype), dim=1), temperature=0.2, backend=b)),
    ("dcl", lambda x, y, b: lf.dcl(x[:, 0], x[:, 1], backend=b)),
    ("hcl", lambda x, y, b: lf.hcl(x[:, 0], x[:, 1], beta=1.0, backend=b)),
    ("mttv", lambda x, y, b: lf.mttv(x.reshape(-1, x.shape[-1]), backend=b)),
]


@pytest.mark.parametrize("name,fn", LOSSES, ids=[c[0] for c in LOSSES])
def test_losses_vs_reference(name, fn, monkeypatch):
    monkeypatch.setenv(*LARGE_N_MODE)
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    g = torch.Generator().manual_seed(5)
    x0 = F.normalize(torch.randn(45, 2, 12, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, 4, (45,), generator=g)
    assert_cpu_matches_reference(fn, x0, y, name, atol=1e-11)
    check(lambda x: fn(x, y, "cpu"), lambda x: fn(x, y, "reference"), [x0.float()], what=name)


def test_dominant_column_at_a_large_lead(monkeypatch):
    """A row whose own other view leads every column by ~2000 nats (tau = 1e-3): the backward recomputes the
    logits with other GEMMs than the general forward's, and still meets the fp64 truth in fp32."""
    monkeypatch.setenv(*LARGE_N_MODE)
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    g = torch.Generator().manual_seed(9)
    base = F.normalize(torch.randn(40, 16, generator=g, dtype=torch.float64), dim=1)
    x0 = torch.stack([base, F.normalize(base + 0.05 * torch.randn(40, 16, generator=g, dtype=torch.float64),
                                        dim=1)], dim=1)
    y = torch.arange(40) % 5
    fn = lambda x: lf.afcl(x, y, gamma=2.0, eta=5.0, temperature=1e-3, backend="cpu")  # noqa: E731
    ref = lambda x: lf.afcl(x, y, gamma=2.0, eta=5.0, temperature=1e-3, backend="reference")  # noqa: E731
    check(fn, ref, [x0.float()], what="afcl lead")


def test_bit_identical_for_any_thread_count(monkeypatch):
    monkeypatch.setenv(*LARGE_N_MODE)
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    g = torch.Generator().manual_seed(4)
    x0 = F.normalize(torch.randn(90, 2, 10, generator=g), dim=-1)
    y = torch.randint(0, 6, (90,), generator=g)
    prev = torch.get_num_threads()
    res = []
    try:
        for t in (1, 2, 5):
            torch.set_num_threads(t)
            x = x0.clone().requires_grad_(True)
            loss = lf.afcl(x, y, gamma=2.0, eta=5.0, backend="cpu")
            loss.backward()
            res.append((loss.detach(), x.grad))
    finally:
        torch.set_num_threads(prev)
    for r in res[1:]:
        assert torch.equal(r[0], res[0][0]) and torch.equal(r[1], res[0][1])
