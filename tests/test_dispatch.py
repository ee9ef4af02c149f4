"""Backend selection: explicit names are honoured or fail in one clear line; auto falls back."""
import warnings

import pytest
import torch

import ltcl_fused as lf
from ltcl_fused import backends
from ltcl_fused.backends.base import BackendUnavailable, Engine
from ltcl_fused.backends.torch_chunked import TorchChunkedEngine

from _truth import assert_within


class _Broken(TorchChunkedEngine):
    def __init__(self, name, reason=None, ops=frozenset({"rowstats"})):
        self.name, self._reason, self.ops = name, reason, ops
        self.calls = 0

    def unavailable_reason(self, device):
        return self._reason

    def rowstats_forward(self, *a):
        self.calls += 1
        return super().rowstats_forward(*a)


@pytest.fixture
def fake_engines(monkeypatch):
    cache = dict(backends._cache)
    monkeypatch.setattr(backends, "_cache", cache)
    monkeypatch.setattr(backends, "_warned", set())
    return cache


X = torch.randn(8, 4)
Y = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0])


def _matches_reference(v, what):
    """``v`` (supcon of X, Y on some backend) against the fp64 truth, bounded by the fp32 reference's error."""
    assert_within(v, lf.supcon(X, Y, backend="reference"), lf.supcon(X.double(), Y, backend="reference"),
                  what=what, floor=1.0)


def test_explicit_unavailable_backend_raises_one_line(fake_engines):
    fake_engines["cpu"] = _Broken("cpu", reason="no C++ compiler found (install g++)")
    with pytest.raises(BackendUnavailable) as ei:
        lf.supcon(X, Y, backend="cpu")
    msg = str(ei.value)
    assert "'cpu'" in msg and "no C++ compiler" in msg and "\n" not in msg


def test_auto_falls_back_with_a_warning(fake_engines):
    fake_engines["cpu"] = _Broken("cpu", reason="no C++ compiler found")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        v = lf.supcon(X, Y, backend="auto")
    _matches_reference(v, "auto after the fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason only
        lf.supcon(X, Y, backend="auto")


def test_auto_prefers_the_first_available(fake_engines):
    fake_engines["cpu"] = eng = _Broken("cpu")
    lf.afcl(X, Y, backend="auto")
    assert eng.calls == 1


def test_not_implemented_op_is_never_a_silent_fallback(fake_engines):
    fake_engines["cpu"] = _Broken("cpu", ops=frozenset())
    fake_engines["cpu"].planned = "issue #4"
    with pytest.raises(NotImplementedError, match="issue #4"):
        lf.supcon(X, Y, backend="cpu")
    # auto skips it quietly and uses the next backend
    _matches_reference(lf.supcon(X, Y, backend="auto"), "auto")


def test_auto_order():
    assert backends.auto_order(torch.device("cpu")) == ("cpu", "torch")
    assert backends.auto_order(torch.device("cuda", 0)) == ("triton", "cuda", "torch")


def test_every_backend_name_resolves_or_explains():
    for name in ("triton", "cuda", "cpu", "torch"):
        eng = backends.get_engine(name)
        assert isinstance(eng, Engine) and eng.name == name
        reason = eng.unavailable_reason(torch.device("cpu"))
        assert reason is None or (isinstance(reason, str) and "\n" not in reason and reason)
    # CUDA tensors cannot exist here, but the cuda backend must explain itself for CPU tensors
    r = backends.get_engine("cuda").unavailable_reason(torch.device("cpu"))
    assert r is not None and "cuda" in r.lower() and "\n" not in r
    assert backends.get_engine("torch").unavailable_reason(torch.device("cpu")) is None


def test_backend_choice_is_a_constant_under_torch_compile():
    """The dispatcher runs eagerly inside torch.compile (no graph break), and the compiled step matches eager."""
    x = torch.randn(12, 2, 6, requires_grad=True)
    y = torch.randint(0, 3, (12,))

    def step(f):
        return lf.afcl(f, y, gamma=1.0, eta=2.0, temperature=0.5, backend="torch", check_finite=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    v = compiled(x)
    v.backward()
    g = x.grad.clone()
    x.grad = None
    step(x).backward()
    # compiled and eager fp32 steps, each against the fp64 truth of the same step (tests/_truth.py)
    truth = {}
    for dt in (torch.float32, torch.float64):
        xd = x.detach().to(dt).requires_grad_(True)
        val = lf.afcl(xd, y, gamma=1.0, eta=2.0, temperature=0.5, backend="reference")
        truth[dt] = (val.detach(), torch.autograd.grad(val, xd)[0])
    (rv, rg), (tv, tg) = truth[torch.float32], truth[torch.float64]
    for what, val, grad in (("compiled", v, g), ("eager", step(x), x.grad)):
        assert_within(val.detach(), rv, tv, what=f"{what} loss", floor=1.0)
        assert_within(grad, rg, tg, what=f"{what} gradient")


def test_import_does_not_pull_in_dynamo():
    import subprocess
    import sys
    code = "import sys, ltcl_fused; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_auto_on_cuda_tensors_routes_every_ssl_loss_to_the_cuda_kernels(fake_engines, monkeypatch):
    """No CUDA device here, so the availability is faked: auto on a CUDA device takes triton for "ssl" when it
    can run, else the cuda engine (which now has the Bayesian ranks); the ring's column blocks ("ssl_ranked")
    skip triton (it has none) and use cuda."""
    class _FakeCUDA(TorchChunkedEngine):
        name = "cuda"
        ops = backends.get_engine("cuda").ops

        def unavailable_reason(self, device):
            return None

    fake_engines["cuda"] = _FakeCUDA()
    dev = torch.device("cuda", 0)
    assert {"ssl", "ssl_ranked"} <= fake_engines["cuda"].ops
    fake_engines["triton"] = _Broken("triton", reason="no Triton here", ops=frozenset({"rowstats", "ssl"}))
    with pytest.warns(RuntimeWarning, match="no Triton here"):
        assert backends.resolve("auto", dev, "ssl", "t").name == "cuda"
    assert backends.resolve("auto", dev, "ssl_ranked", "t").name == "cuda"
    fake_engines["triton"] = _Broken("triton", ops=frozenset({"rowstats", "ssl"}))
    assert backends.resolve("auto", dev, "ssl", "t").name == "triton"
    assert backends.resolve("auto", dev, "ssl_ranked", "t").name == "cuda"


def test_bayesian_cl_runs_on_the_engine_auto_resolves_even_when_it_is_cuda(monkeypatch):
    """bayesian_cl no longer reroutes the cuda engine to torch: whatever auto resolves computes it."""
    class _Spy(TorchChunkedEngine):
        name = "cuda"
        ops = frozenset({"ssl", "ssl_ranked"})
        calls = 0

        def ssl_forward(self, *a, **k):
            type(self).calls += 1
            return super().ssl_forward(*a, **k)

    spy = _Spy()
    monkeypatch.setattr(backends, "resolve", lambda backend, device, op, fn, **kw: spy)
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    v = lf.bayesian_cl(z1, z2, alpha=0.7, beta=0.6)
    assert _Spy.calls == 1
    torch.testing.assert_close(v, lf.reference.bayesian_cl(z1, z2, alpha=0.7, beta=0.6), rtol=1e-10, atol=1e-12)
