"""The CUDA backend's kernels (csrc/cuda) executed on the CPU by the emulator of csrc/cuda_emu (tests/_cuda_emu.py):
``backend="cuda"`` with CPU tensors, through the same binding (argument checks, dtype handling) and the same
CUDAEngine, against ``ltcl_fused.reference``.

Every loss, general and symmetric backward (LTCL_CUDA_SYMMETRIC), fp64 to 1e-9 of the reference, fp32 / bf16
against the fp64 truth, shapes that cross the 32-row, 32-column and 32-feature tiles, anchors without positives,
one class, a single sample; the same results with the block's threads resumed in reverse order (a missing
barrier would change them); and the emulator itself: it reports a deadlocked launch and its rewriting of
launches is exact.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused import backends

import _cuda_emu
from _truth import check
from loss_cases import cases, problem

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

LOSSES = ("supcon", "afcl", "fcl", "acl", "bcl", "rescom", "dcl", "hcl", "bayesian_cl", "mttv")
# losses whose backward takes the symmetric kernel when LTCL_CUDA_SYMMETRIC=1 (C is A)
SYMMETRIC = ("afcl", "fcl", "acl", "bcl", "rescom", "dcl", "hcl", "mttv")


@pytest.fixture(autouse=True)
def cuda_is_the_emulator(monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors for the test's duration."""
    monkeypatch.setitem(backends._cache, "cuda", _cuda_emu.engine())
    yield


def _data(B=37, D=40, n_cls=5, dtype=torch.float64, seed=0, Q=45):
    """Two views of B samples (2B = 74 rows: three 32-row tiles, the last partial; D = 40: two feature chunks)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, 2, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, n_cls, (B,), generator=g)
    y[:n_cls] = torch.arange(n_cls)
    extra = dict(
        y=y,
        P=F.normalize(torch.randn(n_cls, D, generator=g, dtype=torch.float64), dim=-1),
        Q=F.normalize(torch.randn(Q, D, generator=g, dtype=torch.float64), dim=-1),
        ql=torch.randint(0, n_cls, (Q,), generator=g),
    )
    return x.to(dtype), extra


def _calls(extra):
    y = extra["y"]
    return {
        "supcon": lambda f, P, Q, **kw: lf.supcon(f, y, temperature=0.2, **kw),
        "afcl": lambda f, P, Q, **kw: lf.afcl(f, y, gamma=2.0, eta=5.0, temperature=0.2, **kw),
        "fcl": lambda f, P, Q, **kw: lf.fcl(f, y, gamma=1.5, temperature=0.2, **kw),
        "acl": lambda f, P, Q, **kw: lf.acl(f, y, eta=3.0, temperature=0.2, **kw),
        "bcl": lambda f, P, Q, **kw: lf.bcl(f, y, P, temperature=0.2, **kw),
        "rescom": lambda f, P, Q, **kw: lf.rescom(f, y, Q, extra["ql"], k_pos=2, k_neg=7, temperature=0.2, **kw),
        "dcl": lambda f, P, Q, **kw: lf.dcl(f[:, 0], f[:, 1], temperature=0.3, **kw),
        "hcl": lambda f, P, Q, **kw: lf.hcl(f[:, 0], f[:, 1], beta=1.0, temperature=0.3, **kw),
        "bayesian_cl": lambda f, P, Q, **kw: lf.bayesian_cl(f[:, 0], f[:, 1], temperature=0.3, **kw),
        "mttv": lambda f, P, Q, **kw: lf.mttv(f.reshape(-1, f.shape[-1]), temperature=0.3, **kw),
    }


def _run(fn, backend, x, P, Q):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, P, Q)]
    loss = fn(*leaves, backend=backend, reduction="none")
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape))
    return loss.detach(), [t.grad for t in leaves]


def _compare(name, x, extra, rtol=1e-9, atol=1e-11):
    fn = _calls(extra)[name]
    lc, gc = _run(fn, "cuda", x, extra["P"].to(x.dtype), extra["Q"].to(x.dtype))
    lr, gr = _run(fn, "reference", x, extra["P"].to(x.dtype), extra["Q"].to(x.dtype))
    torch.testing.assert_close(lc, lr, rtol=rtol, atol=atol)
    for what, a, b in zip(("features", "prototypes", "queue"), gc, gr):
        assert (a is None) == (b is None), f"{name}: gradient of {what} present in only one of cuda / reference"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{name}: gradient of {what}")
    return lc, gc


@pytest.mark.parametrize("symmetric", ["0", "1"])
@pytest.mark.parametrize("name", LOSSES)
def test_fp64_matches_the_reference(name, symmetric, monkeypatch):
    monkeypatch.setenv("LTCL_CUDA_SYMMETRIC", symmetric)
    x, extra = _data()
    _compare(name, x, extra)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_kernel_is_what_runs(name, monkeypatch):
    """LTCL_CUDA_SYMMETRIC=1 reaches the symmetric backward launcher: its dX result differs from the general
    dA + dC in the last bits (another summation order), and both agree with the reference (above)."""
    x, extra = _data(seed=3)
    out = {}
    for s in ("0", "1"):
        monkeypatch.setenv("LTCL_CUDA_SYMMETRIC", s)
        assert ("rowstats" in backends.get_engine("cuda").symmetric_ops) == (s == "1")
        out[s] = _run(_calls(extra)[name], "cuda", x, extra["P"], extra["Q"])[1][0]
    assert not torch.equal(out["0"], out["1"]), f"{name}: the symmetric flag did not change the kernel that ran"
    torch.testing.assert_close(out["0"], out["1"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("symmetric", ["0", "1"])
@pytest.mark.parametrize("name", ["supcon", "afcl", "bcl", "rescom", "dcl", "bayesian_cl", "mttv"])
def test_reverse_thread_order_gives_the_same_bits(name, symmetric, monkeypatch):
    """Resuming the block's threads in reverse order changes which thread reaches a barrier first; the
    kernels are deterministic and free of shared-memory races, so the results are bit-identical."""
    monkeypatch.setenv("LTCL_CUDA_SYMMETRIC", symmetric)
    x, extra = _data(B=21, D=33, seed=5)
    fn = _calls(extra)[name]
    monkeypatch.setenv("LTCL_CUDA_EMU_ORDER", "forward")
    l1, g1 = _run(fn, "cuda", x, extra["P"], extra["Q"])
    monkeypatch.setenv("LTCL_CUDA_EMU_ORDER", "reverse")
    l2, g2 = _run(fn, "cuda", x, extra["P"], extra["Q"])
    assert torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", ["0", "1"])
@pytest.mark.parametrize("name", ["supcon", "afcl", "bcl", "dcl", "hcl", "mttv"])
def test_low_precision_against_the_fp64_truth(name, symmetric, dtype, monkeypatch):
    monkeypatch.setenv("LTCL_CUDA_SYMMETRIC", symmetric)
    x, extra = _data(B=29, D=24, seed=1)
    fn = _calls(extra)[name]
    P = extra["P"]
    check(lambda f, p: fn(f, p, extra["Q"].to(f.dtype), backend="cuda"),
          lambda f, p: fn(f, p, extra["Q"].to(f.dtype), backend="reference"),
          [x.to(dtype), P.to(dtype)], grad=True, what=f"{name} {dtype}")


@pytest.mark.parametrize("symmetric", ["0", "1"])
@pytest.mark.parametrize("name", ["supcon", "afcl", "dcl", "mttv"])
@pytest.mark.parametrize("case", ["single_sample", "one_class", "no_positives", "wide_d"])
def test_edge_shapes(name, case, symmetric, monkeypatch):
    monkeypatch.setenv("LTCL_CUDA_SYMMETRIC", symmetric)
    if case == "single_sample":
        x, extra = _data(B=1, D=5, n_cls=1)
    elif case == "one_class":
        x, extra = _data(B=33, D=7, n_cls=1)
    elif case == "no_positives":  # one view, unique labels: no anchor has a positive (supcon/afcl)
        x, extra = _data(B=40, D=9, n_cls=40)
    else:  # D = 300: more than the 256 threads that share a feature loop, several feature chunks
        x, extra = _data(B=9, D=300, n_cls=3)
    if case == "no_positives" and name in ("supcon", "afcl"):
        x = x[:, :1]
    _compare(name, x, extra)


def test_loss_cases_problem_matches_the_reference(monkeypatch):
    """The shared small problem of tests/loss_cases.py (queue, class weights, ref_features) on both paths."""
    x, extra = problem()
    for s in ("0", "1"):
        monkeypatch.setenv("LTCL_CUDA_SYMMETRIC", s)
        for name, call in cases(extra).items():
            xc = x.clone().requires_grad_(True)
            xr = x.clone().requires_grad_(True)
            lc = call(xc, backend="cuda")
            lr = call(xr, backend="reference")
            lc.backward()
            lr.backward()
            torch.testing.assert_close(lc, lr, rtol=1e-9, atol=1e-11, msg=name)
            torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-9, atol=1e-11, msg=f"{name}: gradient")


def test_mining_matches_the_cpu_kernel_and_the_torch_miner():
    """The mining kernel (ResCom's hard pairs): the same indices as the C++ CPU kernel (both break exact ties by
    the smaller key index), and the same selected similarities as the torch miner (whose tie order is
    unspecified, SPEC.md)."""
    from ltcl_fused import ext
    from ltcl_fused.backends.mining_torch import mine
    assert ext.unavailable_reason() is None
    g = torch.Generator().manual_seed(7)
    A = F.normalize(torch.randn(70, 19, generator=g, dtype=torch.float64), dim=-1)
    K = F.normalize(torch.randn(300, 19, generator=g, dtype=torch.float64), dim=-1)
    K[150:160] = K[10:20]  # exact ties
    a_lab, k_lab = torch.randint(0, 4, (70,), generator=g), torch.randint(0, 4, (300,), generator=g)
    S = A @ K.T

    def sims(idx):
        return torch.where(idx >= 0, S.gather(1, idx.clamp(min=0)), torch.full_like(S[:, :1], float("nan")))

    for k_pos, k_neg in [(1, 5), (3, 200), (0, 9), (100, 0)]:
        got = backends.get_engine("cuda").mine(A, a_lab, K, k_lab, k_pos, k_neg)
        cpu = torch.ops.ltcl_fused.topk_mining(A, a_lab, K, k_lab, k_pos, k_neg)
        want = mine(A, a_lab, K, k_lab, k_pos, k_neg)
        for a, c, w in zip(got, cpu, want):
            assert torch.equal(a, c), (k_pos, k_neg)
            assert torch.equal(a < 0, w < 0), (k_pos, k_neg)
            torch.testing.assert_close(sims(a), sims(w), rtol=0, atol=1e-15, equal_nan=True)


def test_binding_rejects_bad_arguments():
    ops = torch.ops.ltcl_fused_cuda_emu
    A = torch.randn(5, 4, dtype=torch.float64)
    lab = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="A \\[M, D\\] and C \\[N, D\\] expected"):
        ops.rowstats_fwd(A, torch.randn(5, 3, dtype=torch.float64), lab, lab, None, None, -1, 1.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="one label per row"):
        ops.rowstats_fwd(A, A, lab[:4], lab, None, None, -1, 1.0, 0.0, False, False)


def test_emulator_reports_a_deadlocked_launch():
    """A kernel whose __syncthreads() only some threads reach: the launch fails (cudaErrorLaunchFailure),
    the binding raises, and the next launch runs normally."""
    ops = torch.ops.ltcl_fused_cuda_emu
    with pytest.raises(RuntimeError, match="barrier or warp collective that not every thread reached"):
        ops._emu_selftest(0)
    torch.testing.assert_close(ops._emu_selftest(1), torch.arange(256, dtype=torch.float64).sum().repeat(8))


def test_emulator_reverse_order_exposes_a_missing_barrier(monkeypatch):
    """A kernel that reads its neighbour's shared-memory slot without a barrier: in forward order the
    neighbour (a higher thread) has not written yet, in reverse order it has; with the barrier both agree."""
    ops = torch.ops.ltcl_fused_cuda_emu
    out = {}
    for order in ("forward", "reverse"):
        monkeypatch.setenv("LTCL_CUDA_EMU_ORDER", order)
        out[order] = (ops._emu_selftest(2), ops._emu_selftest(3))
    assert not torch.equal(out["forward"][0], out["reverse"][0]), "the race went unseen"
    assert torch.equal(out["forward"][1], out["reverse"][1])


def test_rewrite_launches():
    src = ("  k<T, 2><<<dim3(a, b), kThreads, 0, stream>>>(P, f(x, y),\n      z);\n"
           "{ other<<<g, 256, 0, s>>>(q); }\n")
    want = ("  ::ltcl_emu::launch(dim3(dim3(a, b)), dim3(kThreads), [&] { k<T, 2>(P, f(x, y),\n      z); });\n"
            "{ ::ltcl_emu::launch(dim3(g), dim3(256), [&] { other(q); }); }\n")
    assert _cuda_emu.rewrite_launches(src) == want
    with pytest.raises(ValueError, match="grid, block, smem, stream"):
        _cuda_emu.rewrite_launches("k<<<g, b>>>(x);")
    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    for f in ("rowstats_cuda.cu", "mining_cuda.cu", "ssl_cuda.cu"):
        with open(os.path.join(root, f)) as fh:
            text = fh.read()
        out = _cuda_emu.rewrite_launches(text)
        assert "<<<" not in out and out.count("\n") == text.count("\n")
        assert out.count("::ltcl_emu::launch(") == text.count("<<<")
