"""The symmetric SSL backward of the Triton engine: when the anchors are the columns (C is A, self_offset = 0,
no Bayesian weights), ``ssl_backward(..., symmetric=True)`` returns (dA + dC, None) from one row-parallel kernel,
``ssl_bwd_sym_kernel``: dX_i = inv_tau Σ_j (G_ij + G_ji) X_j (2 GEMM-equivalents instead of 4).

Checked under the interpreter against the dense contract (``ssl_contract.dense_backward``, dA + dC) in fp64
(1e-10 relative) and fp32 (the fp64 truth, tests/_truth.py), for DCL / HCL (two scales) / MTTV-like
configurations (filters "both" and "low", the self column kept, the partner kept) and three scales (two
launches): sizes that are not multiples of the blocks with several row and column tiles of different sizes,
chunked and single-chunk D, N = 1 and 2, rows without a partner, zero coefficients, rows with lse = −inf (empty
sets, and forced), NaN-poisoned rows; the symmetric result against the general kernels' dA + dC; the engine's
argument checks and ``torch.library.opcheck`` of the op. Then (a subprocess without TRITON_INTERPRET) the
kernel's sm_80 / sm_90 code for the loss variants the default sweep of tests/test_triton_ssl_codegen.py leaves
out, and the op under fake tensors.
fp64 needs Triton >= 3.5: on an older Triton the fp64 tests skip (conftest) and the fp32 ones run.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
# numpy warns about exp overflow / log(0) inside masked-out lanes of the interpreter's tiles
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

from ltcl_fused.engine.ssl_contract import SSLConfig, dense_backward, dense_forward  # noqa: E402

from _codegen import SCRIPT_HEAD, by_job, check_compiled, check_fake_trace, run_compile_script  # noqa: E402
from _triton_env import engine_and_device  # noqa: E402
from test_triton_ssl import CONFIGS as SSL_CONFIGS  # noqa: E402
from _truth import check  # noqa: E402

ENG, DEVICE = engine_and_device()

from ltcl_fused.triton_kernels.configs import BlockConfig, KernelConfig  # noqa: E402

F64, F32 = torch.float64, torch.float32
# chunked D (D > 16) with row blocks of 16 and column tiles of 32 (the two halves' blocks differ); single chunk
# with row blocks of 32 and column tiles of 16
SMALL = KernelConfig(BlockConfig(16, 16, 16, 1, 1), BlockConfig(16, 16, 16, 1, 1), (), 0, BlockConfig(16, 32, 16, 1, 1))
SINGLE = KernelConfig(BlockConfig(16, 16, 64, 1, 1), BlockConfig(16, 32, 64, 1, 1), (), 64,
                      BlockConfig(32, 16, 64, 1, 1))

#: every unit-weight configuration of tests/test_triton_ssl.py (DCL, HCL with β = 0 and β > 0, three scales, the
#: partner kept, the four MTTV variants, two scales with a filter)
CONFIGS = {k: v for k, v in SSL_CONFIGS.items() if v.bayes is None}


def _problem(N, D, seed, pairs=False):
    """Unit rows X [N, D] (the filter acts on cosines), a partner per row (-1 on every fifth row; ``pairs``: the
    two-view layout i <-> i ± N/2 of DCL/HCL, else random columns, the row itself included)."""
    g = torch.Generator().manual_seed(seed)
    X = F.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    if pairs and N % 2 == 0:
        partner = (torch.arange(N) + N // 2) % N
    else:
        partner = torch.randint(0, N, (N,), generator=g)
    partner[::5] = -1
    return X, partner


def _coefs(K, N, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    coef = torch.randn(K, N, generator=g, dtype=F64)
    coef[:, ::3] = 0.0
    cpos = torch.randn(N, generator=g, dtype=F64)
    cpos[1::4] = 0.0
    return coef, cpos


def _to(x):
    return x.to(DEVICE)


def _sym(X, partner, inv_tau, cfg, lse, coef, cpos):
    out = ENG.ssl_backward(_to(X), _to(X), _to(partner), 0, inv_tau, cfg, _to(lse), _to(coef), _to(cpos),
                           symmetric=True)
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
    assert out[0].dtype == X.dtype and out[0].shape == X.shape
    return out[0].cpu()


def _dense_sum(X, partner, inv_tau, cfg, lse, coef, cpos):
    dA, dC = dense_backward(X, X, partner, 0, inv_tau, cfg, lse, coef, cpos)
    return dA + dC


def _inputs(X, partner, inv_tau, cfg, seed, dead_rows=()):
    """lse from the dense forward on X (fp64), random coefficients; ``dead_rows``: lse forced to −inf there."""
    lse = dense_forward(X.double(), X.double(), partner, 0, inv_tau, cfg).lse
    lse[:, list(dead_rows)] = -math.inf
    coef, cpos = _coefs(lse.shape[0], X.shape[0], seed)
    return lse, coef, cpos


def _check(N, D, cfg, dtype, inv_tau=2.0, seed=0, pairs=False, dead_rows=()):
    X, partner = _problem(N, D, seed, pairs)
    X = X.to(dtype)
    lse, coef, cpos = _inputs(X, partner, inv_tau, cfg, seed, dead_rows)
    if dtype == F64:
        got = _sym(X, partner, inv_tau, cfg, lse, coef, cpos)
        truth = _dense_sum(X, partner, inv_tau, cfg, lse, coef, cpos)
        assert torch.isfinite(got).all()
        err = (got - truth).abs().max() / truth.abs().max().clamp(min=1e-30)
        assert err <= 1e-10, f"relative max error {err:.2e} > 1e-10"
        return got, truth
    # fp32: the backward inputs in the accumulation dtype (as the autograd wrapper passes them); truth in fp64
    args = (partner, inv_tau, cfg)
    (got,), _ = check(lambda X, *bw: _sym(X, *args, *bw), lambda X, *bw: _dense_sum(X, *args, *bw),
                      [X, lse.to(dtype), coef.to(dtype), cpos.to(dtype)], grad=False, names=("dX",), value_floor=0)
    assert torch.isfinite(got).all()
    return got, None


# ----------------------------------------------------------------------------------------------
# against the dense contract
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(37, 19), (45, 33)], ids=["N37D19", "N45D33"])
def test_fp64_vs_contract(force_config, name, shape):
    force_config(SMALL)
    _check(*shape, CONFIGS[name], F64, seed=shape[0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_vs_truth(force_config, name):
    force_config(SMALL)
    _check(37, 20, CONFIGS[name], F32, seed=4)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("name", ["dcl", "hcl", "mttv_both_self"])
def test_single_chunk_and_default_config(force_config, dtype, name):
    """One D chunk in registers (forced small tiles), and the interpreter's default configuration."""
    force_config(SINGLE)
    _check(50, 24, CONFIGS[name], dtype, seed=2, pairs=True)
    force_config(None)
    _check(50, 24, CONFIGS[name], dtype, seed=3, pairs=True)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("name", ["dcl", "hcl", "keep_partner", "mttv_low_self"])
@pytest.mark.parametrize("N", [1, 2])
def test_tiny(force_config, N, name, dtype):
    """N = 1 (the only column is the row itself: an empty set unless the self column is kept) and N = 2 (with
    the partner excluded, a one-column or empty set)."""
    force_config(SMALL)
    X, partner = _problem(N, 5, seed=N)
    partner = (torch.arange(N) + 1) % N if N == 2 else torch.full((1,), -1)
    X = X.to(dtype)
    cfg = CONFIGS[name]
    lse, coef, cpos = _inputs(X, partner, 2.0, cfg, seed=N)
    coef[:] = 1.0 + torch.arange(coef.numel(), dtype=F64).reshape(coef.shape)
    cpos[:] = 0.5
    if N == 1 and not cfg.include_self:
        assert torch.isneginf(lse).all()
    if dtype == F64:
        torch.testing.assert_close(_sym(X, partner, 2.0, cfg, lse, coef, cpos),
                                   _dense_sum(X, partner, 2.0, cfg, lse, coef, cpos), rtol=1e-12, atol=1e-12)
    else:
        check(lambda X, *bw: _sym(X, partner, 2.0, cfg, *bw), lambda X, *bw: _dense_sum(X, partner, 2.0, cfg, *bw),
              [X, lse.to(dtype), coef.to(dtype), cpos.to(dtype)], grad=False, value_floor=0)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("name", ["dcl", "hcl", "mttv_low"])
def test_dead_rows_and_zero_coefficients(force_config, dtype, name):
    """Rows whose lse is −inf (forced, with nonzero coefficients) contribute exactly 0 from both halves, next to
    rows without a partner and zero coefficients (``_problem``, ``_coefs``)."""
    force_config(SMALL)
    got, _ = _check(41, 18, CONFIGS[name], dtype, seed=7, dead_rows=(0, 5, 16, 17, 40))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_empty_sets_from_the_filter(force_config, dtype):
    """A narrow "both" band: many rows keep no column (lse = −inf from the forward), the others a few."""
    force_config(SMALL)
    cfg = SSLConfig(exclude_partner=False, filter="both", lower=0.45, upper=0.5)
    X, partner = _problem(39, 6, seed=9)
    lse = dense_forward(X, X, partner, 0, 2.0, cfg).lse
    n_empty = int(torch.isneginf(lse).sum())
    assert 0 < n_empty < lse.numel()
    _check(39, 6, cfg, dtype, seed=9)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_all_coefficients_zero_gives_exact_zero(force_config, dtype):
    force_config(SMALL)
    X, partner = _problem(33, 20, seed=1)
    X = X.to(dtype)
    cfg = CONFIGS["hcl"]
    lse, coef, cpos = _inputs(X, partner, 2.0, cfg, seed=1)
    got = _sym(X, partner, 2.0, cfg, lse.to(dtype), torch.zeros_like(coef).to(dtype), torch.zeros_like(cpos).to(dtype))
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("name", ["dcl", "mttv_both_self"])
def test_nan_poisoned_rows(force_config, dtype, name):
    """A NaN feature poisons every row (each meets it in a dot product: lse = NaN, SPEC). Wherever the dense
    contract's dA + dC is NaN, so is the symmetric result, and it equals the general kernels' dA + dC entry by
    entry, NaN included (the Triton kernels propagate a NaN lse into G; the dense oracle drops NaN-lse terms, so
    its entries off the NaN feature's column are finite: only the NaN positions are compared with it)."""
    force_config(SMALL)
    X, partner = _problem(37, 20, seed=5)
    X[11, 3] = math.nan
    X = X.to(dtype)
    cfg = CONFIGS[name]
    lse, coef, cpos = _inputs(X, partner, 2.0, cfg, seed=5)
    assert torch.isnan(lse).all()
    bw = [t.to(dtype) for t in (lse, coef, cpos)]
    got = _sym(X, partner, 2.0, cfg, *bw)
    dense = _dense_sum(X.double(), partner, 2.0, cfg, lse, coef, cpos)
    assert torch.isnan(dense).any()
    assert torch.isnan(got[torch.isnan(dense)]).all()
    gA, gC = ENG.ssl_backward(_to(X), _to(X), _to(partner), 0, 2.0, cfg, *[_to(t) for t in bw])
    torch.testing.assert_close(got, (gA + gC).cpu(), rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# against the general kernels, and the engine's contract
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("name", ["hcl", "three_scales", "mttv_low_self", "scaled_filter"])
def test_matches_the_general_kernels(force_config, dtype, name):
    """The symmetric kernel and dA + dC of the general pair agree (fp64 to rounding; fp32 to a few ulps of the
    largest entry: the same terms summed in another order)."""
    force_config(SMALL)
    X, partner = _problem(45, 30, seed=6, pairs=True)
    X = X.to(dtype)
    cfg = CONFIGS[name]
    lse, coef, cpos = (t.to(dtype) for t in _inputs(X, partner, 1.5, cfg, seed=6))
    gA, gC = ENG.ssl_backward(_to(X), _to(X), _to(partner), 0, 1.5, cfg, _to(lse), _to(coef), _to(cpos))
    ref = (gA + gC).cpu()
    got = _sym(X, partner, 1.5, cfg, lse, coef, cpos)
    tol = 1e-12 if dtype == F64 else 2e-6
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_engine_declares_the_symmetric_ssl_backward():
    assert "ssl" in ENG.symmetric_ops and "rowstats" in ENG.symmetric_ops


@pytest.mark.parametrize("what", ["self_offset", "rectangular", "bayes"])
def test_rejects_what_is_not_symmetric(what):
    X, partner = _problem(8, 4, seed=0)
    X = X.float()
    cfg = SSLConfig(bayes=(0.5, 1.0, 0.1)) if what == "bayes" else SSLConfig()
    lse, coef, cpos = (t.float() for t in _inputs(X, partner, 2.0, SSLConfig(), seed=0))
    A, C, so = X, X, 0
    if what == "self_offset":
        so = -1
    elif what == "rectangular":
        C = X[:6]
    with pytest.raises(ValueError, match="symmetric SSL backward"):
        ENG.ssl_backward(_to(A), _to(C), _to(partner), so, 2.0, cfg, _to(lse), _to(coef), _to(cpos), symmetric=True)


def test_forward_accepts_and_ignores_symmetric():
    X, partner = _problem(21, 8, seed=8)
    X = X.float()
    cfg = CONFIGS["hcl"]
    a = ENG.ssl_forward(_to(X), _to(X), _to(partner), 0, 2.0, cfg, symmetric=True)
    b = ENG.ssl_forward(_to(X), _to(X), _to(partner), 0, 2.0, cfg)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_opcheck():
    """The op's schema, fake kernel and dispatch (``torch.library.opcheck``; an opaque custom op here)."""
    X, partner = _problem(7, 5, seed=3)
    X = X.float()
    lse, coef, cpos = (t.float() for t in _inputs(X, partner, 2.0, CONFIGS["hcl"], seed=3))
    torch.library.opcheck(torch.ops.ltcl_fused.triton_ssl_bwd_sym.default,
                          (_to(X), _to(partner), 2.0, [0.5, 1.5], True, False, 1, 0.1, 0.9, "ieee", _to(lse),
                           _to(coef), _to(cpos)))


# ----------------------------------------------------------------------------------------------
# code generation for real GPUs (no GPU needed), with the Triton of this interpreter
# ----------------------------------------------------------------------------------------------
#: the loss variants of ``ssl_codegen.LOSS_VARIANTS`` (the default sweep compiles k2_both and mttv_low_self) on a
#: chunked-D 16-bit configuration and the single-chunk fp32 one
CODEGEN_CASES = (("h_d128", "bf16"), ("f_d32", "fp32"))

_SCRIPT = SCRIPT_HEAD + r"""
import sys
from ltcl_fused.triton_kernels import codegen, ssl_codegen, ssl_ops, support  # ssl_ops registers the ops
cases = [tuple(c) for c in json.loads(sys.argv[1])]
js = [j for j in ssl_codegen.jobs(full=True) if j[0] == "ssl_bwd_sym_kernel" and j[1:3] in cases
      and j[4][0] in dict(ssl_codegen.LOSS_VARIANTS)]
out = {"results": codegen.run(2, True, lambda full: js, ssl_codegen.compile_one),
       "triton": list(support.triton_version())}
from torch.fx.experimental.proxy_tensor import make_fx
X = torch.randn(6, 5); p = torch.tensor([3, 4, 5, 0, 1, 2])
def f(X, p):
    lse = torch.zeros(2, 6); coef = torch.ones(2, 6); cpos = torch.ones(6)
    return torch.ops.ltcl_fused.triton_ssl_bwd_sym(X, p, 2.0, [0.5, 1.5], True, False, 1, 0.1, 0.9, "ieee",
                                                   lse, coef, cpos)
try:
    out["fake_trace"] = "triton_ssl_bwd_sym" in make_fx(f, tracing_mode="fake")(X, p).code
except RuntimeError as e:  # Triton 3.3: torch's wrap_triton tracing asks for an active GPU driver
    out["fake_trace"] = str(e).strip().splitlines()[-1]
print("@@JSON@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return run_compile_script(_SCRIPT, json.dumps(CODEGEN_CASES), fp_fusion=True)


def test_codegen_sym_loss_variants(compiled):
    from test_triton_transcendentals import EXPECTED
    res = compiled["results"]
    assert len(res) == len(CODEGEN_CASES) * 2 * 5  # two targets, five loss variants
    keyed = by_job(res)
    for r in res:
        check_compiled(keyed, (r["kernel"], r["config"], r["dtype"], r["cc"], (r["variant"],)), EXPECTED)


def test_codegen_op_traces_under_fake_tensors(compiled):
    check_fake_trace(compiled["fake_trace"])
