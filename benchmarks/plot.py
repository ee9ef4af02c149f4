"""Plots of a sweep CSV (benchmarks/sweep.py): time vs N, peak memory vs N, time / four-GEMM bound.

    python benchmarks/plot.py benchmarks/results/sweep_cpu.csv [--out benchmarks/results]

One figure per metric, one panel per (loss, D), one line per provider, log-log axes. The last N a
provider reached is followed by a marker saying why it stopped (OOM, timeout, too slow).
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

STYLE = {  # provider -> (colour, marker, label)
    "gemm4": ("black", "", "4-GEMM bound (MKL)"),
    "reference": ("tab:red", "o", "dense reference (ltcl_fused.reference)"),
    "pml": ("tab:orange", "s", "pytorch-metric-learning SupConLoss"),
    "supcontrast": ("tab:brown", "v", "SupContrast-style dense SupCon"),
    "afcl_paper": ("tab:pink", "D", "released-AFCL-style dense"),
    "torch": ("tab:blue", "^", "ltcl_fused backend='torch' (chunked)"),
    "cpu": ("tab:green", "*", "ltcl_fused backend='cpu' (C++)"),
    "triton": ("tab:purple", "P", "ltcl_fused backend='triton'"),
    "cuda": ("tab:olive", "X", "ltcl_fused backend='cuda'"),
}
STOP_LABEL = {"oom": "OOM", "timeout": "timeout", "too_slow": "too slow", "error": "error"}


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows, metric):
    """{(loss, D): {provider: ([N], [value], stop)}}; stop = (N, status) of the first failed size."""
    out = defaultdict(dict)
    for r in rows:
        key = (r["loss"], int(r["D"]))
        xs, ys, stop = out[key].get(r["provider"], ([], [], None))
        if r["status"] == "ok" and r.get(metric) not in ("", None):
            v = float(r[metric])
            if v > 0:
                xs.append(int(r["N"]))
                ys.append(v)
        elif r["status"] in STOP_LABEL and stop is None:
            stop = (int(r["N"]), r["status"])
        out[key][r["provider"]] = (xs, ys, stop)
    return out


def _figure(rows, metric, ylabel, title, fname, out_dir, with_bound):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows, metric)
    bound = {}
    if with_bound:  # the gemm4 line is drawn in every panel of its D
        for r in rows:
            if r["provider"] == "gemm4" and r["status"] == "ok":
                bound.setdefault(int(r["D"]), []).append((int(r["N"]), float(r["total_ms"])))
    # panels with at least one measured loss provider (bcl/mining may be absent from a run)
    keys = sorted(k for k, d in series.items() if k[0] != "-" and any(v[0] for pr, v in d.items() if pr != "gemm4"))
    if not keys:
        return None
    losses = sorted({k[0] for k in keys}, key=lambda s: ["supcon", "afcl", "bcl", "mining"].index(s)
                    if s in ("supcon", "afcl", "bcl", "mining") else 9)
    dims = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(losses), len(dims), figsize=(5.2 * len(dims), 3.6 * len(losses)), squeeze=False)
    meta = rows[0]
    all_n = [int(r["N"]) for r in rows if r["status"] == "ok"]
    n_range = (min(all_n), max(all_n)) if all_n else None
    for i, L in enumerate(losses):
        for j, D in enumerate(dims):
            ax = axes[i][j]
            if with_bound and D in bound:
                b = sorted(bound[D])
                ax.plot([x for x, _ in b], [y for _, y in b], color="black", ls="--", lw=1.2,
                        label=STYLE["gemm4"][2])
            for prov, (xs, ys, stop) in sorted(series.get((L, D), {}).items()):
                if prov == "gemm4":
                    continue
                col, mk, lab = STYLE.get(prov, ("gray", ".", prov))
                if xs:
                    ax.plot(xs, ys, color=col, marker=mk, ms=5, label=lab)
                    if stop is not None:
                        ax.annotate(f"{STOP_LABEL[stop[1]]} at {stop[0]}", (xs[-1], ys[-1]),
                                    textcoords="offset points", xytext=(4, -10), fontsize=7, color=col)
                        ax.plot([xs[-1]], [ys[-1]], marker="x", color=col, ms=10, mew=2)
            if (L, D) not in keys:
                ax.text(0.5, 0.5, "not measured in this run\n(see the CSV status column)", ha="center",
                        va="center", transform=ax.transAxes, fontsize=9, color="gray")
            ax.set_xscale("log", base=2)
            if n_range:
                ax.set_xlim(n_range[0] / 1.3, n_range[1] * 1.3)
            ax.set_yscale("log")
            ax.set_title(f"{L}, D={D}", fontsize=10)
            ax.set_xlabel("N (anchors = columns)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)

    fig.suptitle(f"{title}\n{meta['machine']} | {meta['device']}, {meta['threads']} threads | torch {meta['torch']} "
                 f"| {meta['date'][:10]}", fontsize=9)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=3, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 if len(losses) < 3 else 0.04, 1, 1))
    path = os.path.join(out_dir, fname)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_csv(csv_path, out_dir=None):
    rows = read(csv_path)
    out_dir = out_dir or os.path.dirname(csv_path)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    made = [
        _figure(rows, "total_ms", "forward+backward (ms)", "Time vs N (median; x = stopped: OOM / timeout / too slow)",
                f"{stem}_time.png", out_dir, with_bound=True),
        _figure(rows, "peak_mem_mb", "peak extra memory (MiB)", "Peak memory vs N",
                f"{stem}_memory.png", out_dir, with_bound=False),
        _figure(rows, "x_bound", "time / 4-GEMM bound", "Time as a multiple of the four-GEMM bound",
                f"{stem}_x_bound.png", out_dir, with_bound=False),
    ]
    return [p for p in made if p]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for p in plot_csv(a.csv, a.out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
