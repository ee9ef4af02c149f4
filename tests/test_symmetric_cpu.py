"""The C++ CPU engine's symmetric path (C is A: one GEMM per pair of row blocks, csrc/cpu/strip_common.h).

Expected values come from the dense contract (ltcl_fused.engine.contract.dense_forward/backward) and the dense
reference losses; fp32 results are held to the fp64 truth (tests/_truth.py). Small forced tiles
(LTCL_CPU_SYM_BLOCK / LTCL_CPU_BLOCK_ROWS, read at every call) give many tiles and super-blocks on small N.
"""
import itertools
import math

import pytest
import torch

import ltcl_fused as lf
from ltcl_fused.backends.cpp_engine import CPUEngine
from ltcl_fused.engine.contract import dense_backward, dense_forward

from _cpp import (acc_dtype, assert_cpu_matches_reference, built, coefs, op, random_bias,  # noqa: F401 (built: autouse)
                  spy_symmetric, training_problem)
from _truth import check


NAMES = ["lse", "pos_sum", "fpos", "fneg", "upos", "uneg", "top", "lrest"]
OPTIONS = [  # bias, focal, gamma
    (False, False, 0.0), (True, False, 0.0), (False, True, 0.0), (False, True, 0.5), (False, True, 2.0),
    (True, True, 2.0), (False, True, 1.5),
]


def _problem(N, D, dtype, n_cls=4, bias=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(N, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    lab = torch.randint(0, n_cls, (N,), generator=g)
    bs, bo = random_bias(g, N, dtype, bias)
    return X, lab, bs, bo


def _sym_fwd(X, lab, bs, bo, it, gamma, focal):
    return op().rowstats_fwd(X, X, lab, lab, bs, bo, 0, it, gamma, focal, True)


def _sym_bwd(X, lab, bs, bo, it, gamma, focal, lse, top, lrest, *co):
    dX, empty = op().rowstats_bwd(X, X, lab, lab, bs, bo, 0, it, gamma, focal, lse, top, lrest, *co, True)
    assert empty.shape == (0, X.shape[1])
    return dX


def _dense_bwd(X, lab, bs, bo, it, gamma, focal, lse, top, lrest, *co):
    dA, dC = dense_backward(X, X, lab, lab, 0, it, bs, bo, gamma, focal, lse, top, lrest, *co)
    return dA + dC


def _close(got, ref, what, rtol=1e-9, atol=1e-10):
    assert got.dtype == ref.dtype, what
    assert torch.allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True), \
        f"{what}: max abs err {(got - ref).abs().nan_to_num().max().item():.3g}"


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 2, 17, 65, 130, 300])
def test_symmetric_contract(N, dtype, block, monkeypatch):
    """Forward statistics and dX = dA + dC of the symmetric op against the dense contract with C = A."""
    if block is not None:
        monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", str(block))
        monkeypatch.setenv("LTCL_CPU_SUPER_BYTES", "4096")  # one row block per backward super-block
        monkeypatch.setenv("LTCL_CPU_SYM_FOCAL_FWD", "1")  # the symmetric focal forward (one pass)
    D = 17
    for bias, focal, gamma in OPTIONS:
        X, lab, bs, bo = _problem(N, D, dtype, bias=bias, seed=N + D + int(bias))
        it = 1 / 0.3
        what = f"N={N} block={block} {dtype} bias={bias} focal={focal} gamma={gamma}"
        ref = dense_forward(X, X, lab, lab, 0, it, bs, bo, gamma, focal)
        got = _sym_fwd(X, lab, bs, bo, it, gamma, focal)
        for name, g_, r_ in zip(NAMES, got, ref):
            if name == "top":
                assert g_.dtype == r_.dtype and (dtype != torch.float64 or torch.equal(g_, r_)), what
            elif dtype == torch.float64:
                _close(g_, r_, f"{what} {name}")
        if dtype != torch.float64:
            check(lambda X, bs, bo: _sym_fwd(X, lab, bs, bo, it, gamma, focal),
                  lambda X, bs, bo: dense_forward(X, X, lab, lab, 0, it, bs, bo, gamma, focal),
                  [X, bs, bo], grad=False, what=what, names=NAMES)
        lse, top, lrest = ref[0], ref[6], ref[7]
        co = coefs(N, lse.dtype)
        if dtype == torch.float64:
            _close(_sym_bwd(X, lab, bs, bo, it, gamma, focal, lse, top, lrest, *co),
                   _dense_bwd(X, lab, bs, bo, it, gamma, focal, lse, top, lrest, *co), f"{what} dX")
        else:
            check(lambda X, bs, bo, lse, lrest, *co: _sym_bwd(X, lab, bs, bo, it, gamma, focal, lse, top, lrest, *co),
                  lambda X, bs, bo, lse, lrest, *co: _dense_bwd(X, lab, bs, bo, it, gamma, focal, lse, top, lrest,
                                                               *co),
                  [X, bs, bo, lse, lrest, *co], grad=False, what=what, names=["dX"], value_floor=0)


def test_symmetric_matches_general_path(monkeypatch):
    """The same statistics and gradient through both CPU paths (fp64, several tiles)."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    monkeypatch.setenv("LTCL_CPU_SYM_FOCAL_FWD", "1")
    X, lab, bs, bo = _problem(150, 9, torch.float64, n_cls=6, bias=True, seed=3)
    co = coefs(150, torch.float64)
    for b, (focal, gamma) in itertools.product([(None, None), (bs, bo)], [(False, 0.0), (True, 2.0), (True, 0.7)]):
        sym = _sym_fwd(X, lab, *b, 2.0, gamma, focal)
        gen = op().rowstats_fwd(X, X, lab, lab, *b, 0, 2.0, gamma, focal)
        for name, s, g in zip(NAMES, sym, gen):
            if name == "top":
                assert torch.equal(s, g)
            else:
                _close(s, g, name)
        dX = _sym_bwd(X, lab, *b, 2.0, gamma, focal, gen[0], gen[6], gen[7], *co)
        dA, dC = op().rowstats_bwd(X, X, lab, lab, *b, 0, 2.0, gamma, focal, gen[0], gen[6], gen[7], *co)
        _close(dX, dA + dC, "dX")


# ------------------------------------------------------------------ the focal forward's three modes
# LTCL_CPU_SYM_FOCAL_FWD: 1 (default) one pass over the tiles, the negatives' f-/u- from power sums of the
# pass's exponentials (csrc/cpu/rowstats_cpu.cpp, kSeriesTerms / kSeriesMaxP) and the blocks with a larger p
# recomputed exactly; 2 two passes (pass 2 once lse is known); 3 the general forward. The one-pass mode falls
# back to two passes when the positives' logits exceed LTCL_CPU_POS_STASH_BYTES.
FOCAL_MODES = {"one_pass": {"LTCL_CPU_SYM_FOCAL_FWD": "1"}, "two_pass": {"LTCL_CPU_SYM_FOCAL_FWD": "2"},
               "general": {"LTCL_CPU_SYM_FOCAL_FWD": "3"},
               "stash_full": {"LTCL_CPU_SYM_FOCAL_FWD": "1", "LTCL_CPU_POS_STASH_BYTES": "8"}}


def _negative_p_max(X, lab, it, bs, bo):
    """The largest p = exp(x - lse) of a negative off the row's dominant column, from the dense fp64 contract."""
    X64 = X.double()
    ref = dense_forward(X64, X64, lab, lab, 0, it, None if bs is None else bs.double(),
                        None if bo is None else bo.double(), 0.0, False)
    x = X64 @ X64.T * it
    if bo is not None:
        x = x + torch.where(lab[:, None] == lab[None, :], bs.double()[None, :], bo.double()[None, :])
    p = torch.exp(x - ref[0][:, None])
    neg = lab[:, None] != lab[None, :]
    neg[torch.arange(len(lab)), ref[6]] = False
    return p[neg].max().item()


@pytest.mark.parametrize("mode", list(FOCAL_MODES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("data", ["spread", "hard_negatives"])
def test_symmetric_focal_forward_modes(mode, dtype, data, monkeypatch):
    """Every focal forward mode against the dense contract. 'spread': every negative's p is below 2^-7, so the
    one-pass mode takes the series in every block; 'hard_negatives': near-copies of rows under another label
    give negatives with p > 0.1, whose blocks the one-pass mode recomputes exactly."""
    for k, v in FOCAL_MODES[mode].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "64")
    N, D, n_cls = 403, 24, 9
    g = torch.Generator().manual_seed(21)
    X = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    lab = torch.randint(0, n_cls, (N,), generator=g)
    it = 0.5
    if data == "hard_negatives":
        X[1::7] = X[0::7][: len(X[1::7])] + 0.02 * torch.randn(len(X[1::7]), D, generator=g, dtype=torch.float64)
        lab[1::7] = (lab[0::7][: len(lab[1::7])] + 1) % n_cls
        it = 12.0
    X = X.to(dtype)
    bias = dtype == torch.float64
    acc = acc_dtype(dtype)
    bs = torch.randn(N, generator=g, dtype=torch.float64).mul(0.1).to(acc) if bias else None
    bo = torch.randn(N, generator=g, dtype=torch.float64).mul(0.1).to(acc) if bias else None
    pmax = _negative_p_max(X, lab, it, bs, bo)
    if data == "spread":
        assert pmax < 2 ** -7, pmax
    else:
        assert pmax > 0.1, pmax
    for gamma in (2.0, 0.5):
        what = f"{mode} {data} {dtype} gamma={gamma}"
        if dtype == torch.float64:
            got = _sym_fwd(X, lab, bs, bo, it, gamma, True)
            ref = dense_forward(X, X, lab, lab, 0, it, bs, bo, gamma, True)
            for name, g_, r_ in zip(NAMES, got, ref):
                if name == "top":
                    assert torch.equal(g_, r_), what
                else:
                    _close(g_, r_, f"{what} {name}", rtol=1e-11, atol=1e-12)
        else:
            check(lambda X: _sym_fwd(X, lab, None, None, it, gamma, True),
                  lambda X: dense_forward(X, X, lab, lab, 0, it, None, None, gamma, True),
                  [X], grad=False, what=what, names=NAMES)


def test_symmetric_focal_forward_modes_bit_identical_threads(monkeypatch):
    """The one-pass focal forward (series and exact blocks both present) gives the same bits for 1 and 2 threads."""
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "32")
    g = torch.Generator().manual_seed(8)
    X = torch.randn(300, 16, generator=g) * 0.6
    X[1::5] = X[0::5] + 0.01 * torch.randn(60, 16, generator=g)
    lab = torch.randint(0, 5, (300,), generator=g)
    old = torch.get_num_threads()
    res = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            res.append(_sym_fwd(X, lab, None, None, 3.0, 2.0, True))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_symmetric_op_checks_its_inputs():
    X, lab, _, _ = _problem(10, 4, torch.float64)
    with pytest.raises(RuntimeError, match="C to be A"):
        op().rowstats_fwd(X, X.clone(), lab, lab, None, None, 0, 1.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match="self_offset == 0"):
        op().rowstats_fwd(X, X, lab, lab, None, None, -1, 1.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match="c_lab equal"):
        op().rowstats_fwd(X, X, lab, (lab + 1) % 4, None, None, 0, 1.0, 0.0, False, True)


# ------------------------------------------------------------------ losses: the path is taken, and right

def test_losses_take_the_symmetric_path_only_when_c_is_a(monkeypatch):
    calls = spy_symmetric(monkeypatch, CPUEngine, "rowstats")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 2, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (12,), generator=g)
    R = torch.randn(5, 8, generator=g)
    sym_cases = [lambda: lf.supcon(x, y, backend="cpu"), lambda: lf.supcon(x, None, backend="cpu"),
                 lambda: lf.afcl(x, y, gamma=2.0, eta=5.0, backend="cpu"), lambda: lf.fcl(x, y, backend="cpu"),
                 lambda: lf.acl(x, y, eta=2.0, backend="cpu"), lambda: lf.afcl(x[:, 0], y, backend="cpu")]
    for f in sym_cases:
        calls.clear()
        f().backward()
        assert calls == [("fwd", True), ("bwd", True, True)]
    general = [lambda: lf.supcon(x, y, contrast_mode="one", backend="cpu"),
               lambda: lf.supcon(x, y, ref_features=R, ref_labels=torch.arange(5) % 3, backend="cpu"),
               lambda: lf.afcl(x, y, contrast_mode="one", backend="cpu")]
    for f in general:
        calls.clear()
        f().backward()
        assert calls == [("fwd", False), ("bwd", False, False)]
    # BCL: the batch block against itself takes the symmetric path, the prototypes' block the general one
    calls.clear()
    lf.bcl(x, y, torch.randn(3, 8, generator=g), backend="cpu").backward()
    assert calls[:2] == [("fwd", True), ("fwd", False)]
    assert sorted(calls[2:]) == sorted([("bwd", True, True), ("bwd", False, False)])


LOSSES = [
    ("supcon", lambda x, y, b: lf.supcon(x, y, backend=b)),
    ("simclr", lambda x, y, b: lf.supcon(x, None, temperature=0.5, backend=b)),
    ("supcon_none", lambda x, y, b: lf.supcon(x, y, reduction="none", backend=b)),
    ("cl", lambda x, y, b: lf.afcl(x, y, backend=b)),
    ("fcl", lambda x, y, b: lf.fcl(x, y, gamma=1.0, backend=b)),
    ("acl", lambda x, y, b: lf.acl(x, y, eta=3.0, backend=b)),
    ("afcl", lambda x, y, b: lf.afcl(x, y, gamma=2.0, eta=5.0, backend=b)),
    ("afcl_g05_pairs", lambda x, y, b: lf.afcl(x, y, gamma=0.5, eta=1.0, normalize_by="pairs", reduction="sum",
                                               backend=b)),
    ("afcl_normalize", lambda x, y, b: lf.afcl(x, y, gamma=2.0, eta=1.0, normalize=True, backend=b)),
]


@pytest.mark.parametrize("labels", ["random", "no_positives", "one_class"])
@pytest.mark.parametrize("B,V", [(1, 1), (1, 2), (33, 2), (65, 1)])
@pytest.mark.parametrize("name,fn", LOSSES, ids=[c[0] for c in LOSSES])
def test_losses_vs_reference(name, fn, B, V, labels, monkeypatch):
    monkeypatch.setenv("LTCL_CPU_BLOCK_ROWS", "16")  # the symmetric tiles too (LTCL_CPU_SYM_BLOCK unset)
    g = torch.Generator().manual_seed(B * 10 + V)
    shape = (B, V, 11) if V > 1 else (B, 11)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5
    y = {"random": torch.randint(0, 4, (B,), generator=g), "no_positives": torch.arange(B),
         "one_class": torch.zeros(B, dtype=torch.int64)}[labels]
    assert_cpu_matches_reference(fn, x0, y, name)
    if B > 1:  # fp32 against the fp64 truth
        check(lambda x: fn(x, y, "cpu"), lambda x: fn(x, y, "reference"), [x0.float()], what=name)


def test_gradcheck_fp64_symmetric(monkeypatch):
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "8")
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(6, 2, 5, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    y = torch.tensor([0, 1, 0, 2, 1, 1])
    assert torch.autograd.gradcheck(lambda x: lf.supcon(x, y, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x: lf.afcl(x, y, gamma=2.0, eta=5.0, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x: lf.afcl(x, y, gamma=0.5, eta=1.0, normalize_by="pairs",
                                                      backend="cpu"), (x,))

    # the op itself through its registered autograd formula (one tensor as A and C)
    X = torch.randn(13, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    lab = torch.randint(0, 3, (13,), generator=g)

    def f(X):
        lse, pos, fpos, fneg, *_ = op().rowstats_fwd(X, X, lab, lab, None, None, 0, 1.5, 1.5, True, True)
        return lse.sum() + 0.5 * pos.sum() + 0.3 * fpos.sum() + 0.7 * fneg.sum()

    assert torch.autograd.gradcheck(f, (X,))


def test_nonfinite_rows_symmetric():
    """A NaN feature poisons the rows that meet it (NaN statistics, top = -1) as in the dense contract."""
    X, lab, _, _ = _problem(40, 6, torch.float64, seed=4)
    X[7, 2] = math.nan
    for focal in (False, True):
        got = _sym_fwd(X, lab, None, None, 2.0, 2.0, focal)
        ref = dense_forward(X, X, lab, lab, 0, 2.0, None, None, 2.0, focal)
        gen = op().rowstats_fwd(X, X, lab, lab, None, None, 0, 2.0, 2.0, focal)
        for name, g_, r_, e_ in zip(NAMES, got, ref, gen):
            if name == "top":
                assert torch.equal(g_, r_) and torch.equal(g_, e_), name
            else:
                if focal or name in ("lse", "pos_sum", "lrest"):  # (focal=False: the sums are not outputs)
                    _close(g_, r_, name)
                _close(g_, e_, name)  # as the general path


def test_any_thread_count_bit_identical_symmetric(monkeypatch):
    # many tiles and several backward super-blocks, sizes not multiples of the tile
    monkeypatch.setenv("LTCL_CPU_SYM_BLOCK", "64")
    monkeypatch.setenv("LTCL_CPU_SUPER_BYTES", str(64 * 700 * 4 * 2))
    monkeypatch.setenv("LTCL_CPU_SYM_FOCAL_FWD", "1")
    old = torch.get_num_threads()
    X, lab, bs, bo = _problem(650, 130, torch.float32, n_cls=7, bias=True)
    co = coefs(650, torch.float32)
    res = {}
    try:
        for nt in (1, 2, 5):
            torch.set_num_threads(nt)
            for bias in (False, True):
                b = (bs, bo) if bias else (None, None)
                st = _sym_fwd(X, lab, *b, 1 / 0.07, 2.0, True)
                dX = _sym_bwd(X, lab, *b, 1 / 0.07, 2.0, True, st[0], st[6], st[7], *co)
                res[(nt, bias)] = st + (dX,)
    finally:
        torch.set_num_threads(old)
    for bias in (False, True):
        for nt in (2, 5):
            for t1, t2 in zip(res[(1, bias)], res[(nt, bias)]):
                assert torch.equal(t1, t2), (bias, nt)


def test_torch_compile_fullgraph_symmetric():
    x, y, lin = training_problem(24)
    codes = []

    def backend(gm, inputs):  # records the captured graphs, then runs them through aot_eager
        codes.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, inputs)

    def step(x, y):
        z = torch.nn.functional.normalize(lin(x), dim=-1)
        return lf.supcon(z, y, backend="cpu", check_finite=False)

    loss_c = torch.compile(step, fullgraph=True, backend=backend)(x, y)
    loss_c.backward()
    g_c = lin.weight.grad.clone()
    calls = [ln for c in codes for ln in c.splitlines() if "ltcl_fused.rowstats_" in ln]
    assert len(calls) == 2 and all(ln.split(";")[0].rstrip().endswith(", True)") for ln in calls), calls  # symmetric=True
    W = lin.weight.detach().double().requires_grad_(True)
    z = torch.nn.functional.normalize(torch.nn.functional.linear(x.double(), W, lin.bias.detach().double()), dim=-1)
    ref = lf.supcon(z, y, backend="reference")
    (gref,) = torch.autograd.grad(ref, [W])
    assert abs(loss_c.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert (g_c.double() - gref).abs().max() <= 1e-4 * gref.abs().max()
