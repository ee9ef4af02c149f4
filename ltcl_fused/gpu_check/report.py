"""The outputs: ``gpu_check.json`` (everything), ``gpu_check.csv`` (one row per case), ``summary.md`` (a
person's one-page read) and plots (matplotlib when importable). The exit code is 1 when any correctness,
large-index, behaviour or build case failed (``FAILED``), else 0.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Dict, List

from .summary import FAILED, machine_line, summary_md

JUDGED = ("build", "correctness", "large", "behaviour")
META_FIELDS = ["date", "machine", "python", "torch", "triton", "ltcl_fused", "git", "device"]
FIELDS = ["section", "id", "status", "reason", "provider", "loss", "dtype", "D", "N", "config", "check_finite",
          "e_loss", "e_grad", "ref_e_loss", "ref_e_grad", "bound_loss", "bound_grad", "bitwise_repeat", "syncs",
          "sync_limit", "repeats", "fwd_ms", "bwd_ms", "total_ms", "gemm_ms", "x_gemm", "peak_mem_mb", "wall_s",
          "where", "traceback_last"] + META_FIELDS


def is_failure(row: dict) -> bool:
    if row.get("section") not in JUDGED or row.get("status") not in FAILED:
        return False
    return not (row["section"] == "large" and row["status"] == "oom")  # a smaller GPU, not a defect


def fill_gemm_multiples(rows: List[dict]) -> None:
    """``gemm_ms`` and ``x_gemm = total_ms / gemm_ms`` of every ok timing row, from the torch.mm row of its
    (dtype, N)."""
    gemm = {(r["dtype"], r["N"]): r["total_ms"] for r in rows
            if r.get("section") == "timing" and r.get("kind") == "gemm" and r.get("status") == "ok"}
    for r in rows:
        if r.get("section") == "timing" and r.get("kind") == "step" and r.get("status") == "ok":
            g = gemm.get((r["dtype"], r["N"]))
            if g:
                r["gemm_ms"], r["x_gemm"] = g, r["total_ms"] / g


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def write_csv(path: str, meta: dict, rows: List[dict]) -> None:
    m = dict(machine=machine_line(meta), **{k: meta.get(k, "") for k in META_FIELDS if k != "machine"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            row = dict(r, provider=r.get("provider") or r.get("backend", ""), **m)
            w.writerow({k: _fmt(row.get(k)) for k in FIELDS})


def counts(rows: List[dict]) -> Dict[str, Dict[str, int]]:
    out: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        out[r.get("section", "?")][r.get("status", "?")] += 1
    return {k: dict(v) for k, v in out.items()}


def largest_n(rows: List[dict]) -> dict:
    """The largest N whose step ran, its time and memory, and the memory per anchor (to extrapolate)."""
    ok = [r for r in rows if r.get("section") == "largest" and r.get("status") == "ok"]
    if not ok:
        return {}
    best = max(ok, key=lambda r: r["N"])
    out = dict(N=best["N"], provider=best.get("provider"), total_ms=best.get("total_ms"),
               peak_mem_mb=best.get("peak_mem_mb"))
    mem = [r for r in ok if isinstance(r.get("peak_mem_mb"), (int, float)) and r["peak_mem_mb"] > 0]
    if mem:
        top = max(mem, key=lambda r: r["N"])
        out["bytes_per_anchor"] = top["peak_mem_mb"] * 2 ** 20 / top["N"]
    return out


def write_all(out: str, meta: dict, rows: List[dict], prof) -> int:
    fill_gemm_multiples(rows)
    failures = [r for r in rows if is_failure(r)]
    code = 1 if failures or meta.get("status") != "ok" else 0
    plots, plot_note = make_plots(out, rows)
    meta = dict(meta, plots=plots, plot_note=plot_note, exit_code=code)
    summary = dict(exit_code=code, failures=len(failures), counts=counts(rows), largest=largest_n(rows))
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(_jsonable(dict(meta=meta, summary=summary, cases=rows)), f, indent=1, default=str)
    write_csv(os.path.join(out, "gpu_check.csv"), meta, rows)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_md(meta, rows, failures, prof, summary["largest"]))
    return code


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def make_plots(out: str, rows: List[dict]):
    steps = [r for r in rows if r.get("section") == "timing" and r.get("status") == "ok"]
    if not steps:
        return [], "no timing rows to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return [], f"not drawn: matplotlib is not importable ({type(e).__name__})"
    series = defaultdict(list)
    for r in steps:
        series[(r["dtype"], r["loss"], r["provider"])].append(r)
    dtypes = sorted({k[0] for k in series})
    written = []
    for name, field, ylabel, logy in (("gpu_check_time.png", "total_ms", "forward+backward (ms)", True),
                                      ("gpu_check_x_gemm.png", "x_gemm", "× one N×N×D torch.mm", False),
                                      ("gpu_check_memory.png", "peak_mem_mb", "peak memory above inputs (MiB)", True)):
        if not any(isinstance(r.get(field), (int, float)) for r in steps):
            continue
        fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
        for ax, dt in zip(axes[0], dtypes):
            for (d, loss, prov), rs in sorted(series.items()):
                pts = sorted((r["N"], r[field]) for r in rs if d == dt and isinstance(r.get(field), (int, float)))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=prov if loss == "-" else f"{loss} {prov}")
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_title(dt)
            ax.set_xlabel("N (anchors = columns)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)
    return written, ""
