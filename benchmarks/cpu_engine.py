"""CPU benchmark of the C++ extension (backend="cpu"): forward+backward time and peak memory.

    python benchmarks/cpu_engine.py                      # full run: N=8192 timings, N=32768/65536 memory
    python benchmarks/cpu_engine.py --quick              # N=2048 only

Compares, at D=128, 100 classes, fp32, forward+backward:
  * ``dense``: dense PyTorch written the way the released code does it (SupContrast ``SupConLoss`` steps
    for supcon; a transcription of Asymmetric-CL's AFCL for afcl with gamma=2, eta=5),
  * ``gemm4``: the time MKL takes for the four N x N x D matrix products a recompute-based
    forward+backward cannot avoid (S = A C^T twice, G C, G^T A; outputs preallocated),
  * ``cpu``: ``ltcl_fused.supcon/afcl(..., backend="cpu")``.
Every (case, N) runs in a fresh subprocess, so ``peak_rss_mb`` is the whole process's peak resident
memory (VmHWM) for that case alone. Times are medians of ``--repeats`` runs after one warm-up; the
ratios in the CSV come from this one run. Output: benchmarks/results/cpu_engine.csv.
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
TAU, GAMMA, ETA = 0.07, 2.0, 5.0


def _vm_hwm_mb() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss can carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dense_supcon(features, labels, temperature=TAU):
    """SupContrast-style dense SupCon on [N, D] features (every row an anchor, 'all' mode)."""
    import torch
    N = features.shape[0]
    mask = torch.eq(labels[:, None], labels[None, :]).float()
    logits = torch.matmul(features, features.T) / temperature
    logits_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - logits_max.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(N).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    npos = mask.sum(1)
    npos = torch.where(npos < 1e-6, torch.ones_like(npos), npos)
    mean_log_prob_pos = (mask * log_prob).sum(1) / npos
    return (-mean_log_prob_pos).mean()


def dense_afcl(features, labels, temperature=TAU, gamma=GAMMA, eta=ETA):
    """Dense AFCL the way the Asymmetric-CL code computes it (full N x N probability matrix)."""
    import torch
    N = features.shape[0]
    mask = torch.eq(labels[:, None], labels[None, :]).float()
    logits = torch.matmul(features, features.T) / temperature
    logits_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - logits_max.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(N).view(-1, 1), 0)
    pos_mask = mask * logits_mask
    neg_mask = (1 - mask) * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    prob = torch.exp(log_prob)
    t_pos = -(torch.pow(1 - prob, gamma) * log_prob * pos_mask).sum(1) / N
    t_neg = -(torch.log1p(-prob.clamp(max=1 - 1e-7)) * neg_mask).sum(1) / N
    return (t_pos + eta * t_neg).mean()


def _worker(spec):
    import torch
    torch.manual_seed(0)
    N, D, provider, loss, repeats = spec["N"], spec["D"], spec["provider"], spec["loss"], spec["repeats"]
    X0 = torch.nn.functional.normalize(torch.randn(N, D), dim=1)
    y = torch.randint(0, 100, (N,))
    if provider == "gemm4":
        S = torch.empty(N, N)
        out = torch.empty(N, D)

        def run():
            torch.mm(X0, X0.T, out=S)
            torch.mm(X0, X0.T, out=S)
            torch.mm(S, X0, out=out)
            torch.mm(S.T, X0, out=out)
    else:
        import ltcl_fused as lf
        if provider == "cpu":
            from ltcl_fused import ext
            ext.load()
            fn = (lambda x: lf.supcon(x, y, temperature=TAU, backend="cpu")) if loss == "supcon" else \
                (lambda x: lf.afcl(x, y, gamma=GAMMA, eta=ETA, temperature=TAU, backend="cpu"))
        else:
            fn = (lambda x: dense_supcon(x, y)) if loss == "supcon" else (lambda x: dense_afcl(x, y))

        def run():
            x = X0.clone().requires_grad_(True)
            fn(x).backward()
    times = []
    for k in range(repeats + (1 if spec["warmup"] else 0)):
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
        raise RuntimeError(f"{spec}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="N=2048 timings only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_engine.csv"))
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    D = 128
    timing_N = 2048 if args.quick else 8192
    rows = []

    def record(loss, N, provider, repeats, warmup=True):
        res = _spawn(dict(N=N, D=D, provider=provider, loss=loss, repeats=repeats, warmup=warmup))
        row = dict(loss=loss, N=N, D=D, provider=provider, median_s=round(res["median_s"], 4),
                   peak_rss_mb=round(res["peak_rss_mb"], 1), threads=res["threads"],
                   times=" ".join(f"{t:.4f}" for t in res["times"]))
        rows.append(row)
        print(f"{loss:7s} N={N:6d} {provider:6s} median {row['median_s']:.3f} s  peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
        return row

    gemm = record("gemm4", timing_N, "gemm4", args.repeats)
    for loss in ("supcon", "afcl"):
        dense = record(loss, timing_N, "dense", args.repeats)
        cpu = record(loss, timing_N, "cpu", args.repeats)
        cpu["speedup_vs_dense"] = round(dense["median_s"] / cpu["median_s"], 2)
        cpu["ratio_vs_gemm4"] = round(cpu["median_s"] / gemm["median_s"], 2)
    if not args.quick:
        for N in (32768, 65536):
            for loss in ("supcon", "afcl"):
                record(loss, N, "cpu", 1, warmup=False)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fields = ["loss", "N", "D", "provider", "median_s", "speedup_vs_dense", "ratio_vs_gemm4", "peak_rss_mb",
              "threads", "times"]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    print(f"wrote {args.out}")
    for r in rows:
        if "speedup_vs_dense" in r:
            print(f"{r['loss']}: {r['speedup_vs_dense']}x faster than dense, {r['ratio_vs_gemm4']}x the 4-GEMM time")


if __name__ == "__main__":
    main()
