"""The fused tiles of the C++ CPU engine's symmetric path (csrc/cpu/rowstats_cpu.cpp: sym_fused_fwd_tile,
sym_fused_tile; csrc/cpu/ssl_cpu.cpp: ssl_fused_tile, the self-supervised backward): one exponential per
element of S_IJ serves both row i and row j, no transposes.

LTCL_CPU_SYM_FUSED (read at every call): 1 (default) fused where the accuracy guards allow, 0 never (the
generic symmetric tiles), 2 as 1 but a tile that the guards send to the generic path raises. Expected values
come from the dense contract (engine/contract.py); fp32 is held to the fp64 truth (tests/_truth.py).
"""
import math

import pytest
import torch

from ltcl_fused.engine.contract import dense_backward, dense_forward

from _cpp import built, coefs, op  # noqa: F401 (built: the autouse fixture)
from _truth import check

NAMES = ["lse", "pos_sum", "fpos", "fneg", "upos", "uneg", "top", "lrest"]


def _data(kind, N, D, dtype, seed=0):
    """Features and labels of one kind of problem, and its 1/tau.

    normalized: unit rows, tau 0.1 (the training case); twins: rows in near-duplicate pairs, tau 0.05, so
    that every row's dominant column leads its tile (the rest is redone relative to its own max), with some
    far leads in the tiny-rest regime; unnormalized: randn features (norms ~ sqrt(D)), tau 0.3."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 5, (N,), generator=g)
    if kind == "normalized":
        return torch.nn.functional.normalize(X, dim=1).to(dtype), lab, 10.0
    if kind == "twins":
        X = torch.nn.functional.normalize(X, dim=1)
        X[1::2] = X[0::2][: N // 2] + 1e-3 * torch.randn(N // 2, D, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(X, dim=1).to(dtype), lab, 20.0
    return X.to(dtype), lab, 1 / 0.3


def _fwd(X, lab, it, focal, gamma=2.0):
    return op().rowstats_fwd(X, X, lab, lab, None, None, 0, it, gamma, focal, True)


def _bwd(X, lab, it, focal, st, co, gamma=2.0):
    return op().rowstats_bwd(X, X, lab, lab, None, None, 0, it, gamma, focal, st[0], st[6], st[7], *co, True)[0]


def _dense_bwd(X, lab, it, focal, lse, top, lrest, co, gamma=2.0):
    dA, dC = dense_backward(X, X, lab, lab, 0, it, None, None, gamma, focal, lse, top, lrest, *co)
    return dA + dC


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("kind", ["normalized", "twins", "unnormalized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,block", [(1, None), (2, None), (37, 16), (300, None), (301, 64)])
def test_fused_tiles_match_the_contract(kind, dtype, N, block, monkeypatch):
    """Forward and backward (focal or not) with the fused tiles against the dense contract."""
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "1")
    if block is not None:
        monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", str(block))
    X, lab, it = _data(kind, N, 24, dtype, seed=N)
    for focal in (False, True):
        what = f"{kind} N={N} block={block} {dtype} focal={focal}"
        ref = dense_forward(X, X, lab, lab, 0, it, None, None, 2.0, focal)
        if dtype == torch.float64:
            got = _fwd(X, lab, it, focal)
            for name, g_, r_ in zip(NAMES, got, ref):
                if name == "top":
                    assert torch.equal(g_, r_), what
                else:
                    assert torch.allclose(g_, r_, rtol=1e-10, atol=1e-11), f"{what} {name}: {_rel(g_, r_):.3g}"
        else:
            check(lambda X: _fwd(X, lab, it, focal), lambda X: dense_forward(X, X, lab, lab, 0, it, None, None, 2.0,
                                                                              focal),
                  [X], grad=False, what=what, names=NAMES)
        lse, top, lrest = ref[0], ref[6], ref[7]
        co = coefs(N, lse.dtype, seed=N)
        if dtype == torch.float64:
            got = _bwd(X, lab, it, focal, ref, co)
            want = _dense_bwd(X, lab, it, focal, lse, top, lrest, co)
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-10), f"{what} dX: {_rel(got, want):.3g}"
        else:
            check(lambda X, lse, lrest, *co: op().rowstats_bwd(X, X, lab, lab, None, None, 0, it, 2.0, focal, lse, top,
                                                               lrest, *co, True)[0],
                  lambda X, lse, lrest, *co: _dense_bwd(X, lab, it, focal, lse, top, lrest, co),
                  [X, lse, lrest, *co], grad=False, what=what, names=["dX"], value_floor=0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0, 17.0])
@pytest.mark.parametrize("no_neg", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["normalized", "twins"])
def test_fused_backward_focal_positives(kind, gamma, no_neg, dtype, monkeypatch):
    """The focal positives' terms cpos + cposf u+ of both sides, now in the fused tile's vector loop (pos_u:
    repeated squaring for an integer gamma in [1, 16], exp(gamma log1p(-p)) otherwise, -1 at gamma = 0), with
    and without negative terms (cneg = 0 takes the tile's no-negatives formula), against the dense contract;
    LTCL_CPU_SYM_FUSED=2, so the fused tile is what ran. Few classes: many positives per tile; normalized:
    positives with p up to ~0.3 (where u+ depends on gamma), twins: dominant columns (their scalar entries)."""
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    X, lab, it = _data(kind, 203, 24, dtype, seed=11)
    lab = lab % 3
    st = op().rowstats_fwd(X, X, lab, lab, None, None, 0, it, gamma, True, True)
    co = coefs(203, st[0].dtype, seed=12)
    if no_neg:
        co[2] = torch.zeros_like(co[2])

    def fused(X, lse, lrest, *co):
        return op().rowstats_bwd(X, X, lab, lab, None, None, 0, it, gamma, True, lse, st[6], lrest, *co, True)[0]

    def dense(X, lse, lrest, *co):
        return _dense_bwd(X, lab, it, True, lse, st[6], lrest, co, gamma=gamma)

    if dtype == torch.float64:
        got, want = fused(X, st[0], st[7], *co), dense(X, st[0], st[7], *co)
        assert _rel(got, want) < 1e-11, f"gamma={gamma}: {_rel(got, want):.3g}"
    else:
        check(fused, dense, [X, st[0], st[7], *co], grad=False, what=f"gamma={gamma} no_neg={no_neg}", names=["dX"],
              value_floor=0)


@pytest.mark.parametrize("kind", ["normalized", "twins"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_tiles_are_what_runs(kind, dtype, monkeypatch):
    """LTCL_CPU_SYM_FUSED=2: no tile of these problems falls back (so the test above checked the fused code).
    fp64: the result equals the generic tiles' (LTCL_CPU_SYM_FUSED=0) to 1e-12; fp32: it keeps to the fp64 truth
    (tests/_truth.py); top is the generic tiles' bit for bit (the same logits) in both."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    X, lab, it = _data(kind, 150, 16, dtype, seed=7)
    co = coefs(150, torch.float64 if dtype == torch.float64 else torch.float32, seed=2)
    for focal in (False, True):
        what = f"{kind} {dtype} focal={focal}"
        res = {}
        for mode in ("2", "0"):
            monkeypatch.setenv("LTCL_CPU_SYM_FUSED", mode)
            st = _fwd(X, lab, it, focal)
            res[mode] = (st, _bwd(X, lab, it, focal, st, co))
        (s2, d2), (s0, d0) = res["2"], res["0"]
        assert torch.equal(s2[6], s0[6]), what
        monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
        if dtype == torch.float64:
            for name, a, b in zip(NAMES, s2, s0):
                if name != "top":
                    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"{what} {name}"
            assert _rel(d2, d0) < 1e-12, f"{what} dX: {_rel(d2, d0):.3g}"
            continue
        check(lambda X: _fwd(X, lab, it, focal),
              lambda X: dense_forward(X, X, lab, lab, 0, it, None, None, 2.0, focal), [X], grad=False, what=what,
              names=NAMES)
        top = s2[6]
        check(lambda X, lse, lrest, *co: op().rowstats_bwd(X, X, lab, lab, None, None, 0, it, 2.0, focal, lse, top,
                                                           lrest, *co, True)[0],
              lambda X, lse, lrest, *co: _dense_bwd(X, lab, it, focal, lse, top, lrest, co),
              [X, s2[0], s2[7], *co], grad=False, what=what, names=["dX"], value_floor=0)


@pytest.mark.parametrize("case", ["lse_spread", "large_lse", "nan"])
def test_fused_guards_send_tiles_to_the_generic_path(case, monkeypatch):
    """Inputs the fused tiles cannot take as accurately: under LTCL_CPU_SYM_FUSED=2 they raise (the guard
    trips), under the default they give the contract's answer through the generic tiles."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    X, lab, it = _data("normalized", 40, 8, torch.float32, seed=3)
    if case == "lse_spread":  # rows near 7 e1 (lse ~ 53) and one at -5 e1 (lse ~ -31): a spread above the fp32
        X = 7.0 * torch.nn.functional.normalize(X * 0.01 + torch.eye(8)[0], dim=1)  # guard's 80, |lse| < 64
        X[5] = -5.0 * torch.eye(8)[0]
        it = 1.0
    elif case == "large_lse":  # |lse| ~ 140 > 64 (the fp32 guard)
        X = X * 4.0
    else:
        X[11, 3] = math.nan
    focal = case != "nan"  # (the backward guards: any loss; the forward's NaN guard: not focal)
    co = coefs(40, torch.float32, seed=5)
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
    why = {"lse_spread": "lse too far apart", "large_lse": "large lse", "nan": "NaN"}[case]
    with pytest.raises(RuntimeError, match=f"fell back.*{why}"):
        if case == "nan":
            _fwd(X, lab, it, focal)
        else:
            _bwd(X, lab, it, focal, _fwd(X, lab, it, focal), co)
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "1")
    st = _fwd(X, lab, it, focal)
    ref = dense_forward(X.double(), X.double(), lab, lab, 0, it, None, None, 2.0, focal)
    assert torch.equal(st[6], ref[6])
    if case == "nan":
        for name, g_, r_ in zip(NAMES, st, ref):
            if name in ("lse", "lrest", "pos_sum"):
                assert torch.equal(torch.isnan(g_), torch.isnan(r_)), name
        assert torch.isnan(st[0]).all()  # every row meets the NaN row as a column
        return
    got = _bwd(X, lab, it, focal, st, co).double()
    want = _dense_bwd(X.double(), lab, it, focal, st[0].double(), st[6], st[7].double(), [c.double() for c in co])
    assert _rel(got, want) < 1e-4, f"{case}: {_rel(got, want):.3g}"


def test_fused_tiles_bit_identical_for_any_thread_count(monkeypatch):
    """1, 2 and 5 threads (5 workers on this 2-core machine: tiles finish out of ticket order, so the backward's
    per-block ordering (strip::BlockOrder) has to hold contributions back) give the same bits."""
    monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "48")
    X, lab, it = _data("twins", 410, 40, torch.float32, seed=9)
    co = coefs(410, torch.float32)
    old = torch.get_num_threads()
    res = []
    try:
        for nt in (1, 2, 5):
            torch.set_num_threads(nt)
            out = []
            for focal in (False, True):
                st = _fwd(X, lab, it, focal)
                out += list(st) + [_bwd(X, lab, it, focal, st, co)]
            res.append(out)
    finally:
        torch.set_num_threads(old)
    for other in res[1:]:
        for a, b in zip(res[0], other):
            assert torch.equal(a, b)


def test_fused_tile_error_in_one_worker_raises_and_releases_the_others(monkeypatch):
    """A tile that raises inside one worker (here: the guard under LTCL_CPU_SYM_FUSED=2, on one tile only)
    while other workers wait for that tile's contribution to their blocks: the call raises, it does not hang,
    and the next call runs normally."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "16")
    X, lab, it = _data("normalized", 200, 8, torch.float32, seed=3)
    X[150:] *= 40.0  # rows 150.. (the last tiles) have |lse| far above the fp32 guard: those tiles raise
    co = coefs(200, torch.float32, seed=5)
    st = _fwd(X, lab, it, True)
    old = torch.get_num_threads()
    try:
        for nt in (2, 5):
            torch.set_num_threads(nt)
            monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
            with pytest.raises(RuntimeError, match="fell back.*large lse"):
                _bwd(X, lab, it, True, st, co)
            monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "1")
            got = _bwd(X, lab, it, True, st, co).double()
            want = _dense_bwd(X.double(), lab, it, True, st[0].double(), st[6], st[7].double(),
                              [c.double() for c in co])
            assert _rel(got, want) < 1e-4
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssl_fused_backward_is_what_runs(dtype, monkeypatch):
    """The self-supervised backward (every SSL configuration, partners in pairs): LTCL_CPU_SYM_FUSED=2 raises
    for no tile; fp64 equals the generic tiles' (=0) to 1e-12, fp32 keeps to the fp64 truth. With unpaired
    partners the fused tiles are not used at all (=2 does not raise either: a property of the problem, not a
    tile guard)."""
    from ltcl_fused.backends import get_engine
    from ltcl_fused.engine.ssl_contract import dense_backward as ssl_dense_backward
    from test_symmetric_cpu_ssl import CONFIGS, _coefs, _problem
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    eng = get_engine("cpu")
    for name, cfg in CONFIGS.items():
        for paired in (True, False):
            what = f"{name} paired={paired} {dtype}"
            X, partner = _problem(150, 12, dtype, seed=11, paired=paired)
            lse = eng.ssl_forward(X, X, partner, 0, 3.0, cfg, symmetric=True).lse
            coef, cpos = _coefs(len(cfg.scales), 150, lse.dtype, seed=12)

            def fused(X, lse, coef, cpos):
                return eng.ssl_backward(X, X, partner, 0, 3.0, cfg, lse, coef, cpos, symmetric=True)[0]

            monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "0")
            generic = fused(X, lse, coef, cpos)
            monkeypatch.setenv("LTCL_CPU_SYM_FUSED", "2")
            if dtype == torch.float64:
                got = fused(X, lse, coef, cpos)
                assert _rel(got, generic) < 1e-12, f"{what}: {_rel(got, generic):.3g}"
                continue
            check(fused, lambda X, lse, coef, cpos: sum(ssl_dense_backward(X, X, partner, 0, 3.0, cfg, lse, coef, cpos)),
                  [X, lse, coef, cpos], grad=False, what=what, names=["dX"], value_floor=0)


def test_fused_tiles_exp_within_two_ulp():
    """The fused loops' vector exp (strip::vexp: an inline polynomial for fp32 on AVX-512, Sleef otherwise)
    against fp64 exp rounded to fp32: at most 2 ulp on a dense sample of [-87.3, 88.7], and the edges."""
    import numpy as np
    x = torch.cat([torch.linspace(-87.3, 88.7, 2_000_003), torch.linspace(-1, 1, 1_000_001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.72, -87.33])]).float()
    got = op()._vexp(x)
    want = torch.exp(x.double()).float()
    ulp = torch.from_numpy(np.spacing(np.abs(want.numpy())))
    err = ((got.double() - want.double()).abs() / ulp.double()).max().item()
    assert err <= 2.0, f"max error {err:.2f} ulp"
    edge = op()._vexp(torch.tensor([-math.inf, -1000.0, -88.0, math.inf, 1000.0, math.nan]))
    assert edge[0] == 0 and edge[1] == 0 and 0 <= edge[2] < 1e-37
    assert edge[3] == math.inf and edge[4] == math.inf and math.isnan(edge[5])
