"""The GPU check kit (ltcl_fused.gpu_check): the dry run end to end, and the GPU-only pieces through fakes.

The dry run is the GPU code path on CPU tensors (Triton interpreter, tiny shapes); what differs on a GPU
(CUDA-event clock, sync counter, toolkit discovery, build environment) is tested here with stand-ins.
"""
import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch

from ltcl_fused.gpu_check import cases as C
from ltcl_fused.gpu_check import correctness as K
from ltcl_fused.gpu_check import device as DV
from ltcl_fused.gpu_check import machine, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- clock and timing loop -------------------------------------------------------------------------------------
class FakeTime:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def spend(self, ms):
        self.t += ms / 1e3


def _fake_event_factory(ft):
    class Event:
        def record(self):
            self.t = ft.t

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3
    return Event


def test_event_clock_times_forward_and_backward_apart():
    ft, syncs = FakeTime(), []
    clock = DV.EventClock(event_factory=_fake_event_factory(ft), synchronize=lambda: syncs.append(1))
    f, b = DV.time_once(clock, lambda: ft.spend(2.0) or "out", lambda out: ft.spend(3.0) if out == "out" else None)
    assert (round(f, 9), round(b, 9)) == (2.0, 3.0)
    assert syncs == [1]  # one device sync per timed run, after the last event


def test_measure_repeats_and_budget():
    ft = FakeTime()
    clock = DV.EventClock(event_factory=_fake_event_factory(ft), synchronize=lambda: None)
    calls = []

    def fwd():
        calls.append(1)
        ft.spend(1.0)

    m = DV.measure(clock, fwd, None, min_repeats=10, max_repeats=50, target_s=0.02, deadline=100.0, now=ft.now)
    assert m["repeats"] == 20 and not m["short"]          # target 20 ms of 1 ms runs
    assert len(calls) == 22                               # warm-up + sizing run + 20 timed
    assert abs(m["total_ms"] - 1.0) < 1e-9 and m["bwd_ms"] == 0.0
    m = DV.measure(clock, fwd, None, min_repeats=10, max_repeats=50, target_s=0.02, deadline=ft.now() + 0.0075,
                   now=ft.now)
    assert m["short"] and m["repeats"] == 5               # 7.5 ms left after warm-up and sizing: 5 runs
    m = DV.measure(clock, fwd, None, min_repeats=10, max_repeats=12, target_s=1.0, deadline=100.0, now=ft.now)
    assert m["repeats"] == 12                             # max_repeats caps the target


def test_count_syncs_counts_torch_sync_warnings_and_restores_mode():
    modes = []

    def fn():
        for _ in range(3):
            warnings.warn(DV.SYNC_WARNING, UserWarning)
        warnings.warn("something else", UserWarning)
        return "result"

    out, n = DV.count_syncs(fn, set_mode=modes.append, get_mode=lambda: 0)
    assert (out, n) == ("result", 3) and modes == ["warn", 0]

    def boom():
        raise RuntimeError("x")
    with pytest.raises(RuntimeError):
        DV.count_syncs(boom, set_mode=modes.append, get_mode=lambda: 2)
    assert modes[-1] == 2


def test_oom_classifier():
    assert DV.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert DV.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not DV.is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_cuda_runtime_uses_existing_torch_apis():
    """CudaRuntime cannot run here; at least every torch.cuda function it calls exists in this torch."""
    for name in ("Event", "Stream", "stream", "CUDAGraph", "graph", "synchronize", "current_stream", "_sleep",
                 "set_sync_debug_mode", "get_sync_debug_mode", "reset_peak_memory_stats", "max_memory_allocated",
                 "memory_allocated", "empty_cache", "get_device_properties", "current_device", "device_count"):
        assert hasattr(torch.cuda, name), name


# --- tolerance rules ---------------------------------------------------------------------------------------------
def test_rel_err_and_bounds():
    t = torch.tensor([1.0, -2.5, 0.5], dtype=torch.float64)
    assert K.rel_err(torch.tensor([1.0, -2.0, 0.5]), t) == pytest.approx(0.5 / 2.5)
    assert K.rel_err(torch.tensor([1.0, float("nan"), 0.5]), t) == float("inf")
    assert K.rel_err(torch.tensor([1.0, 2.0]), t) == float("inf")
    ti = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    assert K.rel_err(torch.tensor([float("inf"), 1.0]), ti) == 0.0
    assert K.rel_err(torch.tensor([float("-inf"), 1.0]), ti) == float("inf")
    assert K.bound(torch.float64, 0.3) == K.TIGHT
    eps = torch.finfo(torch.float32).eps
    assert K.bound(torch.float32, 1e-6) == pytest.approx(2e-6 + 8 * eps)
    assert K.bound(torch.bfloat16, float("nan")) == float("inf")


def test_compare_and_bitwise():
    f64 = dict(dtype=torch.float64)
    truth = K.Outcome(torch.tensor([1.0, 2.0], **f64), {"x": torch.tensor([0.5, -1.0], **f64)})
    ref = K.Outcome(torch.tensor([1.0, 2.0 + 1e-6]), {"x": torch.tensor([0.5, -1.0 + 1e-6])})
    good = K.Outcome(torch.tensor([1.0, 2.0 - 1e-6]), {"x": torch.tensor([0.5, -1.0])})
    bad = K.Outcome(torch.tensor([1.0, 2.002]), {"x": torch.tensor([0.5, -1.0])})
    assert K.compare(good, truth, torch.float32, ref)["ok"]
    r = K.compare(bad, truth, torch.float32, ref)
    assert not r["ok"] and "loss error" in r["why"]
    assert K.same_bits(good, K.Outcome(good.value.clone(), {"x": good.grads["x"].clone()}))
    z = K.Outcome(torch.tensor([0.0]), {})
    assert not K.same_bits(z, K.Outcome(torch.tensor([-0.0]), {}))  # bitwise, not ==
    n = K.Outcome(torch.tensor([float("nan")]), {})
    assert K.same_bits(n, K.Outcome(n.value.clone(), {}))


def test_sample_rows_cover_the_int32_boundary():
    rows = K.sample_rows(1_100_000, 2048, 64)
    b = 2 ** 31 // 2048
    assert {0, 1_099_999, b - 1, b, b + 1} <= set(rows) and len(rows) == 64 and rows == sorted(set(rows))


# --- machine: toolkit discovery and the build environment ---------------------------------------------------------
def _fake_toolkit(root, version):
    b = root / f"cuda-{version}" / "bin"
    b.mkdir(parents=True)
    nvcc = b / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(root / f"cuda-{version}")


def test_find_cuda_home_prefers_torch_major(tmp_path):
    a, b = _fake_toolkit(tmp_path, "12.4"), _fake_toolkit(tmp_path, "13.0")
    assert machine.find_cuda_home("13.0", [a, b])[:2] == (b, "13.0")
    home, ver, note = machine.find_cuda_home("11.8", [a, b])
    assert (home, ver) == (a, "12.4") and "does not match" in note
    assert machine.find_cuda_home("13.0", [str(tmp_path / "none")])[0] is None


def test_build_env_local_arch_only():
    env = machine.build_env("9.0", "/opt/cuda-13", 4, base={"PATH": "/usr/bin"})
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["MAX_JOBS"] == "4" and env["CUDA_HOME"] == "/opt/cuda-13"
    assert env["PATH"].split(os.pathsep)[:2] == [os.path.dirname(sys.executable), "/opt/cuda-13/bin"]
    kept = machine.build_env("9.0", "/x", 4, base={"TORCH_CUDA_ARCH_LIST": "8.0", "MAX_JOBS": "2", "CUDA_HOME": "/y"})
    assert not {"TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME"} & set(kept)  # the user's choice stands


# --- the plan ------------------------------------------------------------------------------------------------------
def test_gpu_plan_covers_the_grid():
    p = C.gpu_profile()
    groups = C.plan(p)
    allc = [c for g in groups for c in g["cases"]]
    assert len({c["id"] for c in allc}) == len(allc) and len({g["name"] for g in groups}) == len(groups)
    loss_cases = {(c["backend"], c["loss"], c["dtype"], c["D"], c["N"]) for c in allc if c.get("kind") == "loss"}
    assert len(loss_cases) == 3 * 10 * 4 * 3 * 3
    from ltcl_fused.triton_kernels.configs import SHIPPED
    blocks = {v for cfg in SHIPPED.values() for bc in (cfg.fwd, cfg.bwd) for v in bc[:2]}  # BLOCK_M, BLOCK_N
    assert all(n % b for (_, _, _, _, n) in loss_cases for b in blocks)  # N: a non-multiple of every block
    cfg = [c for c in allc if c.get("kind") == "configs"]
    assert {c["dtype"] for c in cfg} == {"bf16", "fp32"}
    for c in cfg:
        ch, si = K.kernel_config(c["chunked"]), K.kernel_config(c["single"])
        assert not ch.fwd.single_d(c["D"]) and not ch.bwd.single_d(c["D"])
        assert si.fwd.single_d(c["D"]) and si.bwd.single_d(c["D"])
    large = [c for c in allc if c["section"] == "large"]
    assert large and all(C.exceeds_int32(c) for c in large)
    tim = [c for c in allc if c["section"] == "timing"]
    assert {c["N"] for c in tim} == {8192, 65536, 262144} and {c["dtype"] for c in tim} == {"bf16", "fp32"}
    assert {c["provider"] for c in tim} == {"torch.mm", "triton", "cuda", "torch", "reference"}
    assert all(c["min_repeats"] >= 10 for c in tim)
    for g in groups:  # CUDA cases last in their group; groups that start with one go last in their phase
        flags = [C.uses_cuda(c) for c in g["cases"]]
        assert flags == sorted(flags)
    par = [g for g in groups if g["phase"] == "parallel"]
    assert [g["needs_cuda"] for g in par] == sorted(g["needs_cuda"] for g in par)


def test_report_exit_code_and_multiples(tmp_path):
    meta = dict(status="ok", mode="dry", device="cpu", budget_s=60.0)
    rows = [dict(id="timing/torch.mm/bf16/N8", section="timing", kind="gemm", provider="torch.mm", loss="-",
                 dtype="bf16", N=8, status="ok", total_ms=2.0),
            dict(id="timing/triton/afcl/bf16/N8", section="timing", kind="step", provider="triton", loss="afcl",
                 dtype="bf16", N=8, status="ok", total_ms=7.0),
            dict(id="large/triton/supcon", section="large", kind="large_supcon", backend="triton", status="oom"),
            dict(id="correctness/torch/supcon/fp32/D8/N8", section="correctness", kind="loss", backend="torch",
                 loss="supcon", dtype="fp32", status="pass", e_loss=1e-7, bound_loss=1e-6)]
    prof = C.dry_profile()
    # an OOM of the large case is no failure
    assert report.write_all(str(tmp_path), meta, [dict(r) for r in rows], prof) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    step = next(r for r in data["cases"] if r["id"] == "timing/triton/afcl/bf16/N8")
    assert step["x_gemm"] == pytest.approx(3.5) and step["gemm_ms"] == 2.0
    rows[3]["status"] = "fail"
    assert report.write_all(str(tmp_path), meta, [dict(r) for r in rows], prof) == 1
    assert "FAIL (1 failed)" in (tmp_path / "summary.md").read_text()


# --- the dry run, end to end -----------------------------------------------------------------------------------------
def _dry_run(out, *extra, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "ltcl_fused.gpu_check", "--dry-run", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_writes_the_three_files(tmp_path):
    p = _dry_run(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = data["cases"]
    assert data["summary"]["exit_code"] == 0 and data["summary"]["failures"] == 0
    assert data["meta"]["triton"] and data["meta"]["torch"] == torch.__version__
    by = {}
    for r in rows:
        by.setdefault((r["section"], r.get("backend") or r.get("provider")), []).append(r)
    for b in ("triton", "torch"):
        loss_rows = [r for r in by[("correctness", b)] if r["kind"] == "loss"]
        assert {(r["loss"], r["dtype"]) for r in loss_rows} == {(l, d) for l in C.LOSSES for d in C.DTYPES}
        assert all(r["status"] == "pass" and r["bitwise_repeat"] is True for r in loss_rows), loss_rows
        assert all(r["e_grad"] <= r["bound_grad"] for r in loss_rows)
    cuda = [r for r in rows if r.get("backend") == "cuda" or r.get("provider") == "cuda"]
    assert cuda and all(r["status"] == "unavailable" and "CUDA tensors" in r["reason"] for r in cuda)
    assert all(r["status"] == "pass" for r in by[("correctness", "triton")] if r["kind"] == "configs")
    assert {r["status"] for r in by[("large", "triton")]} == {"pass"}
    kinds = {(r["kind"], r["status"]) for r in rows if r["section"] == "behaviour" and r["backend"] == "triton"}
    assert {("stream", "pass"), ("graph", "pass"), ("compile", "pass"), ("syncs", "skipped")} <= kinds
    steps = [r for r in rows if r["section"] == "timing" and r["kind"] == "step" and r["status"] == "ok"]
    assert {r["provider"] for r in steps} == {"triton", "torch", "reference"}
    assert all(r["x_gemm"] > 0 and r["repeats"] >= 2 for r in steps)
    assert any(r["section"] == "largest" and r["status"] == "ok" for r in rows)
    csv_lines = (tmp_path / "gpu_check.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("section,id,status") and len(csv_lines) == len(rows) + 1
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# ltcl_fused GPU check: PASS")
    for heading in ("## Machine and versions", "## Backends", "## Correctness", "## Large index",
                    "## Streams, CUDA graphs, torch.compile", "## Timing", "## Largest N", "## Time budget"):
        assert heading in md, heading
    assert "| supcon | 4/4 | unavailable | 4/4 |" in md


def test_gpu_run_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("a GPU is present")
    p = subprocess.run([sys.executable, "-m", "ltcl_fused.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--dry-run" in p.stderr and "CUDA" in p.stderr


def test_injected_failure_makes_the_exit_code_non_zero(tmp_path):
    p = _dry_run(tmp_path, "--backends", "torch", "--sections", "correctness", "--inject-failure")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["id"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["cases"]}
    assert rows["correctness/torch/supcon/fp32/injected-perturbation"]["status"] == "fail"
    assert "loss error" in rows["correctness/torch/supcon/fp32/injected-perturbation"]["reason"]
    crash = rows["correctness/torch/injected-crash"]
    assert crash["status"] == "crash" and "SIGABRT" in crash["reason"]
    assert rows["correctness/torch/supcon/fp32/after-crash"]["status"] == "pass"  # the worker was restarted
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# ltcl_fused GPU check: FAIL (2 failed)")
    assert "injected-crash" in md and "injected-perturbation" in md


# --- the runner: the CUDA extension build in the background and the groups that wait for it ------------------------
def test_cuda_groups_wait_for_the_build(tmp_path):
    import time
    from ltcl_fused.gpu_check import runner as R
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)

    def cuda_group(name):
        case = dict(id=f"{name}/c", kind="loss", backend="cuda", loss="supcon", dtype="fp32", D=8, B=4, N=8,
                    section="correctness")
        return R.GroupRun(dict(name=name, section="correctness", phase="parallel", needs_cuda=True, cases=[case]),
                          str(tmp_path), "cpu", str(tmp_path / f"{name}_build.json"))

    # a build that succeeds after 2 s: the group's worker waits for it, then asks the engine (CPU tensors here)
    ok = R.Build(str(tmp_path / "ok_build.json"), str(tmp_path / "ok_build.log"))
    ok.start(env, 60, cmd=[sys.executable, "-c", "import time; time.sleep(2); print('ltcl_fused.ext: built x')"])
    run = cuda_group("ok")
    R._run_phase([run], 2, time.time() + 120, env, ok)
    assert ok.row["status"] == "ok" and ok.row["reason"] == "ltcl_fused.ext: built x"
    assert run.results["ok/c"]["status"] == "unavailable" and "CUDA tensors" in run.results["ok/c"]["reason"]
    # a failed build: a group of CUDA cases only is resolved without a worker, with the build's error line
    bad = R.Build(str(tmp_path / "bad_build.json"), str(tmp_path / "bad_build.log"))
    bad.start(env, 60, cmd=[sys.executable, "-c", "import sys; print('x.cu(3): error: no such thing'); sys.exit(1)"])
    while bad.running:
        bad.poll()
        time.sleep(0.1)
    run = cuda_group("bad")
    R._run_phase([run], 2, time.time() + 120, env, bad)
    assert bad.row["status"] == "error" and run.proc is None
    assert run.results["bad/c"] == dict(status="unavailable", reason="x.cu(3): error: no such thing", wall_s=0.0)
    # a missing toolchain is "unavailable", not a failure of the build
    nin = R.Build(str(tmp_path / "n_build.json"), str(tmp_path / "n_build.log"))
    nin.start(env, 60, cmd=[sys.executable, "-c",
                            "import sys; print('ltcl_fused.ext: ninja not found (pip install ninja)'); sys.exit(1)"])
    while nin.running:
        nin.poll()
        time.sleep(0.1)
    assert nin.row["status"] == "unavailable" and not report.is_failure(nin.row)


# --- opt-in symmetric kernels: every correctness case of such a backend runs once more with them on ---------------------
def _sym_case():
    return dict(id="correctness/torch/supcon/fp32/D8/N12", kind="loss", backend="torch", loss="supcon",
                dtype="fp32", D=8, B=6, N=12)


def test_loss_case_runs_the_second_path_and_restores_the_env(monkeypatch):
    import types
    monkeypatch.setattr(K, "SECOND_PATH", {"torch": ("LTCL_TEST_PATH", "0", "the test's second path")})
    monkeypatch.delenv("LTCL_TEST_PATH", raising=False)
    seen = []
    real = K.evaluate

    def spy(sp, x, backend, check_finite=True):
        seen.append(os.environ.get("LTCL_TEST_PATH"))
        return real(sp, x, backend, check_finite)

    monkeypatch.setattr(K, "evaluate", spy)
    res = K.run_loss_case(_sym_case(), types.SimpleNamespace(device=torch.device("cpu")), {})
    assert res["status"] == "pass" and res["second_ok"] is True, res
    assert res["second_path"] == "LTCL_TEST_PATH=0" and res["second_e_grad"] <= res["bound_grad"]
    assert "0" in seen and None in seen  # one run with the variable set, the others without it
    assert "LTCL_TEST_PATH" not in os.environ


def test_loss_case_fails_when_the_second_path_is_wrong(monkeypatch):
    import types
    monkeypatch.setattr(K, "SECOND_PATH", {"torch": ("LTCL_TEST_PATH", "0", "the test's second path")})
    real = K.evaluate

    def broken_when_on(sp, x, backend, check_finite=True):
        out = real(sp, x, backend, check_finite)
        if os.environ.get("LTCL_TEST_PATH") == "0":  # a second path that drops half of the gradient
            out = K.Outcome(out.value, {k: 0.5 * g for k, g in out.grads.items()})
        return out

    monkeypatch.setattr(K, "evaluate", broken_when_on)
    res = K.run_loss_case(_sym_case(), types.SimpleNamespace(device=torch.device("cpu")), {})
    assert res["status"] == "fail" and res["second_ok"] is False
    assert "the test's second path (LTCL_TEST_PATH=0)" in res["reason"]


def test_cuda_engine_takes_the_symmetric_kernels_unless_told_not_to(monkeypatch):
    from ltcl_fused.backends.cpp_engine import CPUEngine, CUDAEngine
    monkeypatch.delenv("LTCL_CUDA_SYMMETRIC", raising=False)
    assert CUDAEngine().symmetric_ops == frozenset({"rowstats", "ssl"}) == CPUEngine().symmetric_ops
    monkeypatch.setenv("LTCL_CUDA_SYMMETRIC", "0")
    assert CUDAEngine().symmetric_ops == frozenset()
    assert K.SECOND_PATH["cuda"][:2] == ("LTCL_CUDA_SYMMETRIC", "0")