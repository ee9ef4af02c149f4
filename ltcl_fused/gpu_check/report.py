"""The outputs: ``gpu_check.json`` (everything), ``gpu_check.csv`` (one row per case), ``summary.md`` (a
person's one-page read) and plots (matplotlib when importable). The exit code is 1 when any correctness,
large-index, behaviour or build case failed (``FAILED``), else 0.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Dict, List

from .cases import BACKENDS, LOSSES

FAILED = ("fail", "error", "crash", "timeout", "oom")
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
    """``gemm_ms`` and ``x_gemm = total_ms / gemm_ms`` of every ok timing row, from the torch.mm row of its (dtype, N)."""
    gemm = {(r["dtype"], r["N"]): r["total_ms"] for r in rows
            if r.get("section") == "timing" and r.get("kind") == "gemm" and r.get("status") == "ok"}
    for r in rows:
        if r.get("section") == "timing" and r.get("kind") == "step" and r.get("status") == "ok":
            g = gemm.get((r["dtype"], r["N"]))
            if g:
                r["gemm_ms"], r["x_gemm"] = g, r["total_ms"] / g


def _machine(meta: dict) -> str:
    if meta.get("device") == "cuda":
        return f"{meta.get('gpu', '?')} (sm_{meta.get('capability', '?').replace('.', '')})"
    return f"{meta.get('cpu', 'cpu')} (dry run)"


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
    m = dict(machine=_machine(meta), **{k: meta.get(k, "") for k in META_FIELDS if k != "machine"})
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
        f.write(summary_md(meta, rows, failures, prof))
    return code


# ---------------------------------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------------------------------
def header_text(meta: dict) -> str:
    lines = [f"  machine: {_machine(meta)}" + (f", {meta.get('gpu_memory_gib')} GiB, {meta.get('sm_count')} SMs, "
                                               f"driver {meta.get('driver') or '?'}" if meta.get("device") == "cuda" else ""),
             f"  python {meta.get('python')} | torch {meta.get('torch')}"
             + (f" (CUDA {meta['torch_cuda']})" if meta.get("torch_cuda") else "")
             + f" | triton {meta.get('triton')} | numpy {meta.get('numpy')} | ltcl_fused {meta.get('ltcl_fused')}"
             + (f" (git {meta['git']})" if meta.get("git") else "")]
    if meta.get("device") == "cuda":
        lines.append(f"  CUDA toolkit: {meta.get('cuda_home') or 'none'}"
                     + (f" (nvcc {meta['nvcc']})" if meta.get("nvcc") else "")
                     + (f"; {meta['cuda_home_note']}" if meta.get("cuda_home_note") else ""))
    for b, why in meta.get("backends", {}).items():
        lines.append(f"  backend {b}: {'can be tried' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def _cell(rows: List[dict]) -> str:
    if not rows:
        return "—"
    st = [r["status"] for r in rows]
    ran = [s for s in st if s in ("pass",) + FAILED]
    bad = sum(s in FAILED for s in st)
    if not ran:
        first = st[0]
        return first if all(s == first for s in st) else "/".join(sorted(set(st)))
    text = f"{len(ran) - bad}/{len(ran)}" + (" ✗" if bad else "")
    rest = len(st) - len(ran)
    return text + (f" (+{rest} {'/'.join(sorted(set(s for s in st if s not in ran)))})" if rest else "")


def _brief(r: dict) -> str:
    """A status with its reason, except where the reason is said elsewhere (an unavailable backend)."""
    quiet = ("unavailable", "not_run", "skipped", "pass", "ok")
    return r["status"] + (f": {r['reason'][:100]}" if r.get("reason") and r["status"] not in quiet else "")


def _ratio(e, b):
    return e / b if isinstance(e, (int, float)) and isinstance(b, (int, float)) and b and math.isfinite(b) else None


def _ms(v) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else "—"


def largest_n(rows: List[dict]) -> dict:
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


def summary_md(meta: dict, rows: List[dict], failures: List[dict], prof) -> str:
    dry = meta.get("mode") == "dry"
    sec = defaultdict(list)
    for r in rows:
        sec[r.get("section")].append(r)
    verdict = "PASS" if not failures and meta.get("status") == "ok" else f"FAIL ({len(failures)} failed)"
    L = [f"# ltcl_fused GPU check: {verdict}" + (" — dry run (CPU tensors, Triton interpreter)" if dry else ""), ""]
    L.append(f"`{meta.get('argv', 'python -m ltcl_fused.gpu_check')}` on {meta.get('date', '?')}: "
             f"{meta.get('wall_s', '?')} s of a {meta.get('budget_s', '?'):.0f} s budget. Exit code {meta.get('exit_code')}: "
             "non-zero when a correctness, large-index, behaviour or build case failed.")
    L += ["", "## Machine and versions", "", "| | |", "|---|---|"]
    L.append(f"| device | {_machine(meta)}" + (f", {meta.get('gpu_memory_gib')} GiB, {meta.get('sm_count')} SMs, driver "
                                              f"{meta.get('driver') or '?'}" if not dry else "") + " |")
    L.append(f"| torch | {meta.get('torch')}" + (f" (CUDA {meta['torch_cuda']})" if meta.get("torch_cuda") else "") + " |")
    for k in ("triton", "python", "numpy"):
        L.append(f"| {k} | {meta.get(k)} |")
    L.append(f"| ltcl_fused | {meta.get('ltcl_fused')}" + (f" (git {meta['git']})" if meta.get("git") else "") + " |")
    if not dry:
        L.append(f"| CUDA toolkit | {meta.get('cuda_home') or 'none'} {('(nvcc ' + meta['nvcc'] + ')') if meta.get('nvcc') else ''}"
                 f" {meta.get('cuda_home_note', '')} |")
        if meta.get("build_env"):
            L.append(f"| extension build | {', '.join(f'{k}={v}' for k, v in meta['build_env'].items())} |")
    L.append(f"| fp32 matmul | torch.get_float32_matmul_precision() = {meta.get('float32_matmul_precision')}, "
             f"LTCL_TRITON_TF32={meta.get('LTCL_TRITON_TF32') or 'unset'} |")
    L.append(f"| CPU | {meta.get('cpu')} × {meta.get('cpu_count')} |")
    if not meta.get("status") == "ok":
        L += ["", f"**The probe failed**: {meta.get('status')}: {meta.get('reason', '')}", ""]
        return "\n".join(L) + "\n"

    L += ["", "## Backends", "", "| backend | status |", "|---|---|"]
    build = next((r for r in sec["build"]), {})
    for b in BACKENDS:
        why = meta.get("backends", {}).get(b)
        if b == "cuda" and why is None:
            why = None if build.get("status") == "ok" else f"extension build {build.get('status')}: {build.get('reason', '')}"
            text = f"extension built in {build.get('wall_s')} s" if why is None else why
        else:
            text = "available" if why is None else f"unavailable: {why}"
        L.append(f"| {b} | {text} |")

    corr = sec["correctness"]
    L += ["", "## Correctness: values and gradients against `backend=\"reference\"`", "",
          f"Inputs: two views of B samples (N = 2B anchors ∈ {{{', '.join(str(2 * b) for b in prof.batches)}}}), "
          f"D ∈ {{{', '.join(map(str, prof.dims))}}}, reduction='none'. fp64: max error ≤ 1e-9 × max |truth|. "
          "fp32/bf16/fp16: error vs the fp64 truth ≤ 2 × the same-dtype dense reference's error + 8 eps. Every case "
          "runs twice: bit-identical results required. Cells: passed/run (✗: failures; + not run: unavailable, "
          "unsupported, not_run).", "", "| loss | " + " | ".join(BACKENDS) + " |", "|---|" + "---|" * len(BACKENDS)]
    for loss in LOSSES:
        cells = [_cell([r for r in corr if r.get("loss") == loss and r.get("backend") == b and r.get("kind") == "loss"])
                 for b in BACKENDS]
        if any(c != "—" for c in cells):
            L.append(f"| {loss} | " + " | ".join(cells) + " |")
    cfg = [r for r in corr if r.get("kind") == "configs"]
    if cfg:
        L.append("| chunked- vs single-D (FORCE_CONFIG) | " + " | ".join(
            _cell([r for r in cfg if r.get("backend") == b]) for b in BACKENDS) + " |")
    other = [r for r in corr if r.get("kind") not in ("loss", "configs")]
    if other:
        L.append("| other (test hook) | " + " | ".join(_cell([r for r in other if r.get("backend") == b])
                                                      for b in BACKENDS) + " |")
    dts = OrderedDict()
    for r in corr:
        if r.get("status") == "pass" or r.get("status") == "fail":
            d = dts.setdefault(r.get("dtype"), dict(n=0, loss=0.0, grad=0.0))
            d["n"] += 1
            for k in ("loss", "grad"):
                q = _ratio(r.get(f"e_{k}"), r.get(f"bound_{k}"))
                if q is not None:
                    d[k] = max(d[k], q)
    if dts:
        L += ["", "Worst error as a fraction of its bound (1.0 = at the bound):", "",
              "| dtype | cases | loss | gradient |", "|---|---|---|---|"]
        for dt, d in dts.items():
            L.append(f"| {dt} | {d['n']} | {d['loss']:.2g} | {d['grad']:.2g} |")
    if failures:
        L += ["", f"### Failures ({len(failures)})", ""]
        for r in failures[:40]:
            where = f" ({r['where']})" if r.get("where") else ""
            L.append(f"- `{r['id']}`: {r['status']}: {r.get('reason', '')}{where}")
        if len(failures) > 40:
            L.append(f"- … {len(failures) - 40} more in gpu_check.csv")

    big = sec["large"]
    if big:
        L += ["", "## Large index (N·D > 2³¹ elements in the keys)", "",
              "| backend | check | status | N·D | > 2³¹ | error | bound | detail |", "|---|---|---|---|---|---|---|---|"]
        for r in big:
            e = max([v for v in (r.get("e_loss"), r.get("e_grad")) if isinstance(v, (int, float))], default=None)
            detail = _brief(r)[len(r["status"]) + 2:]
            if r.get("kind") == "large_mining" and r.get("status") == "pass":
                detail = f"max key row {r.get('max_key_row')}, {r.get('rows_past_2e31')} picks past element 2³¹"
            L.append(f"| {r.get('backend')} | {r['kind'][6:]} | {r['status']} | {r.get('n_times_d', '')} | "
                     f"{r.get('exceeds_int32', '')} | {_ms(e)} | {_ms(r.get('bound_loss'))} | {detail} |")

    beh = sec["behaviour"]
    if beh:
        L += ["", "## Streams, CUDA graphs, torch.compile", "", "| check | loss | " + " | ".join(BACKENDS) + " |",
              "|---|---|" + "---|" * len(BACKENDS)]
        for kind in ("stream", "graph", "compile"):
            for loss in sorted({r["loss"] for r in beh if r["kind"] == kind}):
                cells = []
                for b in BACKENDS:
                    rr = [r for r in beh if r["kind"] == kind and r["loss"] == loss and r.get("backend") == b]
                    cells.append(" ".join(_brief(r) for r in rr) or "—")
                L.append(f"| {kind} | {loss} | " + " | ".join(cells) + " |")
        notes = sorted({r.get("note") for r in beh if r.get("note")})
        if notes:
            L += [""] + [f"Note: {n}." for n in notes]
        syn = [r for r in beh if r["kind"] == "syncs"]
        if syn:
            L += ["", "### Host syncs per training step (torch.cuda.set_sync_debug_mode('warn'))", "",
                  "Limit for triton and cuda (issue 11): ≤ 1 with check_finite=True, 0 with check_finite=False; the "
                  "torch backend is measured, not judged.", "",
                  "| loss | " + " | ".join(f"{b} (cf=T / F)" for b in BACKENDS) + " |", "|---|" + "---|" * len(BACKENDS)]
            for loss in LOSSES:
                cells = []
                for b in BACKENDS:
                    pair = []
                    for cf in (True, False):
                        r = next((r for r in syn if r["loss"] == loss and r.get("backend") == b
                                  and r["check_finite"] == cf), None)
                        if r is None:
                            pair.append("—")
                        elif r.get("syncs") not in ("", None):
                            pair.append(f"{r['syncs']}" + (" ✗" if r["status"] == "fail" else ""))
                        else:
                            pair.append(r["status"])
                    cells.append(" / ".join(pair))
                if any(c != "— / —" for c in cells):
                    L.append(f"| {loss} | " + " | ".join(cells) + " |")

    tim = sec["timing"]
    if tim:
        L += ["", f"## Timing: forward+backward at D = {prof.timing_D} ({'CUDA events' if not dry else 'perf_counter'}, "
              f"median of ≥ {prof.min_repeats} after a warm-up)", "",
              "Each provider as a multiple (×) of one N×N×D torch.mm in the same dtype (row-blocked: N×N is never "
              f"stored); supcon τ = 0.07; afcl γ = 2, η = 5; long-tailed labels over 100 classes; check_finite=False.", ""]
        provs = [p for p in prof.timing_providers if any(r.get("provider") == p for r in tim)]
        for dt in prof.timing_dtypes:
            rows_dt = [r for r in tim if r.get("dtype") == dt]
            if not rows_dt:
                continue
            L += [f"### {dt}", "", "| N | torch.mm ms | " + " | ".join(f"{loss} {p}" for loss in prof.timing_losses
                                                                        for p in provs) + " |",
                  "|---|---|" + "---|" * (len(provs) * len(prof.timing_losses))]
            for N in prof.timing_N:
                g = next((r for r in rows_dt if r["kind"] == "gemm" and r["N"] == N), {})
                cells = []
                for loss in prof.timing_losses:
                    for p in provs:
                        r = next((r for r in rows_dt if r["kind"] == "step" and r["N"] == N and r["loss"] == loss
                                  and r["provider"] == p), None)
                        if r is None:
                            cells.append("—")
                        elif r["status"] == "ok":
                            x = f" ({r['x_gemm']:.1f}×)" if isinstance(r.get("x_gemm"), float) else ""
                            mem = f", {r['peak_mem_mb']:.0f} MiB" if isinstance(r.get("peak_mem_mb"), (int, float)) else ""
                            cells.append(f"{_ms(r['total_ms'])} ms{x}{mem}")
                        else:
                            cells.append(r["status"])
                L.append(f"| {N} | {_ms(g.get('total_ms')) if g.get('status') == 'ok' else g.get('status', '—')} | "
                         + " | ".join(cells) + " |")
            L.append("")
        notes = sorted({f"{r['provider']}: {r['reason']}" for r in tim if r.get("status") not in ("ok",)
                        and r.get("reason") and r.get("status") != "skipped"})
        for n in notes[:12]:
            L.append(f"- {n}")

    lg = sec["largest"]
    if lg:
        info = largest_n(rows)
        L += ["", f"## Largest N of an afcl step (bf16, D = {prof.largest_D}, doubling N)", "",
              "| N | backend | status | ms | peak MiB |", "|---|---|---|---|---|"]
        for r in lg:
            L.append(f"| {r['N']} | {r.get('provider', '')} | {r['status']} | {_ms(r.get('total_ms'))} | "
                     f"{_ms(r.get('peak_mem_mb'))} |")
        if info:
            line = f"Largest N run: **{info['N']}** ({_ms(info.get('total_ms'))} ms per step on {info.get('provider')})."
            if info.get("bytes_per_anchor") and meta.get("gpu_memory_gib"):
                proj = meta["gpu_memory_gib"] * 2 ** 30 / info["bytes_per_anchor"]
                line += (f" Memory grows linearly, {info['bytes_per_anchor']:.0f} bytes per anchor: the memory limit "
                         f"would be near N ≈ {proj:.3g} (extrapolated; the time per step grows as N²).")
            L += ["", line]
        stops = [r for r in lg if r["status"] != "ok"]
        if stops:
            L.append(f"Stopped at N = {stops[0]['N']}: {stops[0]['status']}: {stops[0].get('reason', '')}")

    L += ["", "## Time budget", "", "| phase | ends at (s) | used (s) | cases not run |", "|---|---|---|---|"]
    secs_of = {"parallel": ("correctness", "large", "behaviour"), "timing": ("timing",), "largest": ("largest",)}
    for ph, end in (meta.get("phase_deadline_s") or {}).items():
        nr = sum(1 for r in rows if r.get("section") in secs_of.get(ph, ()) and r.get("status") in ("not_run", "timeout"))
        L.append(f"| {ph} | {end} | {meta.get('phase_s', {}).get(ph, '—')} | {nr} |")
    L += ["", "## Files", "", "- `gpu_check.json`: every case with its parameters and results; `gpu_check.csv`: one row per case",
          "- `logs/`: one log per worker group, `ext_build.log` (the CUDA extension build)"]
    for p in meta.get("plots", []):
        L.append(f"- `{p}`")
    if meta.get("plot_note"):
        L.append(f"- plots: {meta['plot_note']}")
    return "\n".join(L) + "\n"


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
