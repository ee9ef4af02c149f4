"""Triton SSL engine (DCL, HCL, Bayesian CL, MTTV) under the Triton interpreter (CPU tensors).

* engine vs the dense SSL oracle (``ltcl_fused/engine/ssl_contract.py``): every compile-time variant
  (K = 1, 2, 3 scales, filter none/both/low, exclude_partner, include_self, Bayesian weights),
  square with a self column and rectangular without, partners -1, fp64 to 1e-10 and fp32,
  several row/column tiles and D chunks (small forced configurations), several Bayesian row blocks,
  ties in the Bayesian ranks;
* dcl / hcl / bayesian_cl / mttv with ``backend="triton"`` vs ``backend="reference"`` (values and
  gradients), B from 1 to 40, α/β across their ranges, both filters, both self-term modes;
* fp64 gradcheck of the row statistics and of the losses on tiny shapes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
# numpy warns about exp overflow / log(0) inside masked-out lanes of the interpreter's tiles
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

import ltcl_fused as lf  # noqa: E402
from ltcl_fused import reference as R  # noqa: E402
from ltcl_fused.backends import get_engine  # noqa: E402
from ltcl_fused.engine.ssl_contract import SSLConfig, dense_backward, dense_forward, ssl_row_stats  # noqa: E402

from _truth import assert_within, check  # noqa: E402

ENG = get_engine("triton")
DEVICE = torch.device("cpu") if ENG.unavailable_reason(torch.device("cpu")) is None else torch.device("cuda")
if ENG.unavailable_reason(DEVICE) is not None:  # pragma: no cover
    pytest.skip(f"triton engine unavailable: {ENG.unavailable_reason(DEVICE)}", allow_module_level=True)

from ltcl_fused.triton_kernels import ops, ssl_ops  # noqa: E402
from ltcl_fused.triton_kernels.configs import BlockConfig, KernelConfig  # noqa: E402

F64, F32 = torch.float64, torch.float32
#: float64 needs Triton >= 3.5: the op-level tests below run in fp32 on an older Triton (the fp64 ones skip)
OPS_DT = F64 if ENG.dtype_reason("ssl", F64) is None else F32
# several row/column tiles and D chunks even on small shapes (chunked-D path when D > 16)
SMALL = KernelConfig(BlockConfig(16, 16, 16, 1, 1), BlockConfig(16, 16, 16, 1, 1), (), 0)
# single-chunk path with several tiles
SINGLE = KernelConfig(BlockConfig(16, 16, 64, 1, 1), BlockConfig(16, 32, 64, 1, 1), (), 64)


@pytest.fixture
def small_blocks():
    def set_(cfg, bayes_rows=0):
        ops.FORCE_CONFIG = cfg
        ssl_ops.FORCE_BAYES_ROWS = bayes_rows
    yield set_
    ops.FORCE_CONFIG = None
    ssl_ops.FORCE_BAYES_ROWS = 0


def _to(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _problem(M, N, D, self_offset, dtype, seed, ties=False, normalize=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integer features: many exactly equal dot products
        A = torch.randint(-2, 3, (M, D), generator=g).to(F64)
        C = torch.randint(-2, 3, (N, D), generator=g).to(F64)
    else:
        A = torch.randn(M, D, generator=g, dtype=F64) / math.sqrt(D)
        C = torch.randn(N, D, generator=g, dtype=F64) / math.sqrt(D)
    if normalize:
        A, C = F.normalize(A, dim=1), F.normalize(C, dim=1)
    if self_offset >= 0:
        C[self_offset:self_offset + M] = A
    partner = torch.randint(0, N, (M,), generator=g)
    partner[::5] = -1
    return A.to(dtype), C.to(dtype), partner


CONFIGS = {
    "dcl": SSLConfig(),
    "hcl": SSLConfig(scales=(0.5, 1.5)),
    "hcl_beta0": SSLConfig(scales=(0.0, 1.0)),
    "three_scales": SSLConfig(scales=(0.3, 1.0, 2.0)),
    "keep_partner": SSLConfig(exclude_partner=False),
    "mttv_both": SSLConfig(exclude_partner=False, filter="both", lower=0.1, upper=0.5),
    "mttv_low": SSLConfig(exclude_partner=False, filter="low", lower=0.2),
    "mttv_both_self": SSLConfig(exclude_partner=False, include_self=True, filter="both", lower=0.1, upper=0.5),
    "mttv_low_self": SSLConfig(exclude_partner=False, include_self=True, filter="low", lower=0.2),
    "scaled_filter": SSLConfig(scales=(0.5, 2.0), filter="both", lower=0.05, upper=0.4),
    "bayes": SSLConfig(bayes=(0.5, 1.0, 0.1)),
    "bayes_mid": SSLConfig(bayes=(0.75, 0.6, 0.2)),
    "bayes_hi": SSLConfig(bayes=(1.0, 0.5, 0.0)),
    "bayes_zero": SSLConfig(bayes=(1.0, 1.0, 0.1)),  # ω ≡ 0: lse = −inf everywhere
    "bayes_filter_self": SSLConfig(bayes=(0.6, 0.8, 0.1), exclude_partner=False, include_self=True, filter="low",
                                   lower=0.1),
}


def _check(A, C, partner, self_offset, inv_tau, cfg, tol, seed=0):
    """fp64: the oracle to ``tol``; fp32 (``tol`` None): the fp64 truth rule of tests/_truth.py."""
    A, C, partner = _to(A), _to(C), _to(partner)
    Ad, Cd = A.double(), C.double()
    ref = dense_forward(Ad, Cd, partner, self_offset, inv_tau, cfg)
    if tol is None:
        got, _ = check(lambda A, C: ENG.ssl_forward(A, C, partner, self_offset, inv_tau, cfg),
                       lambda A, C: dense_forward(A, C, partner, self_offset, inv_tau, cfg), [A, C], grad=False,
                       names=("lse", "pos", "pos_in"))
        got = type(ref)(*got)
    else:
        got = ENG.ssl_forward(A, C, partner, self_offset, inv_tau, cfg)
    assert got.lse.shape == ref.lse.shape and got.lse.dtype == (F64 if A.dtype == F64 else F32)
    for r, x in zip(ref, got):
        if tol is not None:
            torch.testing.assert_close(x.double(), r, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(seed)
    K, M = ref.lse.shape
    coef = torch.randn(K, M, generator=g, dtype=F64).to(DEVICE)
    coef[:, ::3] = 0.0
    cpos = torch.randn(M, generator=g, dtype=F64).to(DEVICE)
    rA, rC = dense_backward(Ad, Cd, partner, self_offset, inv_tau, cfg, ref.lse, coef, cpos)
    acc = got.lse.dtype
    bw = (ref.lse.to(acc), coef.to(acc), cpos.to(acc))
    if tol is None:
        args = (partner, self_offset, inv_tau, cfg)
        (gA, gC), _ = check(lambda A, C, *x: ENG.ssl_backward(A, C, *args, *x),
                            lambda A, C, *x: dense_backward(A, C, *args, *x),
                            [A, C, *bw], grad=False, names=("dA", "dC"), value_floor=0)
    else:
        gA, gC = ENG.ssl_backward(A, C, partner, self_offset, inv_tau, cfg, *bw)
    assert gA.dtype == A.dtype and gC.dtype == C.dtype
    assert torch.isfinite(gA).all() and torch.isfinite(gC).all()
    if tol is not None:
        torch.testing.assert_close(gA.double(), rA, rtol=tol, atol=tol)
        torch.testing.assert_close(gC.double(), rC, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(37, 37, 19, 0), (21, 45, 33, -1), (1, 2, 3, 0)], ids=["square-self", "rect", "tiny"])
def test_engine_vs_oracle_fp64(name, shape, small_blocks):
    M, N, D, so = shape
    small_blocks(SMALL, bayes_rows=7)
    A, C, partner = _problem(M, N, D, so, F64, seed=M + N, normalize=True)
    _check(A, C, partner, so, 2.0, CONFIGS[name], 1e-10)


@pytest.mark.parametrize("name", ["dcl", "hcl", "mttv_both", "bayes_mid"])
def test_engine_vs_oracle_single_d_and_default_config(name, small_blocks):
    A, C, partner = _problem(40, 40, 24, 0, F64, seed=3, normalize=True)
    small_blocks(SINGLE)
    _check(A, C, partner, 0, 1.5, CONFIGS[name], 1e-10)
    small_blocks(None)
    _check(A, C, partner, 0, 1.5, CONFIGS[name], 1e-10)


@pytest.mark.parametrize("name", ["dcl", "hcl", "three_scales", "mttv_low_self", "bayes", "bayes_filter_self"])
def test_engine_vs_oracle_fp32(name, small_blocks):
    small_blocks(SMALL, bayes_rows=16)
    A, C, partner = _problem(33, 50, 20, -1, F32, seed=11, normalize=True)
    _check(A, C, partner, -1, 2.0, CONFIGS[name], None)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("n_split", [2, 3])
@pytest.mark.parametrize("name", ["bayes", "bayes_zero", "bayes_filter_self"])
def test_bayes_two_d_grid(name, n_split, dtype, small_blocks, monkeypatch):
    """The Bayesian weighting pass on a 2-D grid: ``ops.FORCE_SPLIT`` column ranges per row block (on a GPU
    ``ops.split_plan`` splits when the row blocks are fewer than the SMs); the forward's partials merged in range
    order. fp64 against the oracle, fp32 by the truth rule, N not a multiple of the ranges."""
    monkeypatch.setattr(ops, "FORCE_SPLIT", n_split)
    small_blocks(SMALL, bayes_rows=7)
    assert ops.split_plan(7, 150, ssl_ops._bayes_cfg().BLOCK_M, ssl_ops._bayes_cfg().BLOCK_N,
                          torch.device("cpu"))[0] == n_split
    A, C, partner = _problem(37, 150, 19, 0, dtype, seed=n_split, normalize=True)
    _check(A, C, partner, 0, 2.0, CONFIGS[name], 1e-10 if dtype == F64 else None)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_bayes_two_d_grid_poisoned_and_deterministic(dtype, small_blocks, monkeypatch):
    """A NaN feature poisons the rows that meet it (NaN LSE) under the split pass as without it; the other rows
    equal the one-range pass to rounding, and repeated calls give the same bits."""
    small_blocks(SMALL, bayes_rows=7)
    A, C, partner = _problem(20, 150, 9, -1, dtype, seed=4, normalize=True)
    A[3, 1] = math.nan
    cfg = CONFIGS["bayes"]
    A, C, partner = _to(A), _to(C), _to(partner)
    one = ENG.ssl_forward(A, C, partner, -1, 2.0, cfg).lse
    monkeypatch.setattr(ops, "FORCE_SPLIT", 3)
    two = ENG.ssl_forward(A, C, partner, -1, 2.0, cfg).lse
    assert torch.isnan(two[0, 3]) and torch.isnan(one[0, 3])
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(two, one, rtol=tol, atol=tol, equal_nan=True)
    assert torch.equal(ENG.ssl_forward(A, C, partner, -1, 2.0, cfg).lse.nan_to_num(), two.nan_to_num())


@pytest.mark.parametrize("name", ["bayes", "bayes_mid", "bayes_hi", "bayes_filter_self"])
def test_bayes_exact_ranks_with_ties(name, small_blocks):
    # integer features: many exactly tied similarities per row, ranks must count ties as <=
    small_blocks(SMALL, bayes_rows=5)
    A, C, partner = _problem(23, 23, 4, 0, F64, seed=5, ties=True)
    s = A @ C.T
    assert any(len(torch.unique(r)) < len(r) - 3 for r in s)  # the rows really hold ties
    cfg = CONFIGS[name]
    if cfg.filter == "low":  # the filter acts on the raw dot product: keep it meaningful for integer values
        cfg = SSLConfig(bayes=cfg.bayes, exclude_partner=False, include_self=True, filter="low", lower=1.0)
    _check(A, C, partner, 0, 0.5, cfg, 1e-10)


def test_hand_worked_bayes_ranks_with_ties():
    A = torch.tensor([[1.0]], dtype=F64)
    C = torch.tensor([[1.0], [2.0], [2.0], [3.0], [5.0]], dtype=F64)
    ab = (0.6, 0.8, 0.2)
    from ltcl_fused.engine.ssl_contract import bayes_omega
    u = torch.tensor([0.25, 0.75, 0.75, 1.0], dtype=F64)
    want = torch.logsumexp(torch.log(bayes_omega(u, *ab)) + torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=F64), 0)
    st = ENG.ssl_forward(_to(A), _to(C), _to(torch.tensor([4])), -1, 1.0, SSLConfig(bayes=ab))
    assert abs(float(st.lse[0, 0]) - float(want)) < 1e-12
    assert float(st.pos[0]) == 5.0 and float(st.pos_in[0]) == 0.0


@pytest.mark.parametrize("name", ["hcl", "mttv_both", "bayes_mid"])
def test_gradcheck_row_stats(name, small_blocks):
    small_blocks(SMALL, bayes_rows=3)
    A, C, partner = _problem(6, 6, 3, 0, F64, seed=2, normalize=True)
    A = _to(A).requires_grad_(True)
    C = _to(C).requires_grad_(True)
    cfg = CONFIGS[name]

    def f(A, C):
        st = ssl_row_stats(ENG, A, C, _to(partner), self_offset=0, inv_tau=2.0, cfg=cfg)
        lse = torch.where(torch.isfinite(st.lse), st.lse, 0.0)
        return lse, st.pos

    assert torch.autograd.gradcheck(f, (A, C), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# the losses, end to end
# ----------------------------------------------------------------------------------------------
def _views(B, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z1 + 0.7 * z2, dim=1)
    return z1.to(dtype), z2.to(dtype)


def _value_and_grads(fn, inputs, **kw):
    xs = [_to(x).detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs, **kw)
    if out.dim() == 0:
        out.backward()
    else:
        (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device)).sum().backward()
    return out.detach().cpu(), [x.grad.cpu() for x in xs]


def _compare(name, inputs, tol, reduction="mean", **kw):
    """fp64: the reference to ``tol``; fp32 (``tol`` None): the fp64 truth rule of tests/_truth.py.
    NaN only where the released MTTV code's denominator allows it (official_self_term, filter "both")."""
    if tol is None:
        check(lambda *x: getattr(lf, name)(*[_to(t) for t in x], reduction=reduction, backend="triton", **kw),
              lambda *x: getattr(R, name)(*x, reduction=reduction, **kw), [x.cpu() for x in inputs], what=name)
        return
    nan_ok = name == "mttv" and kw.get("official_self_term", False) and kw.get("filter", "both") == "both"
    v, g = _value_and_grads(getattr(lf, name), inputs, reduction=reduction, backend="triton", **kw)
    rv, rg = _value_and_grads(getattr(R, name), [x.cpu() for x in inputs], reduction=reduction, **kw)
    torch.testing.assert_close(v, rv.to(v.dtype), rtol=tol, atol=tol, equal_nan=nan_ok)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol, equal_nan=nan_ok)


TWO_VIEW_CASES = [
    ("dcl", {}),
    ("dcl", dict(debiased=False)),
    ("dcl", dict(tau_plus=0.3, temperature=0.2)),
    ("hcl", {}),
    ("hcl", dict(beta=0.0)),
    ("hcl", dict(beta=3.0, tau_plus=0.3, temperature=0.3)),
    ("bayesian_cl", {}),
    ("bayesian_cl", dict(alpha=0.75, beta=0.5)),
    ("bayesian_cl", dict(alpha=1.0, beta=0.75, tau_plus=0.0)),
    ("bayesian_cl", dict(alpha=0.9, beta=0.9, tau_plus=0.3, temperature=0.2)),
    ("bayesian_cl", dict(alpha=1.0, beta=1.0)),  # ω ≡ 0: Ng = 0, loss 0
]


@pytest.mark.parametrize("name,kw", TWO_VIEW_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TWO_VIEW_CASES)])
@pytest.mark.parametrize("B", [1, 2, 19, 40])
def test_two_view_losses_match_reference_fp64(name, kw, B):
    z = _views(B, 7, F64, seed=B)
    _compare(name, z, 1e-10, reduction="mean" if B % 2 else "none", **kw)


MTTV_CASES = [dict(filter="both"), dict(filter="low"), dict(filter="both", official_self_term=True, lower=0.05),
              dict(filter="low", official_self_term=True), dict(filter="both", lower=0.2, upper=0.6, temperature=0.5)]


@pytest.mark.parametrize("kw", MTTV_CASES, ids=[str(i) for i in range(len(MTTV_CASES))])
@pytest.mark.parametrize("B", [1, 7, 40])
def test_mttv_matches_reference_fp64(kw, B):
    g = torch.Generator().manual_seed(B)
    E = torch.randn(2 * B, 5, generator=g, dtype=F64)
    E[1::2] = E[0::2] + 0.8 * E[1::2]  # correlated pairs
    for reduction in ("mean", "none"):
        _compare("mttv", [E], 1e-10, reduction=reduction, **kw)


@pytest.mark.parametrize("name,kw", [("dcl", {}), ("hcl", dict(beta=1.0)), ("bayesian_cl", dict(alpha=0.6, beta=0.8)),
                                     ("mttv", {})])
def test_losses_fp32(name, kw, small_blocks):
    small_blocks(SMALL, bayes_rows=16)
    z = _views(36, 24, F32, seed=7)
    inputs = [torch.cat(z)] if name == "mttv" else list(z)
    _compare(name, inputs, None, reduction="sum", **kw)


@pytest.mark.parametrize("name,kw", [("dcl", {}), ("hcl", dict(beta=0.5)), ("bayesian_cl", dict(alpha=0.7, beta=0.6)),
                                     ("mttv", dict(filter="low", lower=0.05))])
def test_gradcheck_losses(name, kw):
    z = _views(3, 4, F64, seed=1)
    inputs = [torch.cat(z)] if name == "mttv" else list(z)
    xs = tuple(_to(x).requires_grad_(True) for x in inputs)
    fn = getattr(lf, name)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, backend="triton", **kw), xs, eps=1e-6, atol=1e-7)


def test_bayes_ties_end_to_end(small_blocks):
    small_blocks(SMALL, bayes_rows=4)
    g = torch.Generator().manual_seed(0)
    z1 = torch.randint(-1, 2, (15, 3), generator=g).to(F64)
    z2 = torch.randint(-1, 2, (15, 3), generator=g).to(F64)
    _compare("bayesian_cl", [z1, z2], 1e-10, alpha=0.8, beta=0.7)


def test_triton_matches_torch_backend():
    z = _views(4, 3, F64, seed=1)
    torch.testing.assert_close(lf.dcl(*z, backend="triton"), lf.dcl(*z, backend="torch"), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# memory: never an M×N tensor (the host code of the ops, run directly so every aten op is seen)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hcl", "mttv_low_self", "bayes_mid"])
def test_host_code_never_allocates_m_by_n(name):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):  # bytes (the interpreter copies arguments as byte storages)
                    Largest.largest = max(Largest.largest, t.numel() * t.element_size())
            return out

    M = N = 384
    A, C, partner = _problem(M, N, 8, 0, F32, seed=1, normalize=True)
    A, C, partner = _to(A), _to(C), _to(partner)
    cfg = CONFIGS[name]
    args = (A, C, partner, 0, 2.0, list(cfg.scales), cfg.exclude_partner, cfg.include_self,
            ssl_ops.FILTERS[cfg.filter], cfg.lower, cfg.upper, list(cfg.bayes or []), "ieee")
    old = ssl_ops.FORCE_BAYES_ROWS
    ssl_ops.FORCE_BAYES_ROWS = 48  # Bayesian strips of 48 x 384
    try:
        with Largest():
            lse, pos, pos_in = ssl_ops._fwd_impl(*args)
            dA, dC = ssl_ops._bwd_impl(*args, lse, torch.ones_like(lse), torch.ones_like(pos))
    finally:
        ssl_ops.FORCE_BAYES_ROWS = old
    assert torch.isfinite(dA).all() and torch.isfinite(dC).all()
    assert Largest.largest <= 48 * N * 8, Largest.largest  # one strip of int64 sort indices; M×N fp32: 4x that
    truth = dense_forward(A.double(), C.double(), partner, 0, 2.0, cfg)  # tests/_truth.py
    assert_within(lse, dense_forward(A, C, partner, 0, 2.0, cfg).lse, truth.lse, what="lse", floor=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_vs_fp64_truth(dtype):
    """16-bit inputs: the error vs the fp64 truth is no larger than the same-dtype dense reference's, plus slack."""
    z = _views(48, 16, F64, seed=9)
    E = torch.cat(z)[torch.randperm(96, generator=torch.Generator().manual_seed(0))]
    for name, inp, kw in [("dcl", z, {}), ("hcl", z, {}), ("bayesian_cl", z, dict(alpha=0.7, beta=0.8)),
                          ("mttv", [E], {})]:
        (ours,), _ = check(lambda *x: getattr(lf, name)(*[_to(t) for t in x], backend="triton", **kw),
                           lambda *x: getattr(R, name)(*x, **kw), [x.to(dtype) for x in inp], what=name)
        assert ours.dtype == torch.float32


@pytest.mark.parametrize("bayes", [[], [0.6, 0.8, 0.1]], ids=["unit", "bayes"])
def test_opcheck_ssl_ops(bayes):
    A, C, partner = _problem(9, 12, 5, -1, OPS_DT, seed=4, normalize=True)
    A, C, partner = _to(A), _to(C), _to(partner)
    scales = [1.0] if bayes else [0.5, 1.5]
    args = (A, C, partner, -1, 2.0, scales, True, False, 0, 0.0, 1.0, bayes, "ieee")
    torch.library.opcheck(torch.ops.ltcl_fused.triton_ssl_fwd.default, args)
    lse, pos, _ = torch.ops.ltcl_fused.triton_ssl_fwd(*args)
    torch.library.opcheck(torch.ops.ltcl_fused.triton_ssl_bwd.default, args + (lse, torch.ones_like(lse), pos))


def test_torch_compile_step():
    z1, z2 = (_to(x).requires_grad_(True) for x in _views(6, 4, OPS_DT, seed=2))
    tol = 1e-10 if OPS_DT == F64 else 2e-5  # fp32 (Triton < 3.5): the fp64 reference of the same inputs
    for name in ("hcl", "bayesian_cl"):
        f = torch.compile(lambda a, b: getattr(lf, name)(a, b, backend="triton", check_finite=False))
        v = f(z1, z2)
        g = torch.autograd.grad(v, (z1, z2))
        z1d, z2d = (z.detach().cpu().double().requires_grad_(True) for z in (z1, z2))
        r = getattr(R, name)(z1d, z2d)
        rg = torch.autograd.grad(r, (z1d, z2d))
        torch.testing.assert_close(v.cpu().double(), r, rtol=tol, atol=tol)
        for a, b in zip(g, rg):
            torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol)


def test_bayes_signed_zero_ties():
    # s = −0.0 and +0.0 are equal (ties count as <=) in the ranks, as in the oracle
    A = torch.tensor([[-1.0], [1.0], [2.0]], dtype=F64)
    C = torch.tensor([[0.0], [0.0], [-0.0], [1.0], [-1.0], [3.0]], dtype=F64)
    s = A @ C.T
    assert (torch.signbit(s) & (s == 0)).any() and (~torch.signbit(s) & (s == 0)).any()
    _check(A, C, torch.tensor([5, -1, 0]), -1, 1.0, SSLConfig(bayes=(0.7, 0.6, 0.1)), 1e-12)
