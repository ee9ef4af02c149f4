"""backend="torch" (chunked PyTorch) against the engine's dense oracle and against ltcl_fused.reference."""
import itertools
import math

import pytest
import torch

import ltcl_fused as lf
from ltcl_fused.backends import torch_chunked
from ltcl_fused.backends.torch_chunked import TorchChunkedEngine
from ltcl_fused.engine.contract import dense_backward, dense_forward

from _truth import check

ENG = TorchChunkedEngine()


@pytest.fixture(params=[7, 1 << 20], ids=["tiny-blocks", "one-block"])
def block_elems(request, monkeypatch):
    """Run each test with row blocks of a few rows (many blocks, ragged last block) and with one block."""
    monkeypatch.setattr(torch_chunked, "BLOCK_ELEMENTS", request.param)
    return request.param


def _engine_case(M, N, D, self_offset, bias, n_cls=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=dtype), dim=1)
    A = C[:M].clone() if self_offset >= 0 else \
        torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=dtype), dim=1)
    c_lab = torch.randint(0, n_cls, (N,), generator=g)
    a_lab = c_lab[:M].clone() if self_offset >= 0 else torch.randint(0, n_cls, (M,), generator=g)
    bs = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    bo = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    return A, C, a_lab, c_lab, bs, bo


@pytest.mark.parametrize("M,N,D,self_offset", [(1, 1, 3, 0), (2, 2, 17, 0), (37, 37, 5, 0), (13, 40, 9, 0),
                                                (11, 29, 4, -1), (20, 20, 130, 0)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gamma,focal", [(0.0, False), (0.0, True), (0.5, True), (2.0, True)])
def test_engine_matches_dense_contract(block_elems, M, N, D, self_offset, bias, gamma, focal):
    A, C, a_lab, c_lab, bs, bo = _engine_case(M, N, D, self_offset, bias)
    args = (A, C, a_lab, c_lab, self_offset, 1 / 0.3, bs, bo, gamma, focal)
    got = ENG.rowstats_forward(*args)
    want = dense_forward(*args)
    for name, g_, w_ in zip(("lse", "pos_sum", "fpos", "fneg", "upos", "uneg", "top", "lrest"), got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-10, msg=name)
    gen = torch.Generator().manual_seed(1)
    coefs = [torch.randn(M, generator=gen, dtype=torch.float64) for _ in range(5)]
    coefs[1][::3] = 0  # zero coefficients must contribute exactly nothing
    dA, dC = ENG.rowstats_backward(*args, got[0], got[6], got[7], *coefs)
    wA, wC = dense_backward(*args, got[0], got[6], got[7], *coefs)
    torch.testing.assert_close(dA, wA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dC, wC, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- losses vs the dense reference

def _data(B, V, D, n_cls, dtype=torch.float64, seed=0, ref=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, V, D) if V else (B, D)
    x = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    y = torch.randint(0, n_cls, (B,), generator=g)
    r = torch.nn.functional.normalize(torch.randn(ref, D, generator=g, dtype=torch.float64), dim=-1).to(dtype) \
        if ref else None
    rl = torch.randint(0, n_cls + 1, (ref,), generator=g) if ref else None
    return x, y, r, rl


def _compare(loss_fn, inputs, kwargs, rtol, atol, grad_names):
    """Value and gradients of backend='torch' vs backend='reference' on leaf copies of ``inputs``; fp32
    (``rtol`` None): against the fp64 truth (tests/_truth.py)."""
    if rtol is None:
        keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        fixed = {k: v for k, v in inputs.items() if k not in keys}

        def run(backend):
            return lambda *xs: loss_fn(**dict(zip(keys, xs)), **fixed, **kwargs, backend=backend)

        check(run("torch"), run("reference"), [inputs[k] for k in keys], grad=[keys.index(k) for k in grad_names])
        return
    outs = {}
    for backend in ("torch", "reference"):
        leaves = {k: (v.detach().clone().requires_grad_(k in grad_names) if isinstance(v, torch.Tensor)
                      and v.is_floating_point() else v) for k, v in inputs.items()}
        val = loss_fn(**leaves, **kwargs, backend=backend)
        w = torch.linspace(0.5, 1.5, val.numel(), dtype=val.dtype).reshape(val.shape)
        (val * w).sum().backward()
        outs[backend] = (val.detach(), {k: leaves[k].grad for k in grad_names})
    (v1, g1), (v2, g2) = outs["torch"], outs["reference"]
    torch.testing.assert_close(v1.to(v2.dtype), v2, rtol=rtol, atol=atol)
    for k in grad_names:
        torch.testing.assert_close(g1[k].to(g2[k].dtype), g2[k], rtol=rtol, atol=atol, msg=k)


TOL = {torch.float64: (1e-7, 1e-9), torch.float32: (None, None)}  # fp32: tests/_truth.py
SHAPES = [(1, 0), (1, 2), (2, 2), (37, 0), (13, 3), (30, 2)]  # (B, V): V=0 means [N, D] input


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,V", SHAPES)
@pytest.mark.parametrize("opts", [dict(), dict(labels=None), dict(contrast_mode="one"),
                                  dict(base_temperature=0.2, temperature=0.1), dict(ref=5), dict(n_cls=1),
                                  dict(normalize=True)])
def test_supcon_vs_reference(block_elems, dtype, B, V, opts):
    opts = dict(opts)
    if opts.get("contrast_mode") == "one" and not V:
        pytest.skip("contrast_mode='one' needs views")
    x, y, r, rl = _data(B, V, 17, opts.pop("n_cls", 4), dtype, ref=opts.pop("ref", 0))
    inputs = dict(features=x, labels=opts.pop("labels", y))
    if r is not None:
        inputs.update(ref_features=r, ref_labels=rl)
    grads = ["features"] + (["ref_features"] if r is not None else [])
    for red in ("mean", "none"):
        _compare(lf.supcon, inputs, dict(opts, reduction=red), *TOL[dtype], grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,V", SHAPES)
@pytest.mark.parametrize("gamma,eta", [(0.0, 0.0), (2.0, 0.0), (0.0, 5.0), (2.0, 5.0), (0.5, 1.0)])
@pytest.mark.parametrize("normalize_by", ["batch", "pairs"])
def test_afcl_vs_reference(block_elems, dtype, B, V, gamma, eta, normalize_by):
    x, y, _, _ = _data(B, V, 17, 3, dtype)
    _compare(lf.afcl, dict(features=x, labels=y),
             dict(gamma=gamma, eta=eta, normalize_by=normalize_by, temperature=0.5, reduction="none"),
             *TOL[dtype], ["features"])


@pytest.mark.parametrize("opts", [dict(ref=4), dict(labels=None), dict(n_cls=1), dict(contrast_mode="one")])
def test_afcl_options_vs_reference(block_elems, opts):
    opts = dict(opts)
    x, y, r, rl = _data(9, 2, 6, opts.pop("n_cls", 3), ref=opts.pop("ref", 0))
    inputs = dict(features=x, labels=opts.pop("labels", y))
    if r is not None:
        inputs.update(ref_features=r, ref_labels=rl)
    grads = ["features"] + (["ref_features"] if r is not None else [])
    for normalize_by in ("batch", "pairs"):
        _compare(lf.afcl, inputs, dict(opts, gamma=1.5, eta=3.0, normalize_by=normalize_by), *TOL[torch.float64],
                 grads)


def test_fcl_acl_are_afcl():
    x, y, _, _ = _data(10, 2, 5, 3)
    torch.testing.assert_close(lf.fcl(x, y, gamma=2.0, backend="torch"),
                               lf.reference.afcl(x, y, gamma=2.0, eta=0.0))
    torch.testing.assert_close(lf.acl(x, y, eta=3.0, backend="torch"), lf.reference.afcl(x, y, gamma=0.0, eta=3.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,V,n_cls", [(1, 1, 1), (1, 2, 3), (2, 2, 2), (13, 2, 5), (40, 3, 7), (16, 2, 1)])
def test_bcl_vs_reference(block_elems, dtype, B, V, n_cls):
    x, y, _, _ = _data(B, V, 11, n_cls, dtype, seed=3)
    y = y % n_cls
    protos = torch.nn.functional.normalize(torch.randn(n_cls, 11, dtype=torch.float64), dim=-1).to(dtype)
    for red in ("mean", "none"):
        _compare(lf.bcl, dict(features=x, labels=y, prototypes=protos), dict(temperature=0.2, reduction=red),
                 *TOL[dtype], ["features", "prototypes"])


def test_gradcheck_torch_backend():
    x, y, r, rl = _data(5, 2, 3, 2, ref=2)
    protos = torch.randn(2, 3, dtype=torch.float64)
    cases = [
        (lambda f, rf: lf.supcon(f, y, ref_features=rf, ref_labels=rl, backend="torch", temperature=0.5), (x, r)),
        (lambda f, rf: lf.afcl(f, y, gamma=1.5, eta=2.0, ref_features=rf, ref_labels=rl, backend="torch",
                               temperature=0.5), (x, r)),
        (lambda f, rf: lf.afcl(f, y, gamma=0.7, eta=1.0, normalize_by="pairs", backend="torch") + 0 * rf.sum(),
         (x, r)),
        (lambda f, p: lf.bcl(f, y, p, backend="torch", temperature=0.5), (x, protos)),
    ]
    for fn, args in cases:
        args = tuple(a.detach().clone().requires_grad_(True) for a in args)
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def test_no_positive_anchor_is_zero_and_counts_in_mean():
    # hand-worked: 3 anchors, labels 0,1,1 -> anchor 0 has no positive; its loss is 0 and the mean divides by 3
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1])
    per = lf.supcon(x, y, temperature=1.0, reduction="none", backend="torch")
    # anchor 1: columns {0: s=0, 2: s=-1}, positive 2 -> -(−1 − log(e^0 + e^-1))
    import math
    want1 = -(-1.0 - math.log(1.0 + math.exp(-1.0)))
    # anchor 2: columns {0: s=0, 1: s=-1}, positive 1 -> same value by symmetry
    torch.testing.assert_close(per, torch.tensor([0.0, want1, want1], dtype=torch.float64))
    torch.testing.assert_close(lf.supcon(x, y, temperature=1.0, backend="torch"), per.sum() / 3)
    per.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_single_sample_everything_finite():
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(1, 4, dtype=dtype, requires_grad=True)
        y = torch.tensor([3])
        total = (lf.supcon(x, y, backend="torch") + lf.afcl(x, y, gamma=2.0, eta=3.0, backend="torch")
                 + lf.afcl(x, y, gamma=2.0, eta=3.0, normalize_by="pairs", backend="torch"))
        assert total.item() == 0.0
        total.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_vs_fp64_truth(dtype):
    """Error vs the fp64 ground truth is no larger than the same-dtype dense reference's (plus slack)."""
    x, y, _, _ = _data(64, 2, 32, 5, seed=7)
    for name, fn in (("supcon", lambda f, b: lf.supcon(f, y, temperature=0.1, backend=b)),
                     ("afcl", lambda f, b: lf.afcl(f, y, gamma=2.0, eta=5.0, temperature=0.1, backend=b))):
        check(lambda f: fn(f, "torch"), lambda f: fn(f, "reference"), [x.to(dtype)], what=name)  # tests/_truth.py


def test_multi_view_flattening_is_view_major():
    # [B, V, D] must equal the [V·B, D] input with labels tiled V times (SupContrast's convention)
    x, y, _, _ = _data(6, 3, 5, 2)
    flat = torch.cat(torch.unbind(x, dim=1), 0)
    torch.testing.assert_close(lf.supcon(x, y, backend="torch", reduction="none"),
                               lf.supcon(flat, y.repeat(3), backend="torch", reduction="none"))
    torch.testing.assert_close(lf.afcl(x, y, gamma=1.0, eta=2.0, backend="torch", reduction="none"),
                               lf.afcl(flat, y.repeat(3), gamma=1.0, eta=2.0, backend="torch", reduction="none"))


def test_reductions_consistent():
    x, y, _, _ = _data(8, 2, 5, 3)
    for fn in (lambda r: lf.supcon(x, y, reduction=r, backend="torch"),
               lambda r: lf.afcl(x, y, gamma=1.0, eta=1.0, reduction=r, backend="torch")):
        per = fn("none")
        assert per.shape == (16,)
        torch.testing.assert_close(fn("sum"), per.sum())
        torch.testing.assert_close(fn("mean"), per.mean())


def test_loss_dtype_is_accumulation_dtype():
    x, y, _, _ = _data(8, 0, 5, 3)
    assert lf.supcon(x.float(), y, backend="torch").dtype == torch.float32
    assert lf.supcon(x.bfloat16(), y, backend="torch").dtype == torch.float32
    assert lf.supcon(x, y, backend="torch").dtype == torch.float64


def test_all_combinations_of_engine_flags_finite_on_extremes():
    # small temperature: large logits must not overflow (online LSE) nor produce NaN in any statistic
    x, y, _, _ = _data(20, 2, 8, 3)
    for gamma, eta in itertools.product((0.0, 0.5, 3.0), (0.0, 10.0)):
        xl = x.clone().requires_grad_(True)
        v = lf.afcl(xl, y, gamma=gamma, eta=eta, temperature=0.02, backend="torch")
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(xl.grad).all(), (gamma, eta)


@pytest.mark.parametrize("dtype,gap", [(torch.float32, g) for g in (3.0, 10.0, 25.0, 60.0, 110.0, 200.0, 1000.0)]
                         + [(torch.float64, g) for g in (60.0, 200.0, 700.0, 800.0, 1e4)], ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_dominant_negative_is_exact(dtype, gap, gamma):
    """One negative leads every other column by ``gap`` nats: p rounds to 1 in fp32 past ~17 nats and the
    linear rest Σ exp(x − m) underflows past ~104 (fp32) / ~745 (fp64) nats, yet T⁻ = −log(1 − p) ≈ gap and
    its gradient stay finite and match the fp64 reference (the contract carries lrest as the other columns' LSE)."""
    D = 4
    x = torch.zeros(4, D, dtype=torch.float64)
    x[0, 0] = 1.0                      # anchor, class 0
    x[1, 0] = 1.0                      # its dominant negative (class 1): s = 1/τ
    x[1, 1] = 0.0
    x[2, 1] = 1.0                      # a positive (class 0), s = 0
    x[3, 2] = 1.0                      # another negative, s = 0
    y = torch.tensor([0, 1, 0, 2])
    tau = 1.0 / gap                    # s(anchor, dominant) = gap, all other columns 0
    truth_x = x.clone().requires_grad_(True)
    truth = lf.afcl(truth_x, y, gamma=gamma, eta=5.0, temperature=tau, backend="reference", reduction="none")
    truth[0].backward()
    # hand-derived: the anchor's row has p = 1/Z, ε/Z, ε/Z (ε = e^−gap, Z = 1 + 2ε) over N = 4 columns
    eps = torch.tensor(-gap, dtype=torch.float64).exp()
    log_z = torch.log1p(2 * eps)
    t_pos = torch.exp(gamma * (torch.log1p(eps) - log_z)) * (gap + log_z)        # −(1 − p)^γ log p
    t_neg = (gap + log_z - math.log(2.0)) - torch.log1p(-eps / (1 + 2 * eps))  # −log(2ε/Z) − log(1 − ε/Z)
    torch.testing.assert_close(truth[0].detach(), (t_pos + 5.0 * t_neg) / 4, rtol=1e-12, atol=0)
    xd = x.to(dtype).requires_grad_(True)
    got = lf.afcl(xd, y, gamma=gamma, eta=5.0, temperature=tau, backend="torch", reduction="none")
    got[0].backward()
    assert torch.isfinite(got).all() and torch.isfinite(xd.grad).all()
    rtol = 1e-4 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), truth.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(xd.grad.double(), truth_x.grad, rtol=10 * rtol, atol=rtol * truth_x.grad.abs().max().item())
