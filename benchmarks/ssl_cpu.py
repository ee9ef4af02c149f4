"""CPU benchmark of the self-supervised family: dcl, hcl, bayesian_cl, mttv on backend reference / torch / cpu.

    python benchmarks/ssl_cpu.py                         # 2B in {2048, 8192, 16384}, D=128, fp32
    python benchmarks/ssl_cpu.py --sizes 2048 --repeats 3

Forward+backward of each loss at its defaults (features L2-normalised; mttv on 2B rows). Every
(loss, provider, 2B) runs in a fresh subprocess, so ``peak_rss_mb`` is that case's whole-process peak
resident memory (VmHWM of the worker, including torch itself: about 300 MB). Times are medians of
``--repeats`` runs after one warm-up (no warm-up above ``--warmup-max``). ``reference`` cases whose
dense temporaries would not fit are skipped with the reason in the CSV: the dense Bayesian reference
builds a [2B, 2B-2, 2B-2] comparison (8.6 GB at 2B=2048), and above ``--ref-max`` the [2B, 2B]
reference matrices are left out to keep the machine usable. Output: benchmarks/results/ssl_cpu.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("dcl", "hcl", "bayesian_cl", "mttv")
PROVIDERS = ("reference", "torch", "cpu")


def _vm_hwm_mb():
    """Peak resident memory of this process image (VmHWM). ru_maxrss is not used: Linux carries the
    parent's peak across fork + exec into it, which would floor every case at the parent's RSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(spec):
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, ROOT)
    import ltcl_fused as lf
    torch.manual_seed(0)
    n2, D, loss, provider = spec["n2"], spec["D"], spec["loss"], spec["provider"]
    B = n2 // 2
    if loss == "mttv":
        E = torch.randn(n2, D)
        E[1::2] = E[0::2] + 0.8 * E[1::2]
        inputs = (E,)
    else:
        z1 = F.normalize(torch.randn(B, D), dim=1)
        z2 = F.normalize(z1 + 0.7 * torch.randn(B, D), dim=1)
        inputs = (z1, z2)
    if provider == "cpu":
        from ltcl_fused import ext
        ext.load()
    fn = getattr(lf, loss)

    def run():
        xs = [x.clone().requires_grad_(True) for x in inputs]
        fn(*xs, backend=provider).backward()

    times = []
    for k in range(spec["repeats"] + (1 if spec["warmup"] else 0)):
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        if k > 0 or not spec["warmup"]:
            times.append(dt)
    peak_mb = _vm_hwm_mb()
    print(json.dumps(dict(median_s=statistics.median(times), times=times, peak_rss_mb=peak_mb,
                          threads=torch.get_num_threads())))


def _spawn(spec):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(error=(proc.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384], help="2B values")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-max", type=int, default=8192, help="no warm-up run above this 2B")
    ap.add_argument("--ref-max", type=int, default=8192, help="largest 2B for the dense reference")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ssl_cpu.csv"))
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    from ltcl_fused import ext
    ext.load()  # build once here, not inside a timed worker
    rows = []
    for n2 in args.sizes:
        for loss in args.losses:
            base = {}
            for provider in args.providers:
                row = dict(loss=loss, provider=provider, n2=n2, D=args.D)
                skip = None
                if provider == "reference" and loss == "bayesian_cl":
                    skip = f"dense [2B, 2B-2, 2B-2] rank comparison: {n2 * (n2 - 2) ** 2 / 1e9:.1f} GB"
                elif provider == "reference" and n2 > args.ref_max:
                    skip = f"2B > --ref-max {args.ref_max}"
                if skip:
                    row.update(skipped=skip)
                else:
                    big = n2 > args.warmup_max
                    res = _spawn(dict(n2=n2, D=args.D, loss=loss, provider=provider,
                                      repeats=1 if big else args.repeats, warmup=not big))
                    if "error" in res:
                        row.update(skipped=res["error"])
                    else:
                        row.update(time_s=round(res["median_s"], 4), peak_rss_mb=round(res["peak_rss_mb"], 1),
                                   threads=res["threads"], repeats=len(res["times"]))
                        base[provider] = res["median_s"]
                if provider == "cpu" and "time_s" in row:
                    for other in ("reference", "torch"):
                        if other in base:
                            row[f"speedup_vs_{other}"] = round(base[other] / row["time_s"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    cols = ["loss", "provider", "n2", "D", "time_s", "peak_rss_mb", "speedup_vs_reference", "speedup_vs_torch",
            "threads", "repeats", "skipped"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
