"""The fused forward tile of the C++ CPU engine's self-supervised symmetric path (csrc/cpu/ssl_cpu.cpp:
ssl_fused_fwd_tile): the partial log-sum-exps of the rows of I over J and of the rows of J over I from one
exponential per element and scale of S_IJ (reference rho_k = c_k max s of the tile), a side whose sum falls
below `tiny` redone relative to its own max.

LTCL_CPU_SYM_FUSED: 1 (default) fused where it applies, 0 never, 2 as 1 but a tile sent to the generic code
raises. Expected values come from the dense SSL contract (engine/ssl_contract.py dense_forward); fp32 is held to
the fp64 truth (tests/_truth.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ltcl_fused.backends import get_engine
from ltcl_fused.engine.ssl_contract import SSLConfig, dense_forward

from _cpp import built  # noqa: F401 (the autouse fixture)
from _truth import check
from test_symmetric_cpu_ssl import CONFIGS, NAMES, _problem

F64, F32 = torch.float64, torch.float32


def _fwd(X, partner, it, cfg):
    return get_engine("cpu").ssl_forward(X, X, partner, 0, it, cfg, symmetric=True)


def _expect(X, partner, it, cfg, what):
    """fp64: the dense contract to 1e-11; fp32: the fp64 truth (tests/_truth.py)."""
    if X.dtype == F64:
        ref = dense_forward(X, X, partner, 0, it, cfg)
        for n, a, b in zip(NAMES, _fwd(X, partner, it, cfg), ref):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=lambda m: f"{what} {n}: {m}")
        return
    check(lambda X: _fwd(X, partner, it, cfg), lambda X: dense_forward(X, X, partner, 0, it, cfg), [X],
          grad=False, what=what, names=NAMES)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("N,block", [(1, None), (2, None), (37, 16), (150, 32), (301, 64)])
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ssl_fused_forward_matches_the_contract(name, paired, N, block, dtype, monkeypatch):
    """Every SSL configuration (one to three scales, negative and zero ones, the filters, self in or out,
    the partner in or out), partners random or in pairs, shapes off the block and vector sizes; =2: no tile
    falls back."""
    if block is not None:
        monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", str(block))
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
    X, partner = _problem(N, 11, dtype, seed=N + 7, paired=paired)
    _expect(X, partner, 3.0, CONFIGS[name], f"{name} paired={paired} N={N} {dtype}")


def test_ssl_fused_forward_is_what_runs(monkeypatch):
    """The fused tile rounds differently from the generic one (=0): some lse differs in its last bits, all
    stay within the fp32 truth's tolerance (the test above)."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    X, partner = _problem(150, 11, F32, seed=3, paired=True)
    for name in ("dcl", "hcl", "mttv-both"):
        monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "0")
        generic = _fwd(X, partner, 3.0, CONFIGS[name]).lse
        monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "1")
        fused = _fwd(X, partner, 3.0, CONFIGS[name]).lse
        assert not torch.equal(fused, generic), name


def _far_rows(N, D, it, seed):
    """Rows of norm 1 and of norm 0.05 mixed: on a tile holding both, the reference rho of the large rows lies
    far above every term of the small ones (their sums would underflow against it: they are redone)."""
    g = torch.Generator().manual_seed(seed)
    X = F.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    X[N // 8:N // 4] = X[:N // 8] + 1e-2 * torch.randn(N // 4 - N // 8, D, generator=g, dtype=F64)  # near twins
    X = F.normalize(X, dim=1)
    small = torch.arange(N) % 3 == 2
    X[small] *= 0.05
    return X, torch.randint(-1, N, (N,), generator=g)


def _largest_gap(X, it, block, c):
    """Over the tiles, the largest gap between the tile's reference c max s (self left out) and a row's or a
    column's own largest term c s: the regime the redo covers lies beyond ~46 (fp32) / ~460 (fp64) nats."""
    S = c * it * (X @ X.T)
    S.fill_diagonal_(-math.inf)
    gap, N = 0.0, X.shape[0]
    for r0 in range(0, N, block):
        for c0 in range(0, N, block):
            t = S[r0:r0 + block, c0:c0 + block]
            rho = t.max()
            gap = max(gap, (rho - t.max(1).values).max().item(), (rho - t.max(0).values).max().item())
    return gap


@pytest.mark.parametrize("dtype,it", [(F32, 120.0), (F64, 1200.0)])
@pytest.mark.parametrize("name", ["dcl", "hcl", "three-scales-neg", "mttv-low-self"])
def test_ssl_fused_forward_redoes_sums_far_below_the_tile(name, dtype, it, monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
    X, partner = _far_rows(160, 10, it, seed=21)
    cfg = CONFIGS[name]
    assert _largest_gap(X, it, 32, max(cfg.scales)) > (60 if dtype == F32 else 600)  # the regime is reached
    _expect(X.to(dtype), partner, it, cfg, f"{name} far rows {dtype}")


def test_ssl_fused_forward_declines_a_nan_tile(monkeypatch):
    """A NaN dot product: the tile goes to the generic code (=2 says so; =1 gives the contract's NaN rows)."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    X, partner = _problem(40, 6, F64, seed=12)
    X[7, 2] = math.nan
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
    with pytest.raises(RuntimeError, match="LTCL_CPU_SYM_FUSED=2 and a fused symmetric tile fell back"):
        _fwd(X, partner, 2.0, SSLConfig())
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "1")
    torch.testing.assert_close(_fwd(X, partner, 2.0, SSLConfig()).lse,
                               dense_forward(X, X, partner, 0, 2.0, SSLConfig()).lse, equal_nan=True)
