"""Issue 13 item 2: a fused backend never returns a wrong second derivative. Its backward is first-order only:
``create_graph=True`` still gives the right gradient, and differentiating that gradient again raises one
clear error naming the loss, the backend and the way out (backend="reference", which is differentiable twice:
its Hessian-vector products are checked here against finite differences of its own gradient)."""
import pytest
import torch

from loss_cases import FUSED, LOSSES, cases, problem, require


def _grad(call, x, **kw):
    f = x.clone().requires_grad_()
    g, = torch.autograd.grad(call(f, **kw), f)
    return g


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
def test_second_derivative_raises_one_clear_error(loss, backend):
    require(backend)
    x, extra = problem()
    call = cases(extra)[loss]
    for second in (lambda g, f: torch.autograd.grad(g.sum(), f), lambda g, f: (g * g).sum().backward()):
        f = x.clone().requires_grad_()
        g, = torch.autograd.grad(call(f, backend=backend), f, create_graph=True)
        # create_graph=True alone is fine: the first-order gradient is the reference's
        torch.testing.assert_close(g.detach(), _grad(call, x, backend="reference"), rtol=1e-9, atol=1e-11)
        with pytest.raises(RuntimeError) as ei:
            second(g, f)
        msg = str(ei.value)
        assert f"ltcl_fused.{loss}:" in msg and f"backend {backend!r}" in msg and "backend='reference'" in msg, msg


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_hessian_vector_product_matches_finite_differences(loss):
    x, extra = problem()
    call = cases(extra)[loss]
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    f = x.clone().requires_grad_()
    g, = torch.autograd.grad(call(f, backend="reference"), f, create_graph=True)
    hvp, = torch.autograd.grad((g * v).sum(), f)
    eps = 1e-5  # central differences: error O(eps²) ~ 1e-10 relative, rounding ~1e-16/eps ~ 1e-11
    fd = (_grad(call, x + eps * v, backend="reference") - _grad(call, x - eps * v, backend="reference")) / (2 * eps)
    torch.testing.assert_close(hvp, fd, rtol=1e-6, atol=1e-7 * float(fd.abs().max()))
    assert float(hvp.abs().max()) > 0


@pytest.mark.parametrize("op", ["rowstats", "ssl"])
def test_the_cpp_ops_own_autograd_is_first_order_too(op):
    require("cpu")
    import ltcl_fused.ext  # noqa: F401  (the ops exist once the extension is loaded)
    g = torch.Generator().manual_seed(2)
    A = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 1, 0, 1, 1])
    if op == "rowstats":
        out = torch.ops.ltcl_fused.rowstats_fwd(A, A, lab, lab, None, None, 0, 2.0, 0.0, False)
    else:
        out = torch.ops.ltcl_fused.ssl_fwd(A, A, torch.tensor([1, 0, 3, 2, -1]), 0, 2.0, [1.0], True, False, 0,
                                           0.0, 1.0, [])
    gA, = torch.autograd.grad(out[0].sum(), A, create_graph=True)
    with pytest.raises(RuntimeError, match=f"torch.ops.ltcl_fused.{op}_fwd: backend 'cpu' has first-order"):
        torch.autograd.grad(gA.sum(), A)
