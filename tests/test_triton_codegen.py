"""Code generation of the Triton kernels for real GPUs, without a GPU.

Every shipped block configuration (``ltcl_fused.triton_kernels.configs.SHIPPED``) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` for the dtypes it serves
(bf16, fp16, fp32), in a subprocess without TRITON_INTERPRET (two compile workers; Triton's on-disk
cache makes re-runs fast). Checked per kernel: shared memory within the device limit, no register
spills (``cuobjdump -res-usage``: LOCAL and STACK are 0), tensor-core instructions in the PTX of the
16-bit kernels (``mma.sync`` on sm_80, ``wgmma`` on sm_90), the transcendentals per tile element
(``tests/test_triton_transcendentals.py``). Variants compiled: the heaviest one of
each kernel (bias + focal pass + γ ≠ 0) and the γ = 0 forward;
``python -m ltcl_fused.triton_kernels.codegen --full`` adds the others, fp64 and TF32.
"""
import pytest

from _triton_env import run_compile_script
from test_triton_transcendentals import EXPECTED as TRANSCENDENTALS

pytest.importorskip("triton")

from ltcl_fused.backends import get_engine  # noqa: E402

get_engine("triton").unavailable_reason("cpu")  # loads ltcl_fused.triton_kernels from a source checkout too
from ltcl_fused.triton_kernels import codegen  # noqa: E402

JOBS = codegen.jobs(full=False)

_SCRIPT = r"""
import json, sys, torch
from ltcl_fused.backends.triton_engine import _load_kernels
ops = _load_kernels()
assert not ops.interpreted()
from ltcl_fused.triton_kernels import codegen
out = {"results": codegen.run(n_jobs=2)}
# the triton_ops trace under fake tensors (what torch.compile does first) with real JITFunctions
from torch.fx.experimental.proxy_tensor import make_fx
A = torch.randn(6, 5); C = torch.cat([A, torch.randn(3, 5)])
al = torch.tensor([0, 1, 0, 1, 2, 2]); cl = torch.cat([al, torch.tensor([0, 1, 2])])
def f(A, C, al, cl):
    st = torch.ops.ltcl_fused.triton_rowstats_fwd(A, C, al, cl, None, None, 2.0, 0.5, 0, True, "ieee")
    return torch.ops.ltcl_fused.triton_rowstats_bwd(A, C, al, cl, None, None, st[0], st[6], st[7], st[1], st[2],
                                                    st[3], st[4], st[5], 2.0, 0.5, 0, True, "ieee")
try:
    out["fake_trace"] = "triton_rowstats_bwd" in make_fx(f, tracing_mode="fake")(A, C, al, cl).code
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
    have = {(j[1], j[2]) for j in JOBS if j[1] != "merge"}
    assert need == have
    assert {"bf16", "fp16", "fp32"} <= {dt for _, dt in have}


def test_sm90_forward_blocks():
    """The sm_90 forward blocks (KernelConfig.fwd90) replace fwd on compute capability 9.x only, keep its D class
    (BLOCK_D) and are what the sweep compiles for sm_90; CPU tensors / the interpreter report capability 0."""
    import torch
    from ltcl_fused.triton_kernels import ops
    from ltcl_fused.triton_kernels.configs import SHIPPED
    with90 = [c for c in SHIPPED.values() if c.fwd90 is not None]
    assert with90
    for c in SHIPPED.values():
        assert c.fwd_config(0) is c.fwd and c.fwd_config(80) is c.fwd and c.fwd_config(100) is c.fwd
        assert c.fwd_config(90) is (c.fwd90 or c.fwd) and c.fwd_config(90).BLOCK_D == c.fwd.BLOCK_D
    assert ops._capability(torch.device("cpu")) == 0


@pytest.mark.parametrize("job", JOBS,
                         ids=lambda j: f"{j[1]}-{j[2]}-sm{j[3]}-{j[0].replace('rowstats_', '')}-{j[4][0]}")
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
