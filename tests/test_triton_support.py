"""Which Triton/torch the Triton backend runs on, and what it does elsewhere (``triton_kernels/support.py``).

* Triton < 3.3 or torch < 2.6: backend "triton" is unavailable with one line, ``auto`` falls back;
* features gated on a newer Triton (float64 tl.dot >= 3.5, the mining kernel's native sort >= 3.4) raise one line
  naming the version, and the dispatcher (``Engine.dtype_reason``) lets ``auto`` fall back;
* the interpreter of Triton < 3.7 with numpy >= 2.4 is reported, not crashed into;
* setup.py's extras ask for the supported Triton.
"""
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import ltcl_fused as lf  # noqa: E402
from ltcl_fused import backends  # noqa: E402
from ltcl_fused.backends.base import BackendUnavailable  # noqa: E402
from ltcl_fused.backends.torch_chunked import TorchChunkedEngine  # noqa: E402
from ltcl_fused.backends.triton_engine import TritonEngine, _load_kernels  # noqa: E402

support = _load_kernels("support")
ROOT = Path(__file__).resolve().parents[1]


def test_version_lines():
    assert support.version_reason((3, 1, 0), (2, 13, 0)) == \
        "Triton 3.1.0 found; ltcl_fused's Triton kernels need ≥ 3.3"
    assert support.version_reason((3, 2, 0), (2, 6, 0)).startswith("Triton 3.2.0 found")
    assert support.version_reason((3, 3, 1), (2, 5, 1)) == \
        "torch 2.5.1 found; ltcl_fused's Triton kernels need torch ≥ 2.6"
    for ok in (((3, 3, 0), (2, 6, 0)), ((3, 6, 0), (2, 11, 0)), ((3, 9, 0), (2, 14, 1))):
        assert support.version_reason(*ok) is None
    assert support.parse_version("3.4.0+git1a2b3c") == (3, 4, 0)
    assert support.parse_version("2.6.0a0+cu126") == (2, 6, 0)


def test_feature_lines():
    r = support.feature_reason("fp64", (3, 4, 1))
    assert r == "float64 (fp64 tl.dot) needs Triton ≥ 3.5; Triton 3.4.1 found"
    assert support.feature_reason("fp64", (3, 5, 0)) is None
    r = support.feature_reason("native_sort", (3, 3, 1))
    assert "needs Triton ≥ 3.4" in r and "3.3.1 found" in r and "\n" not in r
    assert support.feature_reason("native_sort", (3, 4, 0)) is None
    assert support.dtype_reason(torch.float32, (3, 3, 0)) is None
    assert support.dtype_reason(torch.bfloat16, (3, 3, 0)) is None
    assert "3.5" in support.dtype_reason(torch.float64, (3, 3, 0))


def test_interpreter_numpy_line():
    r = support.interpreter_reason((3, 6, 0), (2, 4, 6))
    assert r == "the interpreter of Triton 3.6.0 needs numpy < 2.4 (numpy 2.4.6 found)"
    assert support.interpreter_reason((3, 6, 0), (2, 3, 5)) is None
    assert support.interpreter_reason((3, 9, 0), (2, 4, 6)) is None


@pytest.mark.parametrize("triton_v, torch_v, want", [((3, 1, 0), None, "Triton 3.1.0 found"),
                                                     (None, (2, 5, 1), "torch 2.5.1 found")])
def test_old_triton_or_torch_makes_the_engine_unavailable(monkeypatch, triton_v, torch_v, want):
    if triton_v:
        monkeypatch.setattr(support, "triton_version", lambda: triton_v)
    if torch_v:
        monkeypatch.setattr(support, "torch_version", lambda: torch_v)
    eng = TritonEngine()
    for dev in ("cpu", "cuda"):
        r = eng.unavailable_reason(torch.device(dev))
        assert r is not None and want in r and "\n" not in r
    with pytest.raises(BackendUnavailable, match=want):
        eng.rowstats_forward(torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, dtype=torch.long),
                             torch.zeros(2, dtype=torch.long), 0, 1.0, None, None, 0.0, False)


class _Gated(TorchChunkedEngine):
    """A backend that runs everything but float64 (as Triton < 3.5 does)."""
    name = "cpu"

    def __init__(self):
        self.calls = 0

    def unavailable_reason(self, device):
        return None

    def dtype_reason(self, op, dtype):
        return support.dtype_reason(dtype, (3, 4, 0))

    def rowstats_forward(self, *a):
        self.calls += 1
        return super().rowstats_forward(*a)


@pytest.fixture
def gated(monkeypatch):
    cache = dict(backends._cache)
    cache["cpu"] = eng = _Gated()
    monkeypatch.setattr(backends, "_cache", cache)
    monkeypatch.setattr(backends, "_warned", set())
    return eng


def test_dispatcher_falls_back_on_a_dtype_gate(gated):
    x = torch.nn.functional.normalize(torch.randn(8, 4, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0])
    with pytest.warns(RuntimeWarning, match="float64 .*needs Triton ≥ 3.5"):
        v = lf.supcon(x, y, backend="auto")
    assert gated.calls == 0
    torch.testing.assert_close(v, lf.supcon(x, y, backend="reference"), rtol=1e-10, atol=1e-12)
    lf.afcl(x.float(), y, gamma=1.0, backend="auto")  # fp32 still runs on the gated backend
    assert gated.calls == 1
    with pytest.raises(BackendUnavailable) as ei:
        lf.afcl(x, y, backend="cpu")
    assert "needs Triton ≥ 3.5" in str(ei.value) and "\n" not in str(ei.value)


def test_triton_engine_gates_float64(monkeypatch):
    """With Triton < 3.5 the engine refuses float64 in one line (dtype_reason and a direct call alike)."""
    monkeypatch.setattr(support, "triton_version", lambda: (3, 4, 1))
    monkeypatch.setattr(support, "interpreter_reason", lambda: None)  # the installed numpy is not the point here
    eng = TritonEngine()
    assert eng.unavailable_reason(torch.device("cpu")) is None
    assert eng.dtype_reason("rowstats", torch.float32) is None
    r = eng.dtype_reason("ssl", torch.float64)
    assert r == "float64 (fp64 tl.dot) needs Triton ≥ 3.5; Triton 3.4.1 found"
    A = torch.ones(3, 4, dtype=torch.float64)
    lab = torch.zeros(3, dtype=torch.long)
    with pytest.raises(BackendUnavailable, match="needs Triton ≥ 3.5"):
        eng.rowstats_forward(A, A, lab, lab, 0, 1.0, None, None, 0.0, False)


def test_mining_gates(monkeypatch):
    """The mining kernel: float64 and (on a GPU, or when asked for) the native sort are gated in one line."""
    tm = _load_kernels("topk_mining")
    monkeypatch.setattr(support, "triton_version", lambda: (3, 3, 1))
    with pytest.raises(RuntimeError, match=r"needs Triton ≥ 3.4; Triton 3.3.1 found"):
        tm._native_sort(interp=False)  # a GPU launch
    assert tm._native_sort(interp=True) is False  # the interpreter's masked-sum network
    monkeypatch.setattr(tm, "NATIVE_SORT", True)
    with pytest.raises(RuntimeError, match="native sort"):
        tm._native_sort(interp=True)
    monkeypatch.setattr(support, "triton_version", lambda: (3, 4, 0))
    assert tm._native_sort(interp=False) is True
    x = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64 .*needs Triton ≥ 3.5"):
        tm.topk_mining(x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long), 1, 0)


def test_setup_extras_ask_for_the_supported_triton():
    text = (ROOT / "setup.py").read_text()
    extras = re.search(r"extras_require=\{(.*?)\n    \}", text, re.S).group(1)
    pins = re.findall(r'"triton([<>=~!][^";]*)', extras)
    assert pins and all(p == ">=3.3" for p in pins), pins
    assert re.search(r'"test": \[[^\]]*"triton>=3\.3', extras)
    assert re.search(r'"torch>=2\.6"', text)
