"""Host code of the Triton kernels (``triton_kernels/ops.py``, ``ssl_ops.py``, ``topk_mining.py``), interpreted.

* every launch runs under the device guard of its inputs' device (Triton launches on the *current* device);
* empty problems (M = 0 or N = 0, an empty distributed ring block): exact zero gradients, never workspace
  garbage, and no launch over an empty grid;
* no host synchronisation: no tensor built from host data (``torch.tensor([...])``: a host-to-device copy that
  a CUDA graph cannot capture) and no device value read on the host, in any forward or backward;
* fp32 ``tl.dot`` precision follows ``torch.get_float32_matmul_precision()`` (the PREC constexpr of every
  launch), ``LTCL_TRITON_TF32`` overrides.

Launches are recorded by wrapping the interpreter's ``GridExecutor.__call__``; host reads and factory calls
by a ``TorchFunctionMode`` that is paused inside a launch (the interpreter itself copies tensors to numpy).
"""
import contextlib
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

from ltcl_fused.backends import get_engine  # noqa: E402
from ltcl_fused.engine.ssl_contract import SSLConfig  # noqa: E402

ENG = get_engine("triton")
if ENG.unavailable_reason(torch.device("cpu")) is not None:  # pragma: no cover
    pytest.skip(f"triton engine unavailable: {ENG.unavailable_reason(torch.device('cpu'))}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import GridExecutor  # noqa: E402

from ltcl_fused.triton_kernels import support, topk_mining  # noqa: E402
from ltcl_fused.triton_kernels.rowstats import _param  # noqa: E402
from ltcl_fused.triton_kernels.configs import BlockConfig, KernelConfig  # noqa: E402

#: float64 needs Triton >= 3.5 (fp64 tl.dot, the interpreter included): fp32 otherwise
DT = torch.float64 if ENG.dtype_reason("rowstats", torch.float64) is None else torch.float32
#: chunked-D kernels (D > BLOCK_D) with several tiles, and the single-chunk ones
CHUNKED = KernelConfig(BlockConfig(16, 32, 32, 1, 1), BlockConfig(32, 16, 32, 1, 1), (), 0)
SINGLE = KernelConfig(BlockConfig(16, 16, 64, 1, 1), BlockConfig(16, 32, 64, 1, 1), (), 64)


class _Launches:
    def __init__(self):
        self.calls = []      # (kernel name, devices of the tensor arguments, guard stack, constexpr kwargs)
        self.guards = []     # the device_guard stack
        self.in_launch = 0


@pytest.fixture
def launches(monkeypatch):
    rec = _Launches()
    orig = GridExecutor.__call__

    def call(self, *args, **kwargs):
        devs = {a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
        rec.calls.append((self.fn.__name__, devs, list(rec.guards), dict(kwargs)))
        rec.in_launch += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            rec.in_launch -= 1

    @contextlib.contextmanager
    def guard(device):
        rec.guards.append(torch.device(device))
        try:
            yield
        finally:
            rec.guards.pop()

    monkeypatch.setattr(GridExecutor, "__call__", call)
    monkeypatch.setattr(support, "device_guard", guard)
    return rec


def _rows(M, D, seed, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _rowstats(M, N, D, dtype=DT, focal=True, bias=True):
    """One forward and one backward of the row-statistics op (anchors = the first M columns when N >= M)."""
    C = _rows(N, D, 1, dtype)
    A = C[:M].clone() if M <= N else _rows(M, D, 2, dtype)
    al = torch.arange(M) % 3
    cl = torch.arange(N) % 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bs = torch.linspace(-1, 1, N, dtype=acc) if bias else None
    bo = torch.linspace(1, -1, N, dtype=acc) if bias else None
    so = 0 if M <= N else -1
    st = ENG.rowstats_forward(A, C, al, cl, so, 1 / 0.3, bs, bo, 0.5, focal)
    co = [torch.linspace(-1, 1, M, dtype=acc) + k for k in range(5)]
    grads = ENG.rowstats_backward(A, C, al, cl, so, 1 / 0.3, bs, bo, 0.5, focal, st[0], st[6], st[7], *co)
    return st, grads


SSL_CFGS = {"hcl": SSLConfig(scales=(0.5, 1.5)), "mttv": SSLConfig(filter="low", lower=0.1, exclude_partner=False),
            "bayes": SSLConfig(bayes=(0.5, 1.0, 0.1))}


def _ssl(M, N, D, cfg, dtype=DT):
    A, C = _rows(M, D, 3, dtype), _rows(N, D, 4, dtype)
    partner = (torch.arange(M) + 1) % max(N, 1)
    st = ENG.ssl_forward(A, C, partner, -1, 2.0, cfg)
    K = len(cfg.scales)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.ones(K, M, dtype=acc)
    return st, ENG.ssl_backward(A, C, partner, -1, 2.0, cfg, st.lse, coef, torch.ones(M, dtype=acc))


def _mine(M, Q, D, dtype=DT):
    A, K = _rows(M, D, 5, dtype), _rows(Q, D, 6, dtype)
    return topk_mining.topk_mining(A, torch.arange(M) % 2, K, torch.arange(Q) % 2, 2, 5)


def _rowstats_sym(N, D, dtype=DT):
    """The symmetric backward (C is A, the same labels, self_offset = 0): one dX kernel."""
    X = _rows(N, D, 3, dtype)
    lab = torch.arange(N) % 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    st = ENG.rowstats_forward(X, X, lab, lab, 0, 1 / 0.3, None, None, 0.5, True)
    co = [torch.linspace(-1, 1, N, dtype=acc) + k for k in range(5)]
    return ENG.rowstats_backward(X, X, lab, lab, 0, 1 / 0.3, None, None, 0.5, True, st[0], st[6], st[7], *co,
                                 symmetric=True)


def _every_op(dtype=DT):
    _rowstats(37, 45, 40, dtype)
    _rowstats(20, 33, 8, dtype, focal=False, bias=False)
    _rowstats_sym(29, 40, dtype)
    for cfg in SSL_CFGS.values():
        _ssl(21, 30, 12, cfg, dtype)
    _mine(9, 40, 6, dtype)


# ------------------------------------------------------------------------------------------------------------
# item: device guard
# ------------------------------------------------------------------------------------------------------------
def test_device_guard_is_the_tensors_cuda_device():
    g = support.device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert isinstance(support.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("cfg", ["chunked", "single"])
def test_every_launch_is_guarded(launches, force_config, cfg):
    force_config(CHUNKED if cfg == "chunked" else SINGLE)
    _every_op()
    names = {c[0] for c in launches.calls}
    assert {"rowstats_fwd_kernel", "rowstats_bwd_da_kernel", "rowstats_bwd_dc_kernel", "rowstats_bwd_sym_kernel",
            "ssl_fwd_kernel", "ssl_bayes_kernel", "ssl_bwd_da_kernel", "ssl_bwd_dc_kernel", "topk_mining_kernel"} <= names
    for name, devs, guards, _ in launches.calls:
        assert guards, f"{name} launched without a device guard"
        assert devs == {guards[-1]}, f"{name}: guard {guards[-1]} but tensors on {devs}"


# ------------------------------------------------------------------------------------------------------------
# item: empty problems
# ------------------------------------------------------------------------------------------------------------
class _PoisonEmpty(TorchFunctionMode):
    """torch.empty / empty_like / new_empty return NaN-filled (int: -7) memory, as a reused allocation may."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.empty, torch.empty_like, torch.Tensor.new_empty) and isinstance(out, torch.Tensor):
            out.fill_(float("nan") if out.is_floating_point() else -7)
        return out


@pytest.mark.parametrize("cfg", ["chunked", "single", "default"])
@pytest.mark.parametrize("MN", [(5, 0), (0, 7), (0, 0)], ids=lambda mn: f"M{mn[0]}N{mn[1]}")
def test_empty_problem_gives_exact_zero_gradients(launches, force_config, cfg, MN):
    if cfg != "default":
        force_config(CHUNKED if cfg == "chunked" else SINGLE)
    M, N = MN
    with _PoisonEmpty():
        (lse, *_rest, top, lrest), (dA, dC) = _rowstats(M, N, 40, focal=True)
        assert dA.shape == (M, 40) and dC.shape == (N, 40)
        assert torch.equal(dA, torch.zeros_like(dA)) and torch.equal(dC, torch.zeros_like(dC))
        assert torch.all(lse == float("-inf")) and torch.all(top == -1)  # rows without any column
        for cfg_ssl in SSL_CFGS.values():
            st, (dA, dC) = _ssl(M, N, 40, cfg_ssl)
            assert torch.equal(dA, torch.zeros_like(dA)) and torch.equal(dC, torch.zeros_like(dC))
            assert torch.all(st.lse == float("-inf"))
        pos, neg = _mine(M, N, 40)
        assert pos.shape == (M, 2) and torch.all(pos == -1) and torch.all(neg == -1)
    for name, _, _, _ in launches.calls:  # a launch over M = 0 rows would be a zero grid
        assert not (M == 0 and name in ("rowstats_fwd_kernel", "ssl_fwd_kernel", "rowstats_bwd_da_kernel")), name


# ------------------------------------------------------------------------------------------------------------
# item: no host synchronisation
# ------------------------------------------------------------------------------------------------------------
_HOST_DATA = (("torch", "tensor"), ("torch", "as_tensor"), ("Tensor", "new_tensor"))
_HOST_READS = (("Tensor", n) for n in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu",
                                       "numpy"))
_HOST_CALLS = tuple(_HOST_DATA) + tuple(_HOST_READS)


@pytest.fixture
def host_syncs(launches, monkeypatch):
    """Records, outside kernel launches, tensors made from host data and reads of device values on the host.

    Monkeypatched (not a TorchFunctionMode: a mode is switched off inside the custom ops' implementations)."""
    seen = []
    for owner_name, attr in _HOST_CALLS:
        owner = torch if owner_name == "torch" else torch.Tensor
        orig = getattr(owner, attr)

        def wrapper(*args, __orig=orig, __name=attr, **kwargs):
            if not launches.in_launch:
                seen.append(__name)
            return __orig(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)
    return seen


def test_recorder_sees_host_syncs(host_syncs):
    """The recorder itself: a host list turned into a tensor and a host read are both seen."""
    t = torch.tensor([1.0, 2.0])
    bool(t.sum() > 0)
    assert host_syncs == ["tensor", "__bool__"]


@pytest.mark.parametrize("dtype", sorted({DT, torch.float32, torch.bfloat16}, key=str), ids=str)
def test_no_host_sync_in_any_call(launches, host_syncs, force_config, dtype):
    force_config(CHUNKED)
    _every_op(dtype)
    assert launches.calls
    assert host_syncs == [], f"host syncs / host-data tensors in the Triton host code: {host_syncs}"


def test_fp64_parameters_are_exact():
    """fp64 kernels get their float parameters as XOR-ed IEEE bits (support.kernel_param): exact, one int64
    signature for every value (never i32, never the constant 1 that Triton would specialise)."""
    for x in (0.0, -0.0, 1.0, -1.0, 1 / 0.3, 1e-300, -5e-324, 3.3e38, math.inf, -math.inf, math.nan):
        e = support.kernel_param(x, torch.float64)
        assert isinstance(e, int) and not (-2 ** 31 <= e < 2 ** 31) and -2 ** 63 <= e < 2 ** 63, x
        back = torch.tensor([e ^ support.PARAM_XOR], dtype=torch.int64).view(torch.float64).item()
        assert (math.isnan(x) and math.isnan(back)) or (back == x and math.copysign(1, back) == math.copysign(1, x))


@triton.jit
def _decode64(OUT, p):
    tl.store(OUT, _param(p, tl.float64))


@triton.jit
def _decode32(OUT, p):
    tl.store(OUT, _param(p, tl.float32))


def test_kernel_decodes_parameters():
    """rowstats._param under the interpreter turns the encoding back into the same double, bit for bit (and
    takes fp32 kernels' Python floats as they are)."""
    for x in (1 / 0.3, -2.5e-7, 0.0, 123456.789):
        out = torch.empty(1, dtype=torch.float64)
        _decode64[(1,)](out, support.kernel_param(x, torch.float64))
        assert out.item() == x
    out = torch.empty(1, dtype=torch.float32)
    _decode32[(1,)](out, support.kernel_param(1 / 0.3, torch.float32))
    assert out.item() == torch.tensor(1 / 0.3, dtype=torch.float32).item()


# ------------------------------------------------------------------------------------------------------------
# item: fp32 precision follows torch.get_float32_matmul_precision()
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def matmul_precision(monkeypatch):
    old = torch.get_float32_matmul_precision()
    monkeypatch.delenv("LTCL_TRITON_TF32", raising=False)
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


def _precs(launches, dtype):
    launches.calls.clear()
    _rowstats(20, 30, 8, dtype)
    _rowstats_sym(20, 8, dtype)
    _ssl(20, 30, 8, SSL_CFGS["hcl"], dtype)
    _mine(9, 20, 6, dtype)
    out = {}
    for name, _, _, kw in launches.calls:
        if "PREC" in kw or "PRECISION" in kw:
            out.setdefault(kw.get("PREC", kw.get("PRECISION")), set()).add(name)
    return out


@pytest.mark.parametrize("torch_prec, want", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_fp32_precision_follows_torch(launches, matmul_precision, torch_prec, want):
    matmul_precision(torch_prec)
    got = _precs(launches, torch.float32)
    assert set(got) == {want}, got
    assert {"rowstats_fwd_kernel", "rowstats_bwd_da_kernel", "rowstats_bwd_sym_kernel", "ssl_fwd_kernel",
            "topk_mining_kernel"} <= got[want]
    assert set(_precs(launches, torch.bfloat16)) == {"ieee"}  # 16-bit inputs: tensor cores whatever the setting


@pytest.mark.parametrize("env, want", [("1", "tf32"), ("0", "ieee"), ("tf32x3", "tf32x3"), ("ieee", "ieee")])
def test_env_overrides_torch_precision(launches, matmul_precision, monkeypatch, env, want):
    matmul_precision("medium" if want == "ieee" else "highest")
    monkeypatch.setenv("LTCL_TRITON_TF32", env)
    assert set(_precs(launches, torch.float32)) == {want}


def test_default_is_ieee_and_bad_override_names_the_variable(matmul_precision, monkeypatch):
    assert support.fp32_precision() == "ieee"  # torch's default "highest": the fp32 reference tests keep ieee
    monkeypatch.setenv("LTCL_TRITON_TF32", "fast")
    with pytest.raises(ValueError, match="LTCL_TRITON_TF32"):
        support.fp32_precision()
