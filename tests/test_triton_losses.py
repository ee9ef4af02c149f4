"""End to end: ``backend="triton"`` (kernels under the Triton interpreter) vs ``backend="reference"``.

Values and gradients (features, prototypes, ref_features) for every option of supcon / afcl / fcl /
acl / bcl; fp64 gradcheck on tiny shapes; fp32/bf16/fp16 error against an fp64 ground truth no
larger than the same-dtype dense reference's error plus a small slack; torch.library opcheck and a
torch.compile'd training step.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

import ltcl_fused as lf  # noqa: E402
from ltcl_fused.backends import get_engine  # noqa: E402

from _truth import assert_within, check  # noqa: E402

if get_engine("triton").unavailable_reason(torch.device("cpu")) is not None:  # pragma: no cover
    pytest.skip("triton engine unavailable on CPU (TRITON_INTERPRET not set before importing triton)",
                allow_module_level=True)


def _data(B=37, V=2, D=17, n_cls=5, R=0, dtype=torch.float64, seed=0, proto=False):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, V, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, n_cls, (B,), generator=g)
    y[:n_cls] = torch.arange(n_cls)
    ref = F.normalize(torch.randn(R, D, generator=g, dtype=torch.float64), dim=-1) if R else None
    ref_y = torch.randint(0, n_cls, (R,), generator=g) if R else None
    p = F.normalize(torch.randn(n_cls, D, generator=g, dtype=torch.float64), dim=-1) if proto else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), y, cast(ref), ref_y, cast(p)


def _run(fn, backend, tensors, **kw):
    """Loss value and the gradients of every floating input (ones-weighted for reduction='none')."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    loss = fn(**leaves, **kw, backend=backend)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def _compare(fn, tensors, rtol=1e-9, atol=1e-11, **kw):
    lt, gt = _run(fn, "triton", tensors, **kw)
    lr, gr = _run(fn, "reference", tensors, **kw)
    torch.testing.assert_close(lt, lr, rtol=rtol, atol=atol)
    assert gt.keys() == gr.keys()
    for k in gt:
        assert gt[k] is not None, f"no gradient for {k}"
        torch.testing.assert_close(gt[k], gr[k], rtol=rtol, atol=atol, msg=f"gradient of {k}")


def _supcon(features, labels=None, ref_features=None, **kw):
    return lf.supcon(features, labels, ref_features=ref_features, **kw)


def _afcl(features, labels=None, ref_features=None, **kw):
    return lf.afcl(features, labels, ref_features=ref_features, **kw)


SUPCON_OPTS = [
    dict(),
    dict(base_temperature=0.07, temperature=0.1),
    dict(contrast_mode="one"),
    dict(labels_none=True),
    dict(ref=True),
    dict(ref=True, labels_none=True),
    dict(reduction="none", normalize=True),
]


@pytest.mark.parametrize("opts", SUPCON_OPTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_supcon_vs_reference(opts):
    opts = dict(opts)
    x, y, ref, ref_y, _ = _data(R=11 if opts.pop("ref", False) else 0)
    if opts.pop("labels_none", False):
        y, ref_y = None, None
    t = dict(features=x, ref_features=ref)
    _compare(_supcon, t, labels=y, ref_labels=ref_y, **opts)


AFCL_OPTS = [
    dict(gamma=0.0, eta=0.0),                        # CL
    dict(gamma=2.0, eta=0.0),                        # FCL
    dict(gamma=0.0, eta=1.5),                        # ACL
    dict(gamma=0.5, eta=3.0),                        # AFCL
    dict(gamma=2.0, eta=1.0, normalize_by="pairs"),
    dict(gamma=1.0, eta=1.0, contrast_mode="one"),
    dict(gamma=0.5, eta=2.0, labels_none=True),
    dict(gamma=0.5, eta=2.0, ref=True, reduction="none"),
    dict(gamma=2.0, eta=10.0, temperature=0.05),     # sharp: dominant columns
]


@pytest.mark.parametrize("opts", AFCL_OPTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_afcl_vs_reference(opts):
    opts = dict(opts)
    x, y, ref, ref_y, _ = _data(R=9 if opts.pop("ref", False) else 0)
    if opts.pop("labels_none", False):
        y, ref_y = None, None
    _compare(_afcl, dict(features=x, ref_features=ref), labels=y, ref_labels=ref_y, **opts)


def test_fcl_acl_vs_reference():
    x, y, _, _, _ = _data(B=20, D=130)  # D above one 64-wide chunk of the interpreter config
    _compare(lambda features, **kw: lf.fcl(features, y, **kw), dict(features=x), gamma=1.0)
    _compare(lambda features, **kw: lf.acl(features, y, **kw), dict(features=x), eta=2.0)


@pytest.mark.parametrize("shape", [(37, 2, 17), (65, 2, 64), (1, 1, 3), (2, 1, 3)], ids=str)
def test_bcl_vs_reference(shape):
    B, V, D = shape
    x, y, _, _, p = _data(B=B, V=V, D=D, n_cls=min(5, B), proto=True)
    _compare(lambda features, prototypes, **kw: lf.bcl(features, y, prototypes, **kw),
             dict(features=x, prototypes=p), temperature=0.1)


@pytest.mark.parametrize("N", [1, 2, 129], ids=lambda n: f"N{n}")
def test_supcon_afcl_sizes(N):
    x, y, _, _, _ = _data(B=N, V=1, D=3 if N < 100 else 64, n_cls=1 if N <= 2 else 4)
    _compare(_supcon, dict(features=x), labels=y)
    _compare(_afcl, dict(features=x), labels=y, gamma=0.5, eta=1.0)


def test_single_negative_column_matches_torch_backend():
    """N = 2, two classes: each anchor's only column is a negative with p = 1, T⁻ = inf. The
    engine contract fixes the gradient there; the fused engine must agree with the torch engine."""
    x, y, _, _, _ = _data(B=2, V=1, D=3, n_cls=2)
    lt, gt = _run(_afcl, "triton", dict(features=x), labels=y, gamma=0.5, eta=1.0)
    lr, gr = _run(_afcl, "torch", dict(features=x), labels=y, gamma=0.5, eta=1.0)
    assert torch.isinf(lt) and torch.isinf(lr)
    torch.testing.assert_close(gt["features"], gr["features"], rtol=1e-12, atol=1e-12)


# --- fp64 gradcheck on tiny shapes ------------------------------------------------------------
def test_gradcheck_tiny():
    x, y, ref, ref_y, p = _data(B=4, V=2, D=3, n_cls=2, R=3, proto=True)
    xg = x.clone().requires_grad_(True)
    rg = ref.clone().requires_grad_(True)
    pg = p.clone().requires_grad_(True)
    kw = dict(backend="triton", temperature=0.5)
    assert torch.autograd.gradcheck(lambda a: lf.supcon(a, y, **kw), (xg,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, r: lf.afcl(a, y, ref_features=r, ref_labels=ref_y, gamma=0.5, eta=1.0,
                                                         **kw), (xg, rg), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a: lf.afcl(a, y, gamma=2.0, eta=0.5, normalize_by="pairs",
                                                      reduction="none", **kw), (xg,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, q: lf.bcl(a, y, q, **kw), (xg, pg), fast_mode=True)


# --- low precision: error vs an fp64 ground truth (tests/_truth.py) ----------------------------
LP_CASES = {
    "supcon": lambda features, **kw: lf.supcon(features, _LP["y"], temperature=0.1, **kw),
    "afcl": lambda features, **kw: lf.afcl(features, _LP["y"], gamma=2.0, eta=2.0, temperature=0.1, **kw),
    "bcl": lambda features, prototypes, **kw: lf.bcl(features, _LP["y"], prototypes, temperature=0.1, **kw),
}
_LP = {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss", sorted(LP_CASES))
def test_low_precision_error(loss, dtype):
    x, y, _, _, p = _data(B=40, V=2, D=32, n_cls=4, proto=True, seed=3)
    _LP["y"] = y
    x, p = x.to(dtype), p.to(dtype)  # the inputs as the low-precision run sees them
    keys = ["features", "prototypes"] if loss == "bcl" else ["features"]
    t = dict(features=x, prototypes=p)

    def run(backend):
        return lambda *xs: LP_CASES[loss](**dict(zip(keys, xs)), backend=backend)

    check(run("triton"), run("reference"), [t[k] for k in keys], what=f"{loss} {dtype}")


# --- torch.library ops and torch.compile --------------------------------------------------------
def test_opcheck_ops():
    # float64 needs Triton >= 3.5: fp32 ops on an older Triton
    dt = torch.float64 if get_engine("triton").dtype_reason("rowstats", torch.float64) is None else torch.float32
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 5, generator=g, dtype=torch.float64).to(dt)
    C = torch.cat([A, torch.randn(3, 5, generator=g, dtype=torch.float64).to(dt)])
    al = torch.tensor([0, 1, 0, 1, 2, 2])
    cl = torch.cat([al, torch.tensor([0, 1, 2])])
    bs, bo = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    bs, bo = bs.to(dt), bo.to(dt)
    fwd = torch.ops.ltcl_fused.triton_rowstats_fwd.default
    bwd = torch.ops.ltcl_fused.triton_rowstats_bwd.default
    torch.library.opcheck(fwd, (A, C, al, cl, None, None, 2.0, 0.5, 0, True, "ieee"))
    torch.library.opcheck(fwd, (A.float(), C.float(), al, cl, bs.float(), bo.float(), 2.0, 0.0, -1, False, "ieee"))
    st = fwd(A, C, al, cl, bs, bo, 2.0, 0.5, 0, True, "ieee")
    co = [torch.randn(6, generator=g, dtype=torch.float64).to(dt) for _ in range(5)]
    torch.library.opcheck(bwd, (A, C, al, cl, bs, bo, st[0], st[6], st[7], *co, 2.0, 0.5, 0, True, "ieee"))


def test_torch_compile_training_step():
    """A training step calling ltcl_fused.afcl(backend='triton') under torch.compile (aot_eager here:
    the interpreter's kernels run as opaque custom ops; on a GPU they are triton_ops)."""
    torch._dynamo.reset()
    x, y, _, _, _ = _data(B=8, V=2, D=16, dtype=torch.float32)
    lin = torch.nn.Linear(16, 16, dtype=torch.float32)

    def step(inp):
        z = lin(inp)
        loss = lf.afcl(z, y, gamma=0.5, eta=1.0, temperature=0.5, backend="triton", check_finite=False)
        loss.backward()
        return loss.detach()

    eager = step(x)
    g_eager = lin.weight.grad.clone()
    lin.weight.grad = None
    compiled = torch.compile(step, backend="aot_eager")(x)

    # compiled and eager fp32 steps, each against the fp64 truth of the same step (tests/_truth.py)
    def dense_step(dtype):
        W = lin.weight.detach().to(dtype).requires_grad_(True)
        z = torch.nn.functional.linear(x.to(dtype), W, lin.bias.detach().to(dtype))
        loss = lf.afcl(z, y, gamma=0.5, eta=1.0, temperature=0.5, backend="reference")
        return loss.detach(), torch.autograd.grad(loss, W)[0]

    (rv, rg), (tv, tg) = dense_step(torch.float32), dense_step(torch.float64)
    for what, v, gw in (("compiled", compiled, lin.weight.grad), ("eager", eager, g_eager)):
        assert_within(v, rv, tv, what=f"{what} loss", floor=1.0)
        assert_within(gw, rg, tg, what=f"{what} weight gradient")
