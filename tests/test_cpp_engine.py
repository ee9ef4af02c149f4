"""The C++ extension's CPU kernels (backend="cpu") against the engine contract and the dense reference.

The first test that needs the extension builds it (about a minute on 2 cores, cached afterwards).
"""
import itertools
import math

import pytest
import torch

import ltcl_fused as lf
from ltcl_fused.engine.contract import dense_backward, dense_forward

from _cpp import built, coefs, op, random_bias, training_problem  # noqa: F401 (built: the autouse fixture)
from _truth import assert_within, check


def _problem(M, N, D, dtype, self_offset, n_cls=4, bias=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(M, D, generator=g, dtype=torch.float64).to(dtype) * scale
    C = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype) * scale
    al = torch.randint(0, n_cls, (M,), generator=g)
    cl = torch.randint(0, n_cls, (N,), generator=g)
    if self_offset >= 0:
        k = min(M, N - self_offset)
        C[self_offset:self_offset + k] = A[:k]
        cl[self_offset:self_offset + k] = al[:k]
    bs, bo = random_bias(g, N, dtype, bias)
    return A, C, al, cl, bs, bo


def _close(got, ref, rtol, atol, what):
    assert got.dtype == ref.dtype, what
    assert torch.allclose(got, ref, rtol=rtol, atol=atol), \
        f"{what}: max abs err {(got - ref).abs().nan_to_num().max().item():.3g}"


SHAPES = [(1, 1, 3), (2, 2, 17), (37, 37, 3), (37, 129, 17), (129, 129, 130), (300, 300, 17), (37, 300, 130)]
OPTIONS = [  # bias, focal, gamma
    (False, False, 0.0), (True, False, 0.0), (False, True, 0.0), (False, True, 0.5), (False, True, 2.0),
    (True, True, 2.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M,N,D", SHAPES)
def test_contract_forward_backward(M, N, D, dtype):
    tol = dict(rtol=1e-9, atol=1e-10)  # fp64; fp32 follows tests/_truth.py
    for (bias, focal, gamma), self_offset in itertools.product(OPTIONS, [0, -1] + ([N - M] if N > M else [])):
        if self_offset >= 0 and M + self_offset > N:
            continue
        A, C, al, cl, bs, bo = _problem(M, N, D, dtype, self_offset, bias=bias, seed=M + N + D)
        args = (A, C, al, cl, bs, bo)
        it = 1 / 0.3
        what = f"M={M} N={N} D={D} bias={bias} focal={focal} gamma={gamma} self_offset={self_offset}"
        ref = dense_forward(A, C, al, cl, self_offset, it, bs, bo, gamma, focal)
        got = op().rowstats_fwd(*args, self_offset, it, gamma, focal)
        names = ["lse", "pos_sum", "fpos", "fneg", "upos", "uneg", "top", "lrest"]
        for name, g_, r_ in zip(names, got, ref):
            if name == "top":
                assert g_.dtype == r_.dtype and (dtype != torch.float64 or torch.equal(g_, r_)), what
            elif dtype == torch.float64:
                _close(g_, r_, what=f"{what} {name}", **tol)
            else:
                assert g_.dtype == r_.dtype, f"{what} {name}"
        if dtype != torch.float64:  # fp32: against the fp64 truth (tests/_truth.py)
            check(lambda A, C, bs, bo: op().rowstats_fwd(A, C, al, cl, bs, bo, self_offset, it, gamma, focal),
                  lambda A, C, bs, bo: dense_forward(A, C, al, cl, self_offset, it, bs, bo, gamma, focal),
                  [A, C, bs, bo], grad=False, what=what, names=names)
        lse, top, lrest = ref[0], ref[6], ref[7]
        cpos, cposf, cneg, r, rt = coefs(M, lse.dtype)
        rd = dense_backward(A, C, al, cl, self_offset, it, bs, bo, gamma, focal, lse, top, lrest,
                            cpos, cposf, cneg, r, rt)
        gd = op().rowstats_bwd(*args, self_offset, it, gamma, focal, lse, top, lrest, cpos, cposf, cneg, r, rt)
        for name, g_, r_ in zip(["dA", "dC"], gd, rd):
            if dtype == torch.float64:
                _close(g_, r_, what=f"{what} {name}", **tol)
            else:
                assert g_.dtype == r_.dtype, f"{what} {name}"
        if dtype != torch.float64:
            check(lambda A, C, bs, bo, lse, lrest, *co: op().rowstats_bwd(A, C, al, cl, bs, bo, self_offset, it, gamma,
                                                                          focal, lse, top, lrest, *co),
                  lambda A, C, bs, bo, lse, lrest, *co: dense_backward(A, C, al, cl, self_offset, it, bs, bo, gamma,
                                                                       focal, lse, top, lrest, *co),
                  [A, C, bs, bo, lse, lrest, cpos, cposf, cneg, r, rt], grad=False, what=what, names=["dA", "dC"],
                  value_floor=0)


def test_zero_coefficients_contribute_exactly_zero():
    """u- = inf at p = 1 (a dominant negative) never meets a zero coefficient: no NaN."""
    A = torch.tensor([[30.0, 0.0], [0.0, 1.0]])
    C = torch.tensor([[30.0, 0.0], [-30.0, 0.0], [0.0, 1.0]])
    al, cl = torch.tensor([0, 1]), torch.tensor([1, 2, 1])
    st, _ = check(lambda A, C: op().rowstats_fwd(A, C, al, cl, None, None, -1, 1.0, 2.0, True),
                  lambda A, C: dense_forward(A, C, al, cl, -1, 1.0, None, None, 2.0, True), [A, C], grad=False)
    for g_ in st:  # rest underflows: fneg = inf (as in the fp64 truth), but nothing is NaN
        assert not torch.isnan(g_.float()).any()
    z = torch.zeros(2)
    dA, dC = op().rowstats_bwd(A, C, al, cl, None, None, -1, 1.0, 2.0, True, st[0], st[6], st[7],
                               torch.ones(2), z, z, z, z)
    assert torch.isfinite(dA).all() and torch.isfinite(dC).all()


def test_dominant_column_fp32():
    """A column that leads the rest by many nats: log(1-p) and the gradient stay accurate in fp32."""
    for lead in (10.0, 25.0, 60.0):
        A64, C64, al, cl, _, _ = _problem(5, 40, 8, torch.float64, -1, seed=3, scale=0.1)
        C64[7] = A64[0] / A64[0].norm() * math.sqrt(lead)
        A64[0] = A64[0] / A64[0].norm() * math.sqrt(lead)
        cl[7] = (al[0] + 1) % 4  # the dominant column is a negative
        # fp32 against the fp64 truth, bounded by the fp32 dense oracle's own error (tests/_truth.py)
        got, _ = check(lambda A, C: op().rowstats_fwd(A, C, al, cl, None, None, -1, 1.0, 2.0, True),
                       lambda A, C: dense_forward(A, C, al, cl, -1, 1.0, None, None, 2.0, True),
                       [A64.float(), C64.float()], grad=False, what=f"lead {lead}")
        co = [t.float() for t in coefs(5, torch.float64)]
        top = got[6]
        check(lambda A, C, lse, lrest, *co: op().rowstats_bwd(A, C, al, cl, None, None, -1, 1.0, 2.0, True,
                                                              lse, top, lrest, *co),
              lambda A, C, lse, lrest, *co: dense_backward(A, C, al, cl, -1, 1.0, None, None, 2.0, True,
                                                           lse, top, lrest, *co),
              [A64.float(), C64.float(), got[0], got[7], *co], grad=False, what=f"lead {lead}", value_floor=0)


def test_half_precision_inputs_accumulate_in_fp32():
    A, C, al, cl, _, _ = _problem(37, 37, 17, torch.float32, 0)
    for dt in (torch.bfloat16, torch.float16):
        # the oracle on 16-bit inputs accumulates in fp32 too: its error is the bound's yardstick
        got, _ = check(lambda A, C: op().rowstats_fwd(A, C, al, cl, None, None, 0, 2.0, 1.0, True),
                       lambda A, C: dense_forward(A, C, al, cl, 0, 2.0, None, None, 1.0, True),
                       [A.to(dt), C.to(dt)], grad=False, what=str(dt))
        assert got[0].dtype == torch.float32
        z = torch.ones(37)
        dA, dC = op().rowstats_bwd(A.to(dt), C.to(dt), al, cl, None, None, 0, 2.0, 1.0, True, got[0], got[6],
                                   got[7], z, z, z, z, z)
        assert dA.dtype == dt and dC.dtype == dt


# ------------------------------------------------------------------ losses end to end vs the reference

def _loss_cases():
    return [
        ("supcon", lambda x, y, P, b: lf.supcon(x, y, backend=b)),
        ("simclr", lambda x, y, P, b: lf.supcon(x, None, temperature=0.5, backend=b)),
        ("supcon_one_base", lambda x, y, P, b: lf.supcon(x, y, contrast_mode="one", base_temperature=0.1, backend=b)),
        ("supcon_ref_none", lambda x, y, P, b: lf.supcon(x, y, ref_features=P, ref_labels=torch.arange(P.shape[0]) % 3,
                                                         reduction="none", backend=b)),
        ("cl", lambda x, y, P, b: lf.afcl(x, y, backend=b)),
        ("fcl", lambda x, y, P, b: lf.fcl(x, y, gamma=1.0, backend=b)),
        ("acl", lambda x, y, P, b: lf.acl(x, y, eta=3.0, backend=b)),
        ("afcl", lambda x, y, P, b: lf.afcl(x, y, gamma=2.0, eta=5.0, backend=b)),
        ("afcl_pairs_sum", lambda x, y, P, b: lf.afcl(x, y, gamma=0.5, eta=1.0, normalize_by="pairs",
                                                      reduction="sum", backend=b)),
        ("afcl_normalize", lambda x, y, P, b: lf.afcl(x, y, gamma=2.0, eta=1.0, normalize=True, backend=b)),
        ("bcl", lambda x, y, P, b: lf.bcl(x, y, P, backend=b)),
        ("bcl_none_norm", lambda x, y, P, b: lf.bcl(x, y, P, normalize=True, reduction="none", backend=b)),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,fn", _loss_cases(), ids=[c[0] for c in _loss_cases()])
def test_losses_vs_reference(name, fn, dtype):
    g = torch.Generator().manual_seed(7)
    B, D, n_cls = 23, 17, 5
    x0 = (torch.randn(B, 2, D, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    y = torch.randint(0, n_cls, (B,), generator=g)
    P0 = (torch.randn(n_cls, D, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    if dtype != torch.float64:  # fp32: against the fp64 truth (tests/_truth.py)
        check(lambda x, P: fn(x, y, P, "cpu"), lambda x, P: fn(x, y, P, "reference"), [x0, P0], what=name)
        return
    out = {}
    for b in ("cpu", "reference"):
        x = x0.clone().requires_grad_(True)
        P = P0.clone().requires_grad_(True)
        loss = fn(x, y, P, b)
        gx, gP = torch.autograd.grad(loss.sum(), [x, P], allow_unused=True)
        out[b] = (loss, gx, gP)
    tol = dict(rtol=1e-9, atol=1e-10)
    for k, (a, r) in enumerate(zip(out["cpu"], out["reference"])):
        if r is None:
            continue
        assert a is not None, (name, k)
        assert torch.allclose(a, r.to(a.dtype), **tol), (name, k, (a - r).abs().max().item())


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(6, 2, 5, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    y = torch.tensor([0, 1, 0, 2, 1, 1])
    P = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lf.supcon(x, y, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x: lf.afcl(x, y, gamma=2.0, eta=5.0, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x: lf.afcl(x, y, gamma=0.5, eta=1.0, normalize_by="pairs",
                                                      backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x, P: lf.bcl(x, y, P, backend="cpu"), (x, P))
    # the op itself (through its registered autograd formula)
    A = (torch.randn(7, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    C = (torch.randn(9, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    al, cl = torch.randint(0, 3, (7,), generator=g), torch.randint(0, 3, (9,), generator=g)

    def f(A, C):
        lse, pos, fpos, fneg, *_ = op().rowstats_fwd(A, C, al, cl, None, None, 1, 1.5, 1.5, True)
        return lse.sum() + 0.5 * pos.sum() + 0.3 * fpos.sum() + 0.7 * fneg.sum()

    assert torch.autograd.gradcheck(f, (A, C))


def test_empty_rows_and_n1():
    x = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    for fn in (lambda b: lf.supcon(x, torch.tensor([0]), backend=b),
               lambda b: lf.afcl(x, torch.tensor([0]), gamma=2.0, eta=1.0, backend=b)):
        loss = fn("cpu")
        (gx,) = torch.autograd.grad(loss, [x])
        assert torch.isfinite(loss) and torch.equal(gx, torch.zeros_like(gx))
        assert torch.allclose(loss, fn("reference"), rtol=1e-10, atol=1e-12)  # fp64
    st = op().rowstats_fwd(x.detach(), x.detach(), torch.tensor([0]), torch.tensor([0]), None, None, 0, 1.0, 0.0, True)
    assert st[0].item() == -math.inf and st[6].item() == -1


# ------------------------------------------------------------------ determinism, registration, compile

def test_one_and_two_threads_bit_identical():
    old = torch.get_num_threads()
    # several row blocks and several backward super-blocks, with non-multiple sizes
    A, C, al, cl, bs, bo = _problem(600, 700, 130, torch.float32, 0, n_cls=7, bias=True)
    co = coefs(600, torch.float32)
    res = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for bias in (False, True):
                b = (bs, bo) if bias else (None, None)
                st = op().rowstats_fwd(A, C, al, cl, *b, 0, 1 / 0.07, 2.0, True)
                gr = op().rowstats_bwd(A, C, al, cl, *b, 0, 1 / 0.07, 2.0, True, st[0], st[6], st[7], *co)
                res.append((nt, bias, st + gr))
    finally:
        torch.set_num_threads(old)
    for (_, b1, r1), (_, b2, r2) in itertools.product(res[:2], res[2:]):
        if b1 == b2:
            for t1, t2 in zip(r1, r2):
                assert torch.equal(t1, t2)


def test_opcheck():
    for bias, focal in [(False, False), (True, True)]:
        A, C, al, cl, bs, bo = _problem(9, 13, 5, torch.float64, 2, bias=bias)
        A.requires_grad_(True)
        C.requires_grad_(True)
        torch.library.opcheck(op().rowstats_fwd.default, (A, C, al, cl, bs, bo, 2, 2.0, 1.5, focal))
        st = op().rowstats_fwd(A.detach(), C.detach(), al, cl, bs, bo, 2, 2.0, 1.5, focal)
        co = coefs(9, torch.float64)
        torch.library.opcheck(op().rowstats_bwd.default,
                              (A.detach(), C.detach(), al, cl, bs, bo, 2, 2.0, 1.5, focal, st[0], st[6], st[7], *co))


def test_torch_compile_fullgraph_training_step():
    x, y, lin = training_problem(32)

    def step(x, y):
        z = torch.nn.functional.normalize(lin(x), dim=-1)
        return lf.afcl(z, y, gamma=2.0, eta=5.0, backend="cpu", check_finite=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, y)
    loss_c.backward()
    g_c = lin.weight.grad.clone()
    lin.weight.grad = None
    loss_e = step(x, y)
    loss_e.backward()
    # compiled and eager fp32 steps, each against the fp64 truth of the same step (tests/_truth.py)
    def dense_step(dtype):
        W = lin.weight.detach().to(dtype).requires_grad_(True)
        z = torch.nn.functional.linear(x.to(dtype), W, lin.bias.detach().to(dtype))
        z = torch.nn.functional.normalize(z, dim=-1)
        loss = lf.afcl(z, y, gamma=2.0, eta=5.0, backend="reference")
        return loss.detach(), torch.autograd.grad(loss, W)[0]

    (rv, rg), (tv, tg) = dense_step(torch.float32), dense_step(torch.float64)
    for what, v, gw in (("compiled", loss_c, g_c), ("eager", loss_e, lin.weight.grad)):
        assert_within(v.detach(), rv, tv, what=f"{what} loss", floor=1.0)
        assert_within(gw, rg, tg, what=f"{what} weight gradient")


def test_engine_reports_devices():
    from ltcl_fused.backends import get_engine
    cpu, cuda = get_engine("cpu"), get_engine("cuda")
    assert cpu.unavailable_reason(torch.device("cpu")) is None
    assert "cpu" in cpu.unavailable_reason(torch.device("cuda"))
    assert cuda.unavailable_reason(torch.device("cpu")) is not None
    assert "\n" not in cuda.unavailable_reason(torch.device("cuda"))
