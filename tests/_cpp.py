"""Shared pieces of the C++ CPU engine tests (test_cpp_engine.py, test_symmetric_cpu*.py): the extension
fixture, the op namespace and the random problem parts both draw (same generator calls, same order)."""
import pytest
import torch

from ltcl_fused import ext


@pytest.fixture(scope="module", autouse=True)
def built():
    """Module-wide: fails (not skips) the module's tests when the C++ extension does not build here. A test
    module imports it by name (``from _cpp import built``) for pytest to find it."""
    reason = ext.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the C++ extension does not build here: {reason}")


def op():
    return torch.ops.ltcl_fused


def acc_dtype(dtype):
    """The accumulation dtype of the engine for input dtype ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_bias(g, N, dtype, bias):
    """(bias_same, bias_other) [N] in the accumulation dtype, drawn from ``g`` (None, None without bias)."""
    if not bias:
        return None, None
    acc = acc_dtype(dtype)
    bs = torch.randn(N, generator=g, dtype=torch.float64).to(acc)
    bo = torch.randn(N, generator=g, dtype=torch.float64).to(acc)
    return bs, bo


def coefs(M, acc, seed=1):
    """The five backward coefficients (cpos, cposf, cneg, r, rt) [M] in dtype ``acc``, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(M, generator=g, dtype=torch.float64).to(acc) for _ in range(5)]


def assert_cpu_matches_reference(fn, x0, y, what, rtol=1e-9, atol=1e-10):
    """fn(x, y, backend) on backend "cpu" and "reference" from x0 (fp64): the values and d(sum)/dx agree."""
    out = {}
    for b in ("cpu", "reference"):
        x = x0.clone().requires_grad_(True)
        loss = fn(x, y, b)
        (gx,) = torch.autograd.grad(loss.sum(), [x])
        out[b] = (loss.detach(), gx)
    for a, r in zip(out["cpu"], out["reference"]):
        assert torch.allclose(a, r.to(a.dtype), rtol=rtol, atol=atol, equal_nan=True), \
            (what, (a - r).abs().nan_to_num().max().item())


def training_problem(n):
    """A fresh dynamo and a small training step's inputs: x [n, 2, 16] (two views) and labels [n] in 4 classes
    from a fixed generator, and a Linear(16, 16) (torch's global generator)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 2, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y, torch.nn.Linear(16, 16)


def spy_symmetric(monkeypatch, engine_cls, op_name):
    """Records the calls of ``engine_cls.<op_name>_forward`` / ``_backward``: ("fwd", symmetric) and ("bwd",
    symmetric, whether the second gradient came back None, as the symmetric path returns it)."""
    calls = []
    orig_f, orig_b = getattr(engine_cls, op_name + "_forward"), getattr(engine_cls, op_name + "_backward")

    def fwd(self, *a, **k):
        calls.append(("fwd", k.get("symmetric", False)))
        return orig_f(self, *a, **k)

    def bwd(self, *a, **k):
        out = orig_b(self, *a, **k)
        calls.append(("bwd", k.get("symmetric", False), out[1] is None))
        return out

    monkeypatch.setattr(engine_cls, op_name + "_forward", fwd)
    monkeypatch.setattr(engine_cls, op_name + "_backward", bwd)
    return calls
