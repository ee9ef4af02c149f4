"""Smoke and correctness tests of the main-job demo (ltcl_fused.demo) and the benchmark sweep (benchmarks/)."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import ltcl_fused.reference as R
from ltcl_fused import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)
import providers as P  # noqa: E402
import sweep  # noqa: E402

from _hang import HANG_GUARD_S  # noqa: E402
from _truth import assert_within  # noqa: E402


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------------------------- demo: data
def test_long_tailed_profile_is_exponential():
    c = demo.long_tailed_counts(120, 10, 50.0)
    assert c[0] == 120 and all(a >= b for a, b in zip(c, c[1:]))
    assert 40 <= c[0] / c[-1] <= 60  # rounding of the smallest class
    assert demo.long_tailed_counts(100, 10, 1.0) == [100] * 10


def test_split_is_fixed_balanced_and_long_tailed():
    x_tr, y_tr, x_te, y_te, counts = demo.load_long_tailed_digits(20.0)
    x_tr2, y_tr2, x_te2, _, _ = demo.load_long_tailed_digits(20.0)
    assert torch.equal(x_tr, x_tr2) and torch.equal(y_tr, y_tr2) and torch.equal(x_te, x_te2)
    assert torch.bincount(y_te, minlength=10).tolist() == [demo.N_TEST_PER_CLASS] * 10
    assert torch.bincount(y_tr, minlength=10).tolist() == counts
    assert x_tr.min() >= 0 and x_tr.max() <= 1
    # no test image is also a training image (same row of the same class)
    d = torch.cdist(x_te, x_tr)
    same = (y_te[:, None] == y_tr[None, :]) & (d == 0)
    assert int(same.sum()) <= 2  # digits holds a few exact duplicates; the split itself is disjoint


def test_augment_is_seeded_and_keeps_shape():
    x = demo.load_long_tailed_digits(10.0)[0][:16]
    a = demo.augment(x, torch.Generator().manual_seed(3))
    b = demo.augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


# ---------------------------------------------------------------------------------------------- demo: runs
def test_demo_quick_writes_table_and_plot(tmp_path, capsys):
    threads = torch.get_num_threads()
    demo.main(["--quick", "--out", str(tmp_path), "--no-progress", "--methods", "ce,supcon,afcl,bcl"])
    assert torch.get_num_threads() == threads  # the demo restores the caller's thread count
    out = capsys.readouterr().out
    assert "runs on:" in out
    for name in ("CE", "SupCon", "AFCL", "BCL"):
        assert f"\n{name} " in out
    rep = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["method"] for r in rep["results"]] == ["ce", "supcon", "afcl", "bcl"]
    for r in rep["results"]:
        assert 0.0 <= r["unweighted"] <= 1.0 and 0.0 <= r["weighted"] <= 1.0 and len(r["per_class"]) == 10
    assert (tmp_path / "demo_accuracy.png").stat().st_size > 5000
    assert len((tmp_path / "demo_results.csv").read_text().splitlines()) == 5


def test_demo_training_is_deterministic_and_learns():
    cfg = demo.Config(progress=False, steps=30, probe_steps=60, batch=64)
    data = demo.load_long_tailed_digits(10.0)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = demo.train_one("afcl", 7, data, cfg)
        b = demo.train_one("afcl", 7, data, cfg)
    finally:
        torch.set_num_threads(prev)
    assert a["per_class"] == b["per_class"]
    assert a["unweighted"] > 0.3  # far above chance (0.1) after a few steps


def test_demo_backend_report_names_the_engine():
    assert demo.which_backend("torch").startswith("torch")
    assert demo.which_backend("reference") == "reference"


def test_demo_synthetic_compares_with_reference(capsys):
    rows = demo.run_synthetic(128, 8, "torch", "cpu", mem_limit_gb=None, timeout=HANG_GUARD_S, threads=1)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert "fused vs dense" in capsys.readouterr().out
    # the fused (rows[0]) and dense (rows[1]) fp32 runs against the fp64 truth on the worker's inputs
    # (rebuilt as ltcl_fused.demo._synthetic_worker makes them), tests/_truth.py
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 2, 8, generator=g), dim=-1)
    y = torch.randint(0, 100, (64,), generator=g)
    res = {}
    for dt in (torch.float32, torch.float64):
        xd = x.detach().to(dt).requires_grad_(True)
        loss = R.afcl(xd, y, gamma=2.0, eta=10.0, temperature=0.1)
        loss.backward()
        res[dt] = {"loss": loss.detach(), "grad_norm": xd.grad.norm().detach()}
    for key in ("loss", "grad_norm"):
        truth, here = res[torch.float64][key], res[torch.float32][key]
        # the worker's dense run is the same computation as the dense run here: the inputs were rebuilt right
        assert_within(torch.tensor(rows[1][key]), here, truth, what=f"dense {key} (input rebuild)", floor=1.0)
        assert_within(torch.tensor(rows[0][key]), torch.tensor(rows[1][key]), truth, what=f"fused {key}", floor=1.0)


# ---------------------------------------------------------------------------------------------- providers
@pytest.mark.parametrize("loss", ["supcon", "afcl", "bcl"])
def test_dense_providers_agree_with_reference(loss):
    inp = P.make_inputs(loss, 96, 12, torch.device("cpu"), dtype=torch.float64, seed=1)
    ref = P.build("reference", loss, inp)()
    others = [p for p in P.DENSE + ("torch",) if p != "reference" and P.supports(p, loss)]
    assert others
    for prov in others:
        val = P.build(prov, loss, inp)()
        assert torch.allclose(val.double(), ref, rtol=1e-6, atol=1e-8), (prov, float(val), float(ref))


def test_afcl_transcription_differs_from_reference_when_parameters_differ():
    """Guards the test above: a wrong gamma/eta in the transcription would be caught."""
    inp = P.make_inputs("afcl", 64, 8, torch.device("cpu"), dtype=torch.float64)
    a = P.afcl_paper_dense(inp["features"], inp["labels"], gamma=0.0, eta=0.0)
    b = R.afcl(inp["features"], inp["labels"], gamma=P.AFCL_GAMMA, eta=P.AFCL_ETA, temperature=P.TAU)
    assert not torch.allclose(a, b)


def test_gemm4_bound_subset_scaling():
    run, scale = P.gemm4_runner(512, 8, torch.device("cpu"), max_rows_timed=None)
    assert scale == 1.0
    dC = run()
    A = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    A64 = A.double()  # against the fp64 truth, bounded by the fp32 dense product's error (tests/_truth.py)
    assert_within(dC, (A @ A.T).T @ A, (A64 @ A64.T).T @ A64, what="dC")
    run, scale = P.gemm4_runner(8192, 8, torch.device("cpu"), max_rows_timed=1024)
    assert scale == 8.0


def test_unavailable_provider_says_why():
    assert "does not implement" in P.unavailable_reason("pml", "afcl", torch.device("cpu"))
    assert "CUDA" in P.unavailable_reason("triton", "supcon", torch.device("cpu"))
    assert P.unavailable_reason("torch", "supcon", torch.device("cpu")) is None


# ---------------------------------------------------------------------------------------------- sweep
def test_sweep_quick_smoke(tmp_path):
    # one subprocess per case: keep the grid to 4 cases (gemm4, reference, torch, cpu) to stay fast
    # no per-case time limit that a busy machine could hit (HANG_GUARD_S only guards against a hang)
    cmd = [sys.executable, os.path.join(BENCH, "sweep.py"), "--quick", "--out", str(tmp_path), "--N", "96",
           "--losses", "afcl", "--providers", "gemm4,reference,torch,cpu,pml", "--threads", "1",
           "--time-limit", str(HANG_GUARD_S)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=HANG_GUARD_S)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep_cpu_quick.csv")))
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"gemm4", "reference", "torch", "cpu"}  # pml has no afcl: left out of the grid
    for prov in ("gemm4", "reference", "torch"):
        r = by[prov]
        assert r["status"] == "ok", r
        assert float(r["total_ms"]) > 0 and r["machine"] and r["torch"] and r["date"] and r["threads"] == "1"
        if prov != "gemm4":
            assert float(r["x_bound"]) > 0 and float(r["bwd_ms"]) > 0 and float(r["fwd_ms"]) > 0
            assert r["peak_mem_mb"] != ""
    assert by["cpu"]["status"] in ("ok", "unavailable", "error"), by["cpu"]
    if by["cpu"]["status"] != "ok":
        assert by["cpu"]["reason"]
    for kind in ("time", "memory", "x_bound"):
        assert (tmp_path / f"sweep_cpu_quick_{kind}.png").stat().st_size > 5000


def test_sweep_marks_oom_then_skips_larger_sizes(tmp_path):
    # the dense reference needs several N×N fp32 matrices (64 MiB each at N=4096): a 40 MiB cap must fail cleanly
    sweep.main(["--device", "cpu", "--providers", "reference", "--losses", "supcon", "--N", "4096,8192", "--D", "8",
                "--mem-limit-gb", "0.04", "--repeats", "1", "--time-limit", str(HANG_GUARD_S), "--out", str(tmp_path),
                "--name", "oom", "--no-plot"])
    rows = list(csv.DictReader(open(tmp_path / "oom.csv")))
    assert [r["status"] for r in rows] == ["oom", "skipped"], rows
    assert "N=4096" in rows[1]["reason"]


def test_sweep_marks_timeout(tmp_path, monkeypatch):
    """A case that runs past its limit is killed and recorded as 'timeout'. The worker here blocks until it
    is killed, so the outcome cannot depend on how fast or busy the machine is."""
    pidfile = tmp_path / "worker.pid"
    blocker = tmp_path / "blocking_worker.py"
    blocker.write_text(f"import os, signal\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                       "while True:\n    signal.pause()\n")
    monkeypatch.setattr(sweep, "__file__", str(blocker))  # run_case starts `python <sweep.__file__> --worker ...`
    cfg = {"provider": "reference", "loss": "supcon", "N": 64, "D": 4, "device": "cpu", "repeats": 1,
           "time_limit": 1.0, "mem_limit_gb": None, "threads": 1}
    res = sweep.run_case(cfg, 1.0)
    assert res["status"] == "timeout" and "1 s limit" in res["reason"], res
    pid = pidfile.read_text() if pidfile.exists() else ""
    if pid:  # the worker had started: it was killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


@pytest.mark.parametrize("loss", P.SSL_LOSSES)
def test_sweep_providers_cover_the_self_supervised_losses(loss):
    """The sweep's self-supervised cases run the same loss on every provider (values and gradients agree)."""
    inp = P.make_inputs(loss, 24, 8, torch.device("cpu"), dtype=torch.float64)
    ref = P.build("reference", loss, inp)()
    ref.backward()
    ref_grads = [t.grad.clone() for t in P.leaves(inp)]
    for provider in ("torch", "cpu"):
        if P.unavailable_reason(provider, loss, torch.device("cpu")) is not None:
            continue
        for t in P.leaves(inp):
            t.grad = None
        out = P.build(provider, loss, inp)()
        out.backward()
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
        for t, g in zip(P.leaves(inp), ref_grads):
            torch.testing.assert_close(t.grad, g, rtol=1e-8, atol=1e-10)
