"""The SSL row-statistics contract: the dense oracle against hand-worked values, its backward against
autograd/gradcheck, and the chunked "torch" engine against the oracle (several row blocks, ties, filters)."""
import math

import pytest
import torch

from ltcl_fused.backends import ssl_torch
from ltcl_fused.engine.ssl_contract import (DenseSSLEngine, SSLConfig, bayes_omega, dense_backward, dense_forward,
                                            ssl_row_stats)

from _truth import check


def _omega_py(u, alpha, beta, tau_plus):
    """ω(u) straight from SPEC.md section 5 in Python floats (independent of the torch code)."""
    tm = 1 - tau_plus
    a = (1 - 2 * alpha) * (tm - tau_plus) + 1e-3
    b = 2 * (alpha * tm + (1 - alpha) * tau_plus)
    x = (-b + math.sqrt(b * b + 4 * a * u)) / (2 * a)
    p1, p2 = 2 * (1 - x), 2 * x
    tn = alpha * p1 + (1 - alpha) * p2
    fn = (1 - alpha) * p1 + alpha * p2
    htn = (alpha * (1 - beta) * p1 + (1 - alpha) * beta * p2) / (alpha * (1 - beta) + (1 - alpha) * beta + 1e-3)
    return htn / (tm * tn + tau_plus * fn)


def test_bayes_omega_matches_the_formula():
    u = torch.linspace(0.01, 1.0, 17, dtype=torch.float64)
    for ab in [(0.5, 1.0), (0.7, 0.6), (1.0, 0.5), (0.9, 0.9)]:
        got = bayes_omega(u, *ab, 0.1)
        want = torch.tensor([_omega_py(float(x), *ab, 0.1) for x in u], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hand_worked_bayes_ranks_with_ties():
    # one anchor (D = 1, value 1) against columns 1, 2, 2, 3 (the set) and 5 (the partner, excluded)
    A = torch.tensor([[1.0]], dtype=torch.float64)
    C = torch.tensor([[1.0], [2.0], [2.0], [3.0], [5.0]], dtype=torch.float64)
    partner = torch.tensor([4])
    ab = (0.6, 0.8, 0.2)
    u = [0.25, 0.75, 0.75, 1.0]  # ties count as <=: both 2's see three values <= 2
    want = math.log(sum(_omega_py(x, *ab) * math.exp(s) for x, s in zip(u, [1.0, 2.0, 2.0, 3.0])))
    cfg = SSLConfig(bayes=ab)
    for eng in (DenseSSLEngine(), ssl_torch.get_engine()):
        st = eng.ssl_forward(A, C, partner, -1, 1.0, cfg)
        assert st.lse.shape == (1, 1)
        assert abs(float(st.lse[0, 0]) - want) < 1e-12
        assert float(st.pos[0]) == 5.0 and float(st.pos_in[0]) == 0.0


def test_hand_worked_scales_filter_and_self():
    # anchor 0 of X = [[1,0],[0.5,0],[0.95,0],[0.05,0]] (A = C = X): raw dots 1, .5, .95, .05
    X = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.95, 0.0], [0.05, 0.0]], dtype=torch.float64)
    partner = torch.tensor([1, 0, 3, 2])
    # filter "both" [0.1, 0.9] keeps only 0.5 (1 is self and > 0.9, 0.95 > 0.9, 0.05 < 0.1)
    cfg = SSLConfig(scales=(1.0, 2.0), exclude_partner=False, filter="both", lower=0.1, upper=0.9)
    st = dense_forward(X, X, partner, 0, 2.0, cfg)
    assert abs(float(st.lse[0, 0]) - 1.0) < 1e-12 and abs(float(st.lse[1, 0]) - 2.0) < 1e-12
    assert float(st.pos[0]) == 1.0 and float(st.pos_in[0]) == 1.0
    # filter "low" with the self column included: 1, .5, .95 kept
    cfg = SSLConfig(exclude_partner=False, include_self=True, filter="low", lower=0.1)
    st = dense_forward(X, X, partner, 0, 1.0, cfg)
    assert abs(float(st.lse[0, 0]) - math.log(math.exp(1) + math.exp(0.5) + math.exp(0.95))) < 1e-12
    # negatives only (DCL shape): partner and self removed
    st = dense_forward(X, X, partner, 0, 1.0, SSLConfig())
    assert abs(float(st.lse[0, 0]) - math.log(math.exp(0.95) + math.exp(0.05))) < 1e-12
    assert float(st.pos_in[0]) == 0.0


CONFIGS = {
    "neg": SSLConfig(),
    "hcl": SSLConfig(scales=(0.7, 1.7)),
    "hcl-beta0": SSLConfig(scales=(0.0, 1.0)),
    "bayes": SSLConfig(bayes=(0.5, 1.0, 0.1)),
    "bayes-a8b6": SSLConfig(bayes=(0.8, 0.6, 0.3)),
    "mttv-both": SSLConfig(exclude_partner=False, filter="both", lower=0.1, upper=0.9),
    "mttv-low-self": SSLConfig(exclude_partner=False, include_self=True, filter="low", lower=0.2),
}


def _problem(N, D, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: every dot product is exact, so equal columns tie exactly in every row
        base = torch.randint(-2, 3, (max(1, N // 3), D), generator=g).to(dtype) / 2
        X = base[torch.randint(0, base.shape[0], (N,), generator=g)]  # repeated rows: repeated columns
    else:
        X = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    rows = torch.arange(N)
    partner = (rows + N // 2) % N if N % 2 == 0 else torch.where(rows < N - 1, rows + 1, -1)
    return X, partner


@pytest.mark.parametrize("name", list(CONFIGS))
def test_function_backward_is_the_gradient_of_the_oracle(name):
    """gradcheck of the autograd wrapper driven by the dense oracle: backward contract == true gradient."""
    cfg = CONFIGS[name]
    X, partner = _problem(6, 3, torch.float64, seed=1)
    A = X.clone().requires_grad_(True)
    C = (X.flip(0) * 0.8).requires_grad_(True)  # (0.9 would sit on the MTTV threshold)
    eng = DenseSSLEngine()

    def f(A, C):
        st = ssl_row_stats(eng, A, C, partner, self_offset=0, inv_tau=2.0, cfg=cfg)
        return st.lse, st.pos

    assert torch.autograd.gradcheck(f, (A, C), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("N,D,block", [(1, 3, 1 << 20), (2, 5, 1), (37, 17, 100), (130, 8, 1000)])
def test_chunked_engine_matches_oracle(name, N, D, block, monkeypatch):
    monkeypatch.setattr(ssl_torch, "BLOCK_ELEMENTS", block)  # several row blocks, ragged last block
    cfg = CONFIGS[name]
    X, partner = _problem(N, D, torch.float64, seed=N)
    C = X * 1.3
    eng = ssl_torch.get_engine()
    for self_offset in (0, -1):
        got = eng.ssl_forward(X, C, partner, self_offset, 1.7, cfg)
        want = dense_forward(X, C, partner, self_offset, 1.7, cfg)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        K = len(cfg.scales)
        g = torch.Generator().manual_seed(5)
        coef = torch.randn(K, N, generator=g, dtype=torch.float64)
        coef[:, ::3] = 0.0  # rows whose coefficient is 0 contribute exactly nothing
        cpos = torch.randn(N, generator=g, dtype=torch.float64)
        dA, dC = eng.ssl_backward(X, C, partner, self_offset, 1.7, cfg, want.lse, coef, cpos)
        eA, eC = dense_backward(X, C, partner, self_offset, 1.7, cfg, want.lse, coef, cpos)
        torch.testing.assert_close(dA, eA, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dC, eC, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["bayes", "bayes-a8b6", "mttv-low-self"])
def test_chunked_engine_exact_ties(name, monkeypatch):
    monkeypatch.setattr(ssl_torch, "BLOCK_ELEMENTS", 64)
    cfg = CONFIGS[name]
    X, partner = _problem(24, 4, torch.float64, ties=True)
    s = X @ X.T
    assert all(len(torch.unique(r)) < len(r) - 2 for r in s)  # every row has ties
    want = dense_forward(X, X, partner, 0, 2.0, cfg)
    got = ssl_torch.get_engine().ssl_forward(X, X, partner, 0, 2.0, cfg)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-13, atol=1e-13)
    # fp32: the dots of half-integers are exact there too, so the ranks (and ties) are the same
    check(lambda A, C: ssl_torch.get_engine().ssl_forward(A, C, partner, 0, 2.0, cfg),
          lambda A, C: dense_forward(A, C, partner, 0, 2.0, cfg), [X.float(), X.float()], grad=False,
          names=("lse", "pos", "pos_in"))


def test_empty_sets_and_zero_weights_give_no_nan():
    X, partner = _problem(2, 3, torch.float64)  # each row: self + partner only -> empty negative set
    for cfg in (SSLConfig(), SSLConfig(bayes=(1.0, 1.0, 0.1))):
        for eng in (DenseSSLEngine(), ssl_torch.get_engine()):
            st = eng.ssl_forward(X, X, partner, 0, 1.0, cfg)
            assert torch.isneginf(st.lse).all()
            dA, dC = eng.ssl_backward(X, X, partner, 0, 1.0, cfg, st.lse, torch.ones_like(st.lse),
                                      torch.zeros_like(st.pos))
            assert (dA == 0).all() and (dC == 0).all()
    # α = β = 1 makes ω ≡ 0 on a non-empty set: lse = −inf, gradient exactly 0
    X, partner = _problem(8, 3, torch.float64)
    st = ssl_torch.get_engine().ssl_forward(X, X, partner, 0, 1.0, SSLConfig(bayes=(1.0, 1.0, 0.1)))
    assert torch.isneginf(st.lse).all()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="filter"):
        SSLConfig(filter="high")
    with pytest.raises(ValueError, match="scales"):
        SSLConfig(scales=())
    with pytest.raises(ValueError, match="one scale"):
        SSLConfig(scales=(1.0, 2.0), bayes=(0.5, 1.0, 0.1))


def test_bayes_omega_is_stable_in_fp32_at_the_defaults():
    # α = 0.5, β = 1 make a = 1e-3: the textbook root (−b + sqrt(b² + 4au))/(2a) loses ~40 % at u = 1e-4 in
    # fp32; the equal 2u/(b + sqrt(b² + 4au)) keeps fp32 rounding. Truth: the formula in Python floats (fp64).
    from ltcl_fused import reference as R
    u = torch.tensor([1e-4, 1e-3, 3e-2, 0.25, 0.5, 1.0])
    for ab in [(0.5, 1.0), (0.5, 0.5), (0.75, 0.9)]:
        want = torch.tensor([_omega_py(float(x), *ab, 0.1) for x in u.double()], dtype=torch.float64)
        for got in (bayes_omega(u, *ab, 0.1), R.bayesian_weights(u, alpha=ab[0], beta=ab[1], tau_plus=0.1)):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
