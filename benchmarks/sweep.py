"""Speed and memory sweep of the contrastive losses over providers, N, D (see benchmarks/providers.py).

Every (provider, loss, N, D) case runs in a fresh subprocess, so one out-of-memory or crash never ends
the sweep and the CPU peak-memory figure (VmHWM, reset just before the loss runs) belongs to that case
alone. A case is marked instead of crashing:
  ok | oom (allocation failed under the memory limit, or killed) | timeout (ran past --time-limit)
  | too_slow (predicted from the previous N to exceed the limit: not run) | skipped (failed at a smaller N)
  | unavailable (provider cannot run here: the reason is recorded) | error (any other exception)
  | not_run (the sweep's --budget-min ran out before this case).
Each row also records the machine, versions, date, torch threads and the 1-minute load average when the
case started (this benchmark machine is shared; a high load makes every time longer and noisier).

Timing: one warm-up forward+backward, then the median of up to --repeats timed repeats (fewer when one
run is long); ``time.perf_counter`` on CPU, CUDA events on GPU. ``fwd_ms`` = forward, ``bwd_ms`` = backward,
``total_ms`` = median of (forward + backward) per repeat. Peak memory: CPU = VmHWM − VmRSS just before the
first loss call (extra resident memory the loss needs beyond its inputs; /proc/self/clear_refs resets the
high-water mark), GPU = torch.cuda.max_memory_allocated − memory allocated before the call.
``x_bound`` = total_ms / gemm4 time at the same N, D (the four N×N×D products; see providers.gemm4_runner).

    python benchmarks/sweep.py --quick                     # CI smoke test (seconds)
    python benchmarks/sweep.py --out benchmarks/results    # the committed CPU run (see docs/performance.md)
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

RESULT_TAG = "SWEEP_RESULT "
FIELDS = ["date", "machine", "python", "torch", "triton", "ltcl_fused", "git", "device", "threads", "provider",
          "loss", "N", "D", "dtype", "status", "reason", "repeats", "fwd_ms", "bwd_ms", "total_ms", "bound_ms",
          "x_bound", "peak_mem_mb", "peak_rss_mb", "wall_s", "loadavg"]
FAILED = ("oom", "timeout", "too_slow", "skipped", "error")  # not_run: the sweep's --budget-min ran out


# ----------------------------------------------------------------------------------------------------------
# worker: one case, in its own process
# ----------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return float(m.group(1)) if m else float("nan")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg \
        or "cannot allocate memory" in msg or "failed to allocate" in msg or "std::bad_alloc" in msg


def worker(cfg: dict) -> dict:
    import torch
    import providers as P

    dev = torch.device(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    out = {"status": "ok", "reason": "", "repeats": 0, "fwd_ms": "", "bwd_ms": "", "total_ms": "",
           "peak_mem_mb": "", "peak_rss_mb": ""}
    prov, loss, N, D = cfg["provider"], cfg["loss"], int(cfg["N"]), int(cfg["D"])
    deadline = time.perf_counter() + float(cfg["time_limit"]) * 0.8
    cuda = dev.type == "cuda"
    try:
        if prov != "gemm4":
            reason = P.unavailable_reason(prov, loss, dev)
            if reason is not None:
                return {**out, "status": "unavailable", "reason": reason}
        if not cuda and cfg.get("mem_limit_gb"):
            # cap the address space: an allocation beyond the limit raises instead of swapping the machine
            vm = _status_kb("VmSize") * 1024
            lim = int(vm + float(cfg["mem_limit_gb"]) * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        if prov == "gemm4":
            big = N * N * D > 2 ** 36  # time a subset of rows for the largest problems, then scale
            run, scale = P.gemm4_runner(N, D, dev, max_rows_timed=4096 if big else None)
            fwd, bwd = (lambda: run()), None
            inp = None
        else:
            scale = 1.0
            inp = P.make_inputs(loss, N, D, dev)
            fwd = P.build(prov, loss, inp)
            bwd = None if loss == "mining" else (lambda o: o.backward())

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def once():
            if inp is not None:
                for t in P.leaves(inp):
                    t.grad = None
            if cuda:
                e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                e0.record()
                o = fwd()
                e1.record()
                if bwd is not None:
                    bwd(o)
                e2.record()
                torch.cuda.synchronize()
                return e0.elapsed_time(e1), (e1.elapsed_time(e2) if bwd is not None else 0.0)
            t0 = time.perf_counter()
            o = fwd()
            t1 = time.perf_counter()
            if bwd is not None:
                bwd(o)
            t2 = time.perf_counter()
            return (t1 - t0) * 1e3, (t2 - t1) * 1e3

        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
        else:
            _reset_hwm()
            base_rss = _status_kb("VmRSS")
        t_start = time.perf_counter()
        f0, b0 = once()  # warm-up (also compiles / autotunes); its memory counts in the peak
        warm_s = time.perf_counter() - t_start
        times = []
        budget = deadline - time.perf_counter()
        # at least `repeats` runs and ~0.5 s of timed runs (short cases are noisy), within the time budget
        want = max(int(cfg["repeats"]), min(50, int(0.5 // max(warm_s, 1e-6))))
        reps = int(max(1, min(want, budget // max(warm_s, 1e-6))))
        if budget < warm_s:  # no time for a timed repeat: report the warm-up run (marked by repeats=0)
            times, reps = [(f0, b0)], 0
        else:
            times = [once() for _ in range(reps)]
        fw = statistics.median(t[0] for t in times) * scale
        bw = statistics.median(t[1] for t in times) * scale
        tot = statistics.median(t[0] + t[1] for t in times) * scale
        out.update(repeats=reps, fwd_ms=round(fw, 4), total_ms=round(tot, 4),
                   bwd_ms=round(bw, 4) if bwd is not None else "")
        if prov == "gemm4":
            out["fwd_ms"] = ""
        if cuda:
            out["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base_alloc) / 2 ** 20, 2)
        else:
            out["peak_mem_mb"] = round((_status_kb("VmHWM") - base_rss) / 1024, 2)
            out["peak_rss_mb"] = round(_status_kb("VmHWM") / 1024, 2)
    except BaseException as e:  # noqa: BLE001 - the sweep records every failure instead of crashing
        line = (str(e).strip().splitlines() or [""])[0][:200]
        out.update(status="oom" if _is_oom(e) else "error", reason=f"{type(e).__name__}: {line}")
    return out


# ----------------------------------------------------------------------------------------------------------
# parent: the grid
# ----------------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    import torch
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "n/a"
    try:
        import ltcl_fused
        lv = ltcl_fused.__version__
    except Exception as e:
        lv = f"import failed ({type(e).__name__})"
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except Exception:
        git = ""
    if device == "cuda" and torch.cuda.is_available():
        mach = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
                cpu = m.group(1).strip() if m else cpu
        except OSError:
            pass
        mem = ""
        try:
            mem = f", {_meminfo_kb('MemTotal') / 2 ** 20:.0f} GiB"
        except Exception:
            pass
        mach = f"{cpu}, {os.cpu_count()} cores{mem}"
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": mach,
            "python": platform.python_version(), "torch": torch.__version__, "triton": tv, "ltcl_fused": lv,
            "git": git, "device": device, "threads": torch.get_num_threads()}


def _meminfo_kb(field: str) -> float:
    with open("/proc/meminfo") as f:
        return float(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def run_case(cfg: dict, time_limit: float) -> dict:
    """Run one case in a fresh interpreter; a timeout or a killed child is recorded, never raised."""
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real kernels only (the tests' conftest sets the interpreter)
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
        try:
            so, se = p.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the child's own process group only
            p.communicate()
            return {"status": "timeout", "reason": f"ran past the {time_limit:.0f} s limit",
                    "wall_s": round(time.perf_counter() - t0, 1)}
    except OSError as e:
        return {"status": "error", "reason": f"could not start worker: {e}", "wall_s": 0.0}
    wall = round(time.perf_counter() - t0, 1)
    for line in so.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "wall_s": wall}
    if p.returncode is not None and p.returncode < 0:
        sig = -p.returncode
        st = "oom" if sig == signal.SIGKILL else "error"
        return {"status": st, "reason": f"worker killed by signal {sig}", "wall_s": wall}
    tail = (se.strip().splitlines() or ["no output"])[-1][:200]
    return {"status": "error", "reason": f"worker exit {p.returncode}: {tail}", "wall_s": wall}


def fill_bound(path: str) -> int:
    """(Re)compute bound_ms and x_bound of every ok row from the file's gemm4 rows (covers --append runs)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    bound = {(r["N"], r["D"], r["device"]): float(r["total_ms"]) for r in rows
             if r["provider"] == "gemm4" and r["status"] == "ok"}
    n = 0
    for r in rows:
        b = bound.get((r["N"], r["D"], r["device"]))
        if r["provider"] != "gemm4" and r["status"] == "ok" and b:
            r["bound_ms"], r["x_bound"] = b, round(float(r["total_ms"]) / b, 3)
            n += 1
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    os.replace(tmp, path)
    return n


def default_providers(device: str):
    if device == "cuda":
        return ["gemm4", "reference", "pml", "supcontrast", "afcl_paper", "torch", "triton", "cuda"]
    return ["gemm4", "reference", "pml", "supcontrast", "afcl_paper", "torch", "cpu"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CI smoke grid (a few seconds per case)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--N", default=None, help="comma-separated N (anchors = columns)")
    ap.add_argument("--D", default=None, help="comma-separated feature dims")
    ap.add_argument("--losses", default=None, help="comma-separated, from supcon,afcl,bcl,mining,dcl,hcl,bayesian_cl,mttv")
    ap.add_argument("--providers", default=None, help="comma-separated (see providers.py)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (median reported)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per case before 'timeout'")
    ap.add_argument("--provider-time-limit", default="",
                    help="per-provider overrides of --time-limit, e.g. cpu=600,torch=120")
    ap.add_argument("--mem-limit-gb", type=float, default=None, help="CPU address-space headroom per case")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    ap.add_argument("--name", default=None, help="CSV file stem (default sweep_<device>[_quick])")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--append", action="store_true", help="append to an existing CSV (same --name) and plot it all")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="wall-clock budget of the whole sweep; cases left when it runs out are marked not_run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker is not None:
        res = worker(json.loads(a.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.quick:
        Ns, Ds = [128, 256], [16]
        losses = ["supcon", "afcl", "bcl"]
        provs = ["gemm4", "reference", "pml", "supcontrast", "afcl_paper", "torch", "cpu"]
        repeats, tlimit = 3, 60.0
    else:
        Ns = [1024, 2048, 4096, 8192, 16384, 32768, 65536] + ([131072, 262144] if device == "cuda" else [])
        Ds = [128, 512]
        losses = ["supcon", "afcl", "bcl", "mining"]
        provs = default_providers(device)
        repeats, tlimit = 3, 240.0
    Ns = [int(x) for x in a.N.split(",")] if a.N else Ns
    Ds = [int(x) for x in a.D.split(",")] if a.D else Ds
    losses = a.losses.split(",") if a.losses else losses
    provs = a.providers.split(",") if a.providers else provs
    repeats = a.repeats or repeats
    tlimit = a.time_limit or tlimit
    plimit = {k: float(v) for k, v in (kv.split("=") for kv in a.provider_time_limit.split(",") if kv)}
    mem_gb = a.mem_limit_gb if a.mem_limit_gb is not None else (
        None if device == "cuda" else round(min(12.0, 0.6 * _meminfo_kb("MemTotal") / 2 ** 20), 1))
    os.makedirs(a.out, exist_ok=True)
    name = a.name or f"sweep_{device}{'_quick' if a.quick else ''}"
    path = os.path.join(a.out, name + ".csv")
    meta = machine_info(device)
    if a.threads:
        meta["threads"] = a.threads
    print(f"sweep: {meta['machine']} | torch {meta['torch']} | triton {meta['triton']} | device {device} | "
          f"memory limit {mem_gb} GiB | {tlimit:.0f} s per case -> {path}", flush=True)

    # the grid: gemm4 once per (N, D), then each loss; providers that do not implement a loss are left out
    cases = [("gemm4", "-", D) for D in Ds if "gemm4" in provs]
    import providers as P
    cases += [(p, L, D) for D in Ds for L in losses for p in provs if p != "gemm4" and P.supports(p, L)]
    bound = {}
    rows = []
    t_sweep = time.perf_counter()
    append = a.append and os.path.exists(path)
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if not append:
            w.writeheader()
        for prov, loss, D in cases:
            prev = None  # (N, status, total_ms, reason) of the last case of this series
            lim = plimit.get(prov, tlimit)
            for N in Ns:
                row = {**meta, "provider": prov, "loss": loss, "N": N, "D": D, "dtype": "float32",
                       "bound_ms": "", "x_bound": "", "reason": "", "repeats": "", "fwd_ms": "", "bwd_ms": "",
                       "total_ms": "", "peak_mem_mb": "", "peak_rss_mb": "", "wall_s": "", "loadavg": ""}
                out_of_time = a.budget_min is not None and time.perf_counter() - t_sweep > 60 * a.budget_min
                if out_of_time:
                    row.update(status="not_run", reason=f"sweep budget of {a.budget_min:g} min used up")
                elif prev is not None and prev[1] in FAILED:
                    row.update(status="skipped", reason=f"{prev[1]} at N={prev[0]}")
                elif prev is not None and prev[1] == "unavailable":
                    row.update(status="unavailable", reason=prev[3])
                elif prev is not None and prev[1] == "ok" and prov != "gemm4" and \
                        prev[2] * (N / prev[0]) ** 2 * 2 / 1e3 > lim:  # (gemm4 times a row subset when large)
                    pred = prev[2] * (N / prev[0]) ** 2 / 1e3
                    row.update(status="too_slow", reason=f"predicted {pred:.0f} s per forward+backward from "
                                                          f"N={prev[0]} (limit {lim:.0f} s per case)")
                else:
                    cfg = {"provider": prov, "loss": "afcl" if prov == "gemm4" else loss, "N": N, "D": D,
                           "device": device, "repeats": repeats, "time_limit": lim, "mem_limit_gb": mem_gb,
                           "threads": a.threads}
                    row["loadavg"] = round(os.getloadavg()[0], 2)
                    row.update(run_case(cfg, lim))
                if prov == "gemm4" and row["status"] == "ok":
                    bound[(N, D)] = float(row["total_ms"])
                if row["status"] == "ok" and (N, D) in bound and prov != "gemm4":
                    row["bound_ms"] = bound[(N, D)]
                    row["x_bound"] = round(float(row["total_ms"]) / bound[(N, D)], 3)
                prev = (N, row["status"], float(row["total_ms"]) if row["status"] == "ok" else 0.0, row["reason"])
                w.writerow({k: row.get(k, "") for k in FIELDS})
                f.flush()
                rows.append(row)
                tm = f"{float(row['total_ms']):10.1f} ms" if row["status"] == "ok" else " " * 13
                mem = f"{float(row['peak_mem_mb']):9.1f} MiB" if row.get("peak_mem_mb") not in ("", None) else ""
                print(f"  {prov:>11s} {loss:>7s} D={D:<4d} N={N:<7d} {row['status']:>11s} {tm} {mem} "
                      f"{row['reason'][:90]}", flush=True)
    n_filled = fill_bound(path)
    print(f"wrote {path} ({len(rows)} rows; x_bound filled for {n_filled})")
    if not a.no_plot:
        import plot
        for png in plot.plot_csv(path, a.out):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
