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

from _codegen import SCRIPT_HEAD, by_job, check_compiled, check_fake_trace, load_triton_kernels, run_compile_script
from test_triton_transcendentals import EXPECTED as TRANSCENDENTALS

load_triton_kernels()
from ltcl_fused.triton_kernels import ssl_codegen  # noqa: E402

JOBS = ssl_codegen.jobs(full=False)

_SCRIPT = SCRIPT_HEAD + r"""
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
    out = run_compile_script(_SCRIPT, fp_fusion=True)
    return by_job(out["results"]), out


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
    check_compiled(compiled[0], job, TRANSCENDENTALS)


def test_triton_ops_trace_under_fake_tensors(compiled):
    check_fake_trace(compiled[1]["fake_trace"])
