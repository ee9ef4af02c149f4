"""Issue 13 item 3: a model + loss training step compiles with ``torch.compile(fullgraph=True)`` for every loss
on every fused backend that runs here (torch, cpu, triton under the interpreter) and matches eager, values
and gradients, in fp64. Backend "aot_eager" for every pair (it runs the real autograd graphs without code
generation); inductor on a representative pair of each engine family (tens of seconds each on a loaded
2-core machine, so not for all). ``check_finite=True`` compiles too: its checks become
``torch._assert_async`` with the eager messages; ``check_finite=False`` turns a failed value check into NaN."""
import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from loss_cases import B, C, D, FUSED, LOSSES, cases, problem, require


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # one code object is compiled for many cases here: never hit the recompile limit
    yield
    torch._dynamo.reset()


def _step(call, model, backend, **kw):
    return lambda t: call(F.normalize(model(t), dim=-1), backend=backend, **kw)


def _compiled_vs_eager(loss, backend, compiler):
    x, extra = problem()
    call = cases(extra)[loss]
    model = torch.nn.Linear(D, D).double()
    step = _step(call, model, backend, check_finite=False)
    params = list(model.parameters())
    v = torch.compile(step, fullgraph=True, backend=compiler)(x)
    g = torch.autograd.grad(v, params)
    v_eager = step(x)
    g_eager = torch.autograd.grad(v_eager, params)
    torch.testing.assert_close(v, v_eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
def test_training_step_compiles_fullgraph_and_matches_eager(loss, backend):
    require(backend)
    _compiled_vs_eager(loss, backend, "aot_eager")


@pytest.mark.parametrize("loss, backend", [("afcl", "cpu"), ("dcl", "cpu")])
def test_training_step_compiles_with_inductor(loss, backend):
    require(backend)
    _compiled_vs_eager(loss, backend, "inductor")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_checks_compile_as_device_asserts_or_nan(backend):
    require(backend)
    x, extra = problem()
    P = extra["P"]
    checked = torch.compile(lambda f, y: lf.bcl(f, y, P, backend=backend), fullgraph=True, backend="aot_eager")
    y = extra["y"]
    torch.testing.assert_close(checked(x, y), lf.bcl(x, y, P, backend=backend), rtol=1e-12, atol=1e-12)
    bad_y = y.clone()
    bad_y[2] = C  # no prototype for this class
    with pytest.raises(RuntimeError, match=r"ltcl_fused.bcl: `labels` must lie in \[0, 3\)"):
        checked(x, bad_y)
    nan_x = x.clone()
    nan_x[1, 0, 3] = float("nan")
    with pytest.raises(RuntimeError, match="ltcl_fused.bcl: `features` contains NaN or Inf"):
        checked(nan_x, y)
    unchecked = torch.compile(lambda f, y: lf.bcl(f, y, P, backend=backend, check_finite=False), fullgraph=True,
                              backend="aot_eager")
    assert torch.isnan(unchecked(x, bad_y))
    assert B == x.shape[0]
