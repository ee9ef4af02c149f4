"""CPU benchmark of the C++ extension (backend="cpu"): forward+backward time and peak memory.

    python benchmarks/cpu_engine.py                      # full run: N=8192 and 16384 timings, N=32768/65536 memory
    python benchmarks/cpu_engine.py --quick              # N=2048 only
    python benchmarks/cpu_engine.py --repeats 5 --no-memory --plot benchmarks/results/cpu_engine.png
                                                         # timings only: the run committed in results/

Compares, at D=128, 100 classes, fp32, forward+backward:
  * ``mm1``: ONE N x N x D matrix product, row-blocked (torch.mm of 1024-row blocks of X against Xᵀ into one
    reused 1024 x N buffer): the unit of every ``ratio_vs_mm`` in the CSV,
  * ``dense``: dense PyTorch written the way the released code does it (SupContrast ``SupConLoss`` steps
    for supcon; a transcription of Asymmetric-CL's AFCL for afcl with gamma=2, eta=5); N=8192 only (at
    16384 its N x N matrices need 8-16 GB),
  * ``gemm4``: the time MKL takes for the four N x N x D matrix products a general (C != A) recompute-based
    forward+backward performs (S = A C^T twice, G C, G^T A; outputs preallocated),
  * ``cpu``: ``ltcl_fused.supcon/afcl(..., backend="cpu")`` ("all" mode: the columns ARE the anchors, so the
    engine takes its symmetric path, docs/performance_cpu.md), and the self-supervised ``dcl`` / ``hcl``
    (two views of N/2 samples: N rows) and ``mttv`` (N rows), whose rows are their own columns too,
  * ``cpu_general``: the same call with the symmetric path switched off (``CPUEngine.symmetric_ops`` emptied
    in the worker): the engine's general path, as before the symmetric one existed.
Every (case, N) runs in a fresh subprocess, so ``peak_rss_mb`` is the whole process's peak resident
memory (VmHWM) for that case alone. Times are medians of ``--repeats`` runs after one warm-up. Every
timed run is followed by one ``mm1`` in the same process (``mm1_same_process_s``: their median), and
``ratio_vs_mm`` = median / that median: a ratio that survives the load changes of a shared machine (run it
when ``uptime`` shows a low load all the same). Output: benchmarks/results/cpu_engine.csv (plot: --plot).
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
LOSSES = ("supcon", "afcl", "dcl", "hcl", "mttv")  # timed at every N (dcl/hcl: 2 x N/2 views, mttv: N rows)
DENSE = ("supcon", "afcl")  # with a dense released-code-style provider (N = 8192 only)


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
    bm = 1024
    # (allocated only where mm1 runs: it counts in peak_rss_mb, 4 * 1024 * N bytes)
    S1 = torch.empty(min(bm, N), N) if provider == "mm1" or spec["paired_mm"] else None

    def mm1():  # one N x N x D product, row-blocked into a reused buffer: the unit of ratio_vs_mm
        for r in range(0, N, bm):
            torch.mm(X0[r:r + bm], X0.T, out=S1[:min(bm, N - r)])

    if provider == "mm1":
        run = mm1
    elif provider == "gemm4":
        S = torch.empty(N, N)
        out = torch.empty(N, D)

        def run():
            torch.mm(X0, X0.T, out=S)
            torch.mm(X0, X0.T, out=S)
            torch.mm(S, X0, out=out)
            torch.mm(S.T, X0, out=out)
    else:
        import ltcl_fused as lf
        if provider in ("cpu", "cpu_general"):
            from ltcl_fused import ext
            ext.load()
            if provider == "cpu_general":
                from ltcl_fused.backends.cpp_engine import CPUEngine
                CPUEngine.symmetric_ops = frozenset()
            h = N // 2  # the self-supervised losses: two views of N/2 samples (dcl, hcl) or N rows in pairs (mttv)
            fn = {"supcon": lambda x: lf.supcon(x, y, temperature=TAU, backend="cpu"),
                  "afcl": lambda x: lf.afcl(x, y, gamma=GAMMA, eta=ETA, temperature=TAU, backend="cpu"),
                  "dcl": lambda x: lf.dcl(x[:h], x[h:], temperature=0.5, backend="cpu"),
                  "hcl": lambda x: lf.hcl(x[:h], x[h:], temperature=0.5, beta=1.0, backend="cpu"),
                  "mttv": lambda x: lf.mttv(x, temperature=0.3, backend="cpu")}[loss]
        else:
            fn = (lambda x: dense_supcon(x, y)) if loss == "supcon" else (lambda x: dense_afcl(x, y))

        def run():
            x = X0.clone().requires_grad_(True)
            fn(x).backward()
    times, mm_times = [], []
    for k in range(repeats + (1 if spec["warmup"] else 0)):
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        if spec["paired_mm"]:  # one mm1 right after every run, in this process: a ratio robust to load changes
            t1 = time.perf_counter()
            mm1()
            dm = time.perf_counter() - t1
        if k > 0 or not spec["warmup"]:
            times.append(dt)
            if spec["paired_mm"]:
                mm_times.append(dm)
    peak_mb = _vm_hwm_mb()
    print(json.dumps(dict(median_s=statistics.median(times), times=times, peak_rss_mb=peak_mb,
                          mm_median_s=statistics.median(mm_times) if mm_times else None,
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
    ap.add_argument("--no-memory", action="store_true", help="skip the N=32768/65536 memory runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_engine.csv"))
    ap.add_argument("--plot", default=None, help="also write this PNG (ratio to one mm per provider)")
    ap.add_argument("--replot", default=None, metavar="CSV", help="only redraw --plot from this CSV")
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    if args.replot:
        with open(args.replot, newline="") as f:
            plot(list(csv.DictReader(f)), args.plot)
        return
    D = 128
    timing_Ns = (2048,) if args.quick else (8192, 16384)
    rows = []

    def record(loss, N, provider, repeats, warmup=True, paired=False):
        res = _spawn(dict(N=N, D=D, provider=provider, loss=loss, repeats=repeats, warmup=warmup,
                          paired_mm=paired))
        row = dict(loss=loss, N=N, D=D, provider=provider, median_s=round(res["median_s"], 4),
                   peak_rss_mb=round(res["peak_rss_mb"], 1), threads=res["threads"],
                   times=" ".join(f"{t:.4f}" for t in res["times"]))
        if res.get("mm_median_s"):
            row["mm1_same_process_s"] = round(res["mm_median_s"], 4)
            row["ratio_vs_mm"] = round(res["median_s"] / res["mm_median_s"], 2)
        rows.append(row)
        print(f"{loss:7s} N={N:6d} {provider:11s} median {row['median_s']:.3f} s  peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
        return row

    for N in timing_Ns:
        mm = record("-", N, "mm1", args.repeats)
        mm["ratio_vs_mm"] = 1.0
        gemm = record("-", N, "gemm4", args.repeats, paired=True)
        for loss in LOSSES:
            dense = record(loss, N, "dense", args.repeats, paired=True) if N <= 8192 and loss in DENSE else None
            for prov in ("cpu", "cpu_general"):
                r = record(loss, N, prov, args.repeats, paired=True)
                if dense is not None:
                    r["speedup_vs_dense"] = round(dense["median_s"] / r["median_s"], 2)
                r["ratio_vs_gemm4"] = round(r["median_s"] / gemm["median_s"], 2)
    if not (args.quick or args.no_memory):
        for N in (32768, 65536):
            for loss in ("supcon", "afcl"):
                record(loss, N, "cpu", 1, warmup=False)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fields = ["loss", "N", "D", "provider", "median_s", "ratio_vs_mm", "mm1_same_process_s", "speedup_vs_dense",
              "ratio_vs_gemm4", "peak_rss_mb", "threads", "times"]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    print(f"wrote {args.out}")
    for r in rows:
        if "ratio_vs_mm" in r and r["loss"] != "-":
            print(f"{r['loss']:7s} N={r['N']:6d} {r['provider']:11s} {r['ratio_vs_mm']:5.2f} x one mm")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


def plot(rows, path):
    """Bars: each provider's forward+backward time as a multiple of one N x N x D mm, per (loss, N)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot import STYLE

    keys = sorted({(r["loss"], int(r["N"])) for r in rows if r["loss"] != "-" and r.get("ratio_vs_mm") not in
                   (None, "")}, key=lambda k: (LOSSES.index(k[0]) if k[0] in LOSSES else len(LOSSES), k[1]))
    provs = ["dense", "cpu_general", "cpu"]
    colour = {"dense": STYLE["supcontrast"][0], "cpu_general": "tab:olive", "cpu": STYLE["cpu"][0]}
    label = {"dense": "dense PyTorch (released-code style)", "cpu_general": "backend='cpu', general path",
             "cpu": "backend='cpu', symmetric path"}
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(provs)
    for k, prov in enumerate(provs):
        xs, ys = [], []
        for i, key in enumerate(keys):
            v = [float(r["ratio_vs_mm"]) for r in rows if (r["loss"], int(r["N"])) == key and r["provider"] == prov]
            if v:
                xs.append(i + (k - 1) * width)
                ys.append(v[0])
        bars = ax.bar(xs, ys, width, color=colour[prov], label=label[prov])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for i, (L, N) in enumerate(keys):  # the four MKL products (gemm4) measured at this N
        g4 = [float(r["ratio_vs_mm"]) for r in rows if r["provider"] == "gemm4" and int(r["N"]) == N
              and r.get("ratio_vs_mm") not in (None, "")]
        if g4:
            ax.hlines(g4[0], i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1,
                      label="4 MKL products (gemm4)" if i == 0 else None)
    ax.set_xticks(range(len(keys)), [f"{L}\nN={N}" for L, N in keys])
    ax.set_ylabel("forward+backward time / one N x N x D mm")
    ax.set_yscale("log")
    ax.set_title(f"CPU, D=128, fp32, 100 classes, {rows[0]['threads']} threads (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
