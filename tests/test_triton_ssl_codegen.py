"""Code generation of the SSL Triton kernels for real GPUs, without a GPU.

Every kernel of ``triton_kernels/ssl_rowstats.py`` is compiled by ``ltcl_fused.triton_kernels.ssl_codegen``
(``triton.compile(..., target=GPUTarget("cuda", 80 | 90, 32))``) with every shipped block configuration
and the dtypes it serves (bf16, fp16, fp32), in a subprocess without TRITON_INTERPRET. Checked: shared
memory within the device limit, no register spills (``cuobjdump -res-usage``: LOCAL and STACK are 0),
tensor cores in the 16-bit kernels (``mma.sync`` on sm_80, ``wgmma`` on sm_90), the transcendentals per tile
element (``tests/test_triton_transcendentals.py``). Also: the
``triton_ssl_fwd`` / ``triton_ssl_bwd`` triton_ops trace under fake tensors (unit and Bayesian weights).
"""
import pytest

from _triton_env import run_compile_script
from test_triton_transcendentals import EXPECTED as TRANSCENDENTALS

pytest.importorskip("triton")

from ltcl_fused.backends import get_engine  # noqa: E402

get_engine("triton").unavailable_reason("cpu")  # loads ltcl_fused.triton_kernels from a source checkout too
from ltcl_fused.triton_kernels import ssl_codegen  # noqa: E402

JOBS = ssl_codegen.jobs(full=False)

_SCRIPT = r"""
import json, torch
from ltcl_fused.backends.triton_engine import _load_kernels
ops = _load_kernels()
assert not ops.interpreted()
from ltcl_fused.triton_kernels import ssl_codegen, ssl_ops
out = {"results": ssl_codegen.run(n_jobs=2)}
from torch.fx.experimental.proxy_tensor import make_fx
A = torch.randn(6, 5); p = torch.tensor([3, 4, 5, 0, 1, 2])
def f(A, p, bayes, scales):
    st = torch.ops.ltcl_fused.triton_ssl_fwd(A, A, p, 0, 2.0, scales, True, False, 1, 0.1, 0.9, bayes, "ieee")
    return torch.ops.ltcl_fused.triton_ssl_bwd(A, A, p, 0, 2.0, scales, True, False, 1, 0.1, 0.9, bayes, "ieee",
                                               st[0], st[0], st[1])
try:
    codes = [make_fx(lambda A, p: f(A, p, [], [0.5, 1.5]), tracing_mode="fake")(A, p).code,
             make_fx(lambda A, p: f(A, p, [0.6, 0.8, 0.1], [1.0]), tracing_mode="fake")(A, p).code]
    out["fake_trace"] = all("triton_ssl_bwd" in c for c in codes)
except RuntimeError as e:  # Triton 3.3: torch's wrap_triton tracing asks for an active GPU driver
    out["fake_trace"] = str(e).strip().splitlines()[-1]
print("@@JSON@@" + json.dumps(out))
"""


@pytest.fixture(scope="session")
def compiled():
    out = run_compile_script(_SCRIPT)
    return {(r["kernel"], r["config"], r["dtype"], r["cc"], r["variant"]): r for r in out["results"]}, out


def test_every_shipped_config_is_covered():
    from ltcl_fused.triton_kernels.configs import SHIPPED
    need = {(n, dt) for n, c in SHIPPED.items() for dt in c.dtypes if dt != "fp64"}
    have = {(j[1], j[2]) for j in JOBS if j[0] != "ssl_bayes_kernel"}
    assert need == have
    assert {j[0] for j in JOBS} == {"ssl_fwd_kernel", "ssl_bwd_da_kernel", "ssl_bwd_dc_kernel", "ssl_bwd_sym_kernel",
                                    "ssl_bayes_kernel"}
    assert not [j for j in JOBS if j[0] == "ssl_bwd_sym_kernel" and j[4][0] == "bayes"]  # unit weights only


@pytest.mark.parametrize("job", JOBS, ids=lambda j: f"{j[1]}-{j[2]}-sm{j[3]}-{j[0].replace('ssl_', '')}-{j[4][0]}")
def test_codegen(compiled, job):
    res, _ = compiled
    k, cfg, dt, cc, var = job
    r = res[(k, cfg, dt, cc, var[0])]
    assert "error" not in r, r.get("error")
    assert r["shared"] <= r["shared_limit"], f"shared memory {r['shared']} B > {r['shared_limit']} B"
    assert r["stack"] == 0 and r["local"] == 0, f"register spills: STACK={r['stack']} LOCAL={r['local']} REG={r['reg']}"
    if dt in ("bf16", "fp16"):
        assert r["mma_sync"] if cc == 80 else r["wgmma"], "no tensor-core instructions in the PTX"
    # transcendentals per tile element: the hand-written table of tests/test_triton_transcendentals.py
    assert r["tile_transcendental_ops"] == TRANSCENDENTALS[(k, var[0])]


def test_triton_ops_trace_under_fake_tensors(compiled):
    got = compiled[1]["fake_trace"]
    if isinstance(got, str) and "active drivers" in got:
        from ltcl_fused.triton_kernels import support
        if support.triton_version()[:2] < (3, 4):
            pytest.skip(f"Triton {support.triton_version()}: torch's wrap_triton tracing needs a GPU driver ({got})")
    assert got is True
