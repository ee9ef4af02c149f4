"""The split forward sweep of the Triton engine (issue 12): with few row blocks, program (i, k) sweeps only the
column range k, and ``rowstats_fwd_merge_kernel`` / ``rowstats_fwd_sum_kernel`` merge the partials in range
order. Forced here with ``ops.FORCE_SPLIT`` (the heuristic ``ops.split_plan`` splits only on a GPU with fewer
row blocks than SMs) and checked like the one-kernel forward: against the dense contract (fp64 1e-10, fp32 by
the truth rule), the first argmax across range boundaries, poisoned rows (NaN / +inf / all −inf), rows without
columns, and bitwise determinism of repeated calls."""
import math

import pytest
import torch

pytest.importorskip("triton")

from ltcl_fused.backends import get_engine  # noqa: E402
from ltcl_fused.engine.contract import dense_forward  # noqa: E402

import test_triton_engine as E  # noqa: E402  (its problems, configurations and the contract check)

from ltcl_fused.triton_kernels import ops  # noqa: E402

ENG = get_engine("triton")


@pytest.fixture
def split(monkeypatch):
    def set_(n):
        monkeypatch.setattr(ops, "FORCE_SPLIT", n)
    return set_


def test_plan():
    """The heuristic's arithmetic: no empty range, ranges a multiple of BLOCK_N; no split on CPU tensors."""
    assert ops.split_plan(100, 1000, 32, 32, torch.device("cpu")) == (1, 1000)
    try:
        ops.FORCE_SPLIT = 4
        assert ops.split_plan(100, 1000, 32, 32, torch.device("cpu")) == (4, 256)   # 32 tiles -> 4 x 8 tiles
        assert ops.split_plan(100, 70, 32, 32, torch.device("cpu")) == (3, 32)      # 3 tiles: at most 3 ranges
        assert ops.split_plan(100, 0, 32, 32, torch.device("cpu")) == (1, 0)
        ops.FORCE_SPLIT = 1
        assert ops.split_plan(100, 1000, 32, 32, torch.device("cpu")) == (1, 1000)
    finally:
        ops.FORCE_SPLIT = None


@pytest.mark.parametrize("n_split", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_vs_contract(force_config, split, n_split, dtype):
    force_config(E.SMALL)
    split(n_split)
    E._check(37, 150, 40, 0, True, True, 0.5, dtype)   # 5 column tiles of 32
    E._check(21, 100, 40, -1, False, True, 0.0, dtype, seed=1)
    E._check(29, 129, 17, 0, False, False, 0.0, dtype, seed=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dominant_column(force_config, split, dtype):
    force_config(E.SMALL)
    split(3)
    E._check(37, 100, 8, 0, True, True, 0.5, dtype, scale=3.0, tau=0.1)


def test_ties_first_argmax_across_ranges(force_config, split):
    """Equal maxima in different column ranges: top is the first one (the merge takes over only when greater)."""
    force_config(E.SMALL)
    split(3)
    A = torch.ones(3, 4, dtype=torch.float64)
    C = torch.ones(96, 4, dtype=torch.float64)
    lab = torch.zeros(96, dtype=torch.int64)
    out = E._fwd(A, C, lab[:3], lab, -1, 2.0, None, None, 0.5, True)
    ref = dense_forward(A, C, lab[:3], lab, -1, 2.0, None, None, 0.5, True)
    assert torch.equal(out[6], torch.zeros(3, dtype=torch.int64))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    C2 = C.clone()
    C2[70] *= 2.0  # a strictly greater column in the last range takes over
    out = E._fwd(A, C2, lab[:3], lab, -1, 2.0, None, None, 0.5, True)
    assert torch.equal(out[6], torch.full((3,), 70, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_poisoned_and_empty_rows(force_config, split, dtype):
    """A NaN or +inf logit in any range, or only −inf logits, poisons the row (NaN statistics, top −1), as in the
    one-kernel forward; the other rows are unchanged."""
    force_config(E.SMALL)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(6, 5, generator=g, dtype=torch.float64).to(dtype)
    C = torch.randn(100, 5, generator=g, dtype=torch.float64).to(dtype)
    al = torch.randint(0, 3, (6,), generator=g)
    cl = torch.randint(0, 3, (100,), generator=g)
    bs = torch.zeros(100, dtype=dtype)
    bo = torch.zeros(100, dtype=dtype)
    bs[5] = bo[5] = math.nan        # column 5 (first range): NaN logit for every row
    A[1] = 0.0
    bs[80] = bo[80] = math.inf      # column 80 (last range): +inf logit for every row
    args = (A, C, al, cl, -1, 2.0, bs, bo, 0.5, True)
    split(1)
    one = E._fwd(*args)
    split(3)
    three = E._fwd(*args)
    for o, t in zip(one, three):
        assert torch.equal(torch.isnan(o), torch.isnan(t)) if o.is_floating_point() else torch.equal(o, t)
    assert torch.isnan(three[0]).all() and (three[6] == -1).all()
    # only −inf logits in one row: bias −inf on every column for that row's label class
    bs2 = torch.where(cl == al[2], -math.inf, 0.0).to(dtype)
    bo2 = torch.zeros(100, dtype=dtype)
    bo2[cl != al[2]] = -math.inf
    args = (A, C, al, cl, -1, 2.0, bs2, bo2, 0.5, True)
    split(1)
    one = E._fwd(*args)
    split(3)
    three = E._fwd(*args)
    for o, t in zip(one, three):
        if o.is_floating_point():
            assert torch.equal(torch.isnan(o), torch.isnan(t)) and torch.equal(torch.isinf(o), torch.isinf(t))
            ok = torch.isfinite(o)
            torch.testing.assert_close(t[ok], o[ok])
        else:
            assert torch.equal(o, t)
    assert torch.isnan(three[0][2]) and three[6][2] == -1


def test_launches(force_config, split, monkeypatch):
    """A split focal forward: pass 1 on an (row blocks, n_split) grid, the merge, pass 2 on the same grid, the sum."""
    force_config(E.SMALL)
    split(3)
    seen = []
    orig = ops.launch

    def spy(kernel, grid, device, *args, **meta):
        seen.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, tuple(grid), meta.get("PASS")))
        return orig(kernel, grid, device, *args, **meta)

    monkeypatch.setattr(ops, "launch", spy)
    A, C, al, cl, bs, bo, _ = E._problem(37, 150, 40, 0, True)
    E._fwd(A, C, al, cl, 0, 3.0, bs, bo, 0.5, True)
    assert seen == [("rowstats_fwd_kernel", (3, 3), 1), ("rowstats_fwd_merge_kernel", (1,), None),
                    ("rowstats_fwd_kernel", (3, 3), 2), ("rowstats_fwd_sum_kernel", (1,), None)], seen


def test_deterministic(force_config, split):
    force_config(E.SMALL)
    split(4)
    A, C, al, cl, bs, bo, _ = E._problem(37, 150, 40, 0, True)
    args = (A.float(), C.float(), al, cl, 0, 3.0, bs.float(), bo.float(), 0.5, True)
    a, b = E._fwd(*args), E._fwd(*args)
    for x, y in zip(a, b):
        assert torch.equal(x, y)




# ----------------------------------------------------------------------------------------------
# the split symmetric backward: program (I, k) sweeps column range k into slab k, slabs summed in range order
# ----------------------------------------------------------------------------------------------
import test_triton_ssl_symmetric as SSYM  # noqa: E402
import test_triton_symmetric as SYM  # noqa: E402

from ltcl_fused.triton_kernels import ssl_ops  # noqa: E402


@pytest.fixture
def slab_counts(monkeypatch):
    """The number of slabs of every symmetric backward launch (that the split really happened)."""
    seen = []
    real = ops.sym_grid

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out[1].shape[0])
        return out

    monkeypatch.setattr(ops, "sym_grid", spy)
    monkeypatch.setattr(ssl_ops, "sym_grid", spy)
    return seen


@pytest.mark.parametrize("n_split", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_symmetric_backward_split_vs_contract(force_config, split, slab_counts, n_split, dtype):
    """rowstats_bwd_sym_kernel on a 2-D grid: the same checks as the one-range kernel (fp64 1e-10 against the
    dense contract, fp32 by the truth rule), bias, focal γ > 0 and γ = 0, one class, N not a multiple of a tile."""
    force_config(SYM.SMALL)
    split(n_split)
    SYM._check(150, 40, True, True, 0.5, dtype)
    SYM._check(129, 17, False, False, 0.0, dtype, seed=2)
    SYM._check(100, 40, True, True, 0.0, dtype, labels="one", seed=1)
    # split_plan's ranges are whole column tiles (BLOCK_N 16 here), none empty: 150, 129, 100 columns
    assert slab_counts == [ops.split_plan(n, n, 16, 16, torch.device("cpu"))[0] for n in (150, 129, 100)]
    assert all(n > 1 for n in slab_counts)


@pytest.mark.parametrize("name", ["dcl", "hcl", "mttv_both_self"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ssl_symmetric_backward_split_vs_contract(force_config, split, slab_counts, name, dtype):
    force_config(SSYM.SMALL)
    split(4)
    SSYM._check(101, 19, SSYM.CONFIGS[name], dtype, seed=5)
    assert slab_counts and all(n == 4 for n in slab_counts)  # 4 column tiles of 32: one per range


def test_symmetric_backward_split_is_deterministic_and_matches_one_range(force_config, split):
    """Repeated split calls are bitwise equal; split and one-range results agree to rounding (fp64)."""
    force_config(SYM.SMALL)
    X, lab, bs, bo, coefs = SYM._problem(97, 40, True, seed=3)
    inv_tau = 1 / 0.3
    ref = dense_forward(X, X, lab, lab, 0, inv_tau, bs, bo, 0.5, True)
    st = (ref[0], ref[6], ref[7])
    split(4)
    a = SYM._sym(X, lab, inv_tau, bs, bo, 0.5, True, st, coefs)
    b = SYM._sym(X, lab, inv_tau, bs, bo, 0.5, True, st, coefs)
    split(1)
    one = SYM._sym(X, lab, inv_tau, bs, bo, 0.5, True, st, coefs)
    assert torch.equal(a, b)
    assert (a - one).abs().max() <= 1e-12 * one.abs().max()


def test_sym_grid_plan():
    """One slab (the whole sweep, 1-D grid) on CPU tensors; with a forced split the slabs are zero-initialised and
    their sum is taken in order."""
    from ltcl_fused.triton_kernels.configs import BlockConfig
    bc = BlockConfig(16, 32, 32, 1, 1)
    grid, slabs, n_per = ops.sym_grid(100, 8, bc, torch.float64, torch.device("cpu"))
    assert grid == (7, 1) and slabs.shape == (1, 100, 8) and n_per == 100
    try:
        ops.FORCE_SPLIT = 3
        grid, slabs, n_per = ops.sym_grid(100, 8, bc, torch.float32, torch.device("cpu"))
        # 4 column tiles of 32 in 3 ranges: 2 tiles per range, so 2 ranges (none empty)
        assert grid == (7, 2) and slabs.shape == (2, 100, 8) and n_per == 64 and not slabs.any()
    finally:
        ops.FORCE_SPLIT = None
    s = torch.arange(3 * 2 * 2, dtype=torch.float64).reshape(3, 2, 2)
    assert torch.equal(ops.sum_slabs(s), s[0] + s[1] + s[2])
