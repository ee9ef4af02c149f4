"""``summary.md``: a person's one-page read of a gpu_check run (the JSON and CSV hold every detail).

Sections: verdict, machine and versions, backends, correctness (passed/run per backend × loss, the worst
error as a fraction of its bound per dtype, the failures), the large-index case, streams / graphs /
torch.compile, host syncs, timings as multiples of one N×N×D torch.mm, the largest N, the time budget.
"""
from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from typing import List

from .cases import BACKENDS, LOSSES

FAILED = ("fail", "error", "crash", "timeout", "oom")


def machine_line(meta: dict) -> str:
    if meta.get("device") == "cuda":
        return f"{meta.get('gpu', '?')} (sm_{meta.get('capability', '?').replace('.', '')})"
    return f"{meta.get('cpu', 'cpu')} (dry run)"


def _gpu_extra(meta: dict) -> str:
    if meta.get("device") != "cuda":
        return ""
    return f", {meta.get('gpu_memory_gib')} GiB, {meta.get('sm_count')} SMs, driver {meta.get('driver') or '?'}"


def _versions(meta: dict) -> str:
    cuda = f" (CUDA {meta['torch_cuda']})" if meta.get("torch_cuda") else ""
    git = f" (git {meta['git']})" if meta.get("git") else ""
    return (f"python {meta.get('python')} | torch {meta.get('torch')}{cuda} | triton {meta.get('triton')} | "
            f"numpy {meta.get('numpy')} | ltcl_fused {meta.get('ltcl_fused')}{git}")


def header_text(meta: dict) -> str:
    """What the runner prints first: the machine, the versions and which backends can be tried."""
    lines = [f"  machine: {machine_line(meta)}{_gpu_extra(meta)}", f"  {_versions(meta)}"]
    if meta.get("device") == "cuda":
        nvcc = f" (nvcc {meta['nvcc']})" if meta.get("nvcc") else ""
        note = f"; {meta['cuda_home_note']}" if meta.get("cuda_home_note") else ""
        lines.append(f"  CUDA toolkit: {meta.get('cuda_home') or 'none'}{nvcc}{note}")
    for b, why in meta.get("backends", {}).items():
        lines.append(f"  backend {b}: {'can be tried' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def brief(r: dict) -> str:
    """A status with its reason, except where the reason is said elsewhere (an unavailable backend)."""
    quiet = ("unavailable", "not_run", "skipped", "pass", "ok")
    return r["status"] + (f": {r['reason'][:100]}" if r.get("reason") and r["status"] not in quiet else "")


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def cell(rows: List[dict]) -> str:
    """passed/run for a set of cases (✗ when some failed), plus how many did not run and why."""
    if not rows:
        return "—"
    st = [r["status"] for r in rows]
    ran = [s for s in st if s == "pass" or s in FAILED]
    if not ran:
        return st[0] if len(set(st)) == 1 else "/".join(sorted(set(st)))
    bad = sum(s in FAILED for s in ran)
    rest = sorted(set(s for s in st if s not in ran))
    return (f"{len(ran) - bad}/{len(ran)}" + (" ✗" if bad else "")
            + (f" (+{len(st) - len(ran)} {'/'.join(rest)})" if rest else ""))


def _table(head: List[str]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _machine(meta: dict, dry: bool) -> List[str]:
    L = ["## Machine and versions", "", "| | |", "|---|---|", f"| device | {machine_line(meta)}{_gpu_extra(meta)} |",
         f"| torch | {meta.get('torch')}" + (f" (CUDA {meta['torch_cuda']})" if meta.get("torch_cuda") else "") + " |"]
    L += [f"| {k} | {meta.get(k)} |" for k in ("triton", "python", "numpy")]
    L.append(f"| ltcl_fused | {meta.get('ltcl_fused')}" + (f" (git {meta['git']})" if meta.get("git") else "") + " |")
    if not dry:
        nvcc = f"(nvcc {meta['nvcc']})" if meta.get("nvcc") else ""
        L.append(f"| CUDA toolkit | {meta.get('cuda_home') or 'none'} {nvcc} {meta.get('cuda_home_note', '')} |")
        if meta.get("build_env"):
            L.append(f"| extension build | {', '.join(f'{k}={v}' for k, v in meta['build_env'].items())} |")
    L.append(f"| fp32 matmul | torch.get_float32_matmul_precision() = {meta.get('float32_matmul_precision')}, "
             f"LTCL_TRITON_TF32={meta.get('LTCL_TRITON_TF32') or 'unset'} |")
    L.append(f"| CPU | {meta.get('cpu')} × {meta.get('cpu_count')} |")
    return L


def _backends(meta: dict, sec) -> List[str]:
    L = ["## Backends", ""] + _table(["backend", "status"])
    build = next(iter(sec["build"]), {})
    for b in BACKENDS:
        why = meta.get("backends", {}).get(b)
        if b == "cuda" and why is None:
            ok = build.get("status") == "ok"
            text = (f"extension built in {build.get('wall_s')} s" if ok
                    else f"extension build {build.get('status')}: {build.get('reason', '')}")
        else:
            text = "available" if why is None else f"unavailable: {why}"
        L.append(f"| {b} | {text} |")
    return L


def _ratio(e, b):
    if isinstance(e, (int, float)) and isinstance(b, (int, float)) and b and math.isfinite(b):
        return e / b
    return None


def _correctness(corr: List[dict], failures: List[dict], prof) -> List[str]:
    Ns = ", ".join(str(2 * b) for b in prof.batches)
    L = ["## Correctness: values and gradients against `backend=\"reference\"`", "",
         f"Two views of B samples (N = 2B anchors ∈ {{{Ns}}}), D ∈ {{{', '.join(map(str, prof.dims))}}}, "
         "reduction='none'. fp64: max error ≤ 1e-9 × max |truth|. fp32/bf16/fp16: error vs the fp64 truth ≤ 2 × the "
         "same-dtype dense reference's error + 8 eps. Every case runs twice: the results must be bit-identical. "
         "Cells: passed/run (✗: some failed; +k: not run, and why).", ""] + _table(["loss"] + list(BACKENDS))
    for loss in LOSSES:
        cells = [cell([r for r in corr if r.get("loss") == loss and r.get("backend") == b and r.get("kind") == "loss"
                       and not r.get("perturb")]) for b in BACKENDS]
        if any(c != "—" for c in cells):
            L.append(f"| {loss} | " + " | ".join(cells) + " |")
    for title, kinds in (("chunked- vs single-D (FORCE_CONFIG)", ("configs",)), ("other (test hook)", ("crash",))):
        rr = [r for r in corr if r.get("kind") in kinds or (kinds == ("crash",) and r.get("perturb"))]
        if rr:
            L.append(f"| {title} | " + " | ".join(cell([r for r in rr if r.get("backend") == b]) for b in BACKENDS)
                     + " |")
    worst = OrderedDict()
    for r in corr:
        if r.get("status") in ("pass", "fail") and not r.get("perturb"):
            d = worst.setdefault(r.get("dtype"), dict(n=0, loss=0.0, grad=0.0))
            d["n"] += 1
            for k in ("loss", "grad"):
                q = _ratio(r.get(f"e_{k}"), r.get(f"bound_{k}"))
                d[k] = max(d[k], q) if q is not None else d[k]
    if worst:
        L += ["", "Worst error as a fraction of its bound (1.0 = at the bound):", ""]
        L += _table(["dtype", "cases", "loss", "gradient"])
        L += [f"| {dt} | {d['n']} | {d['loss']:.2g} | {d['grad']:.2g} |" for dt, d in worst.items()]
    if failures:
        L += ["", f"### Failures ({len(failures)})", ""]
        for r in failures[:40]:
            where = f" ({r['where']})" if r.get("where") else ""
            L.append(f"- `{r['id']}`: {r['status']}: {r.get('reason', '')}{where}")
        if len(failures) > 40:
            L.append(f"- … {len(failures) - 40} more in gpu_check.csv")
    return L


def _large(big: List[dict]) -> List[str]:
    L = ["## Large index (N·D > 2³¹ elements in the keys)", ""]
    L += _table(["backend", "check", "status", "N·D", "> 2³¹", "error", "bound", "detail"])
    for r in big:
        e = max([v for v in (r.get("e_loss"), r.get("e_grad")) if isinstance(v, (int, float))], default=None)
        detail = brief(r)[len(r["status"]) + 2:]
        if r.get("kind") == "large_mining" and r.get("status") == "pass":
            detail = f"max key row {r.get('max_key_row')}, {r.get('rows_past_2e31')} picks past element 2³¹"
        L.append(f"| {r.get('backend')} | {r['kind'][6:]} | {r['status']} | {r.get('n_times_d', '')} | "
                 f"{r.get('exceeds_int32', '')} | {_num(e)} | {_num(r.get('bound_loss'))} | {detail} |")
    return L


def _sync_pair(syn: List[dict], loss: str, b: str) -> str:
    out = []
    for cf in (True, False):
        r = next((r for r in syn if r["loss"] == loss and r.get("backend") == b and r["check_finite"] == cf), None)
        if r is None:
            out.append("—")
        elif r.get("syncs") not in ("", None):
            out.append(f"{r['syncs']}" + (" ✗" if r["status"] == "fail" else ""))
        else:
            out.append(r["status"])
    return " / ".join(out)


def _behaviour(beh: List[dict]) -> List[str]:
    L = ["## Streams, CUDA graphs, torch.compile", ""] + _table(["check", "loss"] + list(BACKENDS))
    for kind in ("stream", "graph", "compile"):
        for loss in sorted({r["loss"] for r in beh if r["kind"] == kind}):
            cells = [" ".join(brief(r) for r in beh if r["kind"] == kind and r["loss"] == loss
                              and r.get("backend") == b) or "—" for b in BACKENDS]
            L.append(f"| {kind} | {loss} | " + " | ".join(cells) + " |")
    notes = sorted({r.get("note") for r in beh if r.get("note")})
    L += ([""] + [f"Note: {n}." for n in notes]) if notes else []
    syn = [r for r in beh if r["kind"] == "syncs"]
    if syn:
        L += ["", "### Host syncs per training step (torch.cuda.set_sync_debug_mode('warn'))", "",
              "Limit for triton and cuda (issue 11): ≤ 1 with check_finite=True, 0 with check_finite=False; the torch "
              "backend is measured, not judged.", ""] + _table(["loss"] + [f"{b} (cf=T / F)" for b in BACKENDS])
        for loss in LOSSES:
            cells = [_sync_pair(syn, loss, b) for b in BACKENDS]
            if any(c != "— / —" for c in cells):
                L.append(f"| {loss} | " + " | ".join(cells) + " |")
    return L


def _step_cell(r) -> str:
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    x = f" ({r['x_gemm']:.1f}×)" if isinstance(r.get("x_gemm"), float) else ""
    mem = f", {r['peak_mem_mb']:.0f} MiB" if isinstance(r.get("peak_mem_mb"), (int, float)) else ""
    return f"{_num(r['total_ms'])} ms{x}{mem}"


def _timing(tim: List[dict], prof, dry: bool) -> List[str]:
    clock = "perf_counter" if dry else "CUDA events"
    L = [f"## Timing: forward+backward at D = {prof.timing_D} ({clock}, median of ≥ {prof.min_repeats} after a "
         "warm-up)", "",
         "Each provider as a multiple (×) of one N×N×D torch.mm in the same dtype (row-blocked: N×N is never stored), "
         "and its peak memory above the inputs; supcon τ = 0.07; afcl γ = 2, η = 5; long-tailed labels over 100 "
         "classes; check_finite=False.", ""]
    provs = [p for p in prof.timing_providers if any(r.get("provider") == p for r in tim)]
    for dt in prof.timing_dtypes:
        rows = [r for r in tim if r.get("dtype") == dt]
        if not rows:
            continue
        head = ["N", "torch.mm ms"] + [f"{lo} {p}" for lo in prof.timing_losses for p in provs]
        L += [f"### {dt}", ""] + _table(head)
        for N in prof.timing_N:
            g = next((r for r in rows if r["kind"] == "gemm" and r["N"] == N), {})
            cells = [_step_cell(next((r for r in rows if r["kind"] == "step" and r["N"] == N and r["loss"] == lo
                                      and r["provider"] == p), None)) for lo in prof.timing_losses for p in provs]
            gm = _num(g.get("total_ms")) if g.get("status") == "ok" else g.get("status", "—")
            L.append(f"| {N} | {gm} | " + " | ".join(cells) + " |")
        L.append("")
    notes = sorted({f"{r['provider']} {r['loss']} {r['dtype']} N={r['N']}: {r['status']}: {r['reason']}" for r in tim
                    if r.get("status") not in ("ok", "skipped", "unavailable") and r.get("reason")})
    L += [f"- {n}" for n in notes[:12]]
    return L


def _largest(lg: List[dict], info: dict, meta: dict, prof) -> List[str]:
    L = [f"## Largest N of an afcl step (bf16, D = {prof.largest_D}, doubling N)", ""]
    L += _table(["N", "backend", "status", "ms", "peak MiB"])
    L += [f"| {r['N']} | {r.get('provider', '')} | {r['status']} | {_num(r.get('total_ms'))} | "
          f"{_num(r.get('peak_mem_mb'))} |" for r in lg]
    if info:
        line = f"Largest N run: **{info['N']}** ({_num(info.get('total_ms'))} ms per step on {info.get('provider')})."
        if info.get("bytes_per_anchor") and meta.get("gpu_memory_gib"):
            proj = meta["gpu_memory_gib"] * 2 ** 30 / info["bytes_per_anchor"]
            line += (f" Memory grows linearly, {info['bytes_per_anchor']:.0f} bytes per anchor: the memory limit would "
                     f"be near N ≈ {proj:.3g} (extrapolated; the time per step grows as N²).")
        L += ["", line]
    stops = [r for r in lg if r["status"] != "ok"]
    if stops:
        L.append(f"Stopped at N = {stops[0]['N']}: {stops[0]['status']}: {stops[0].get('reason', '')}")
    return L


def _budget(meta: dict, rows: List[dict], prof) -> List[str]:
    L = ["## Time budget", ""] + _table(["phase", "ends at (s)", "used (s)", "cases not run"])
    for ph, end in (meta.get("phase_deadline_s") or {}).items():
        nr = sum(1 for r in rows if prof.phase_of.get(r.get("section")) == ph
                 and r.get("status") in ("not_run", "timeout"))
        L.append(f"| {ph} | {end} | {meta.get('phase_s', {}).get(ph, '—')} | {nr} |")
    L += ["", "## Files", "",
          "- `gpu_check.json`: every case with its parameters and results; `gpu_check.csv`: one row per case",
          "- `logs/`: one log per worker group, `ext_build.log` (the CUDA extension build)"]
    L += [f"- `{p}`" for p in meta.get("plots", [])]
    if meta.get("plot_note"):
        L.append(f"- plots: {meta['plot_note']}")
    return L


def summary_md(meta: dict, rows: List[dict], failures: List[dict], prof, largest: dict) -> str:
    dry = meta.get("mode") == "dry"
    sec = defaultdict(list)
    for r in rows:
        sec[r.get("section")].append(r)
    verdict = "PASS" if not failures and meta.get("status") == "ok" else f"FAIL ({len(failures)} failed)"
    L = [f"# ltcl_fused GPU check: {verdict}" + (" — dry run (CPU tensors, Triton interpreter)" if dry else ""), "",
         f"`{meta.get('argv', 'python -m ltcl_fused.gpu_check')}` on {meta.get('date', '?')}: "
         f"{meta.get('wall_s', '?')} s of a {meta.get('budget_s', 0):.0f} s budget. Exit code {meta.get('exit_code')}: "
         "non-zero when a correctness, large-index, behaviour or build case failed.", ""]
    L += _machine(meta, dry)
    if meta.get("status") != "ok":
        return "\n".join(L + ["", f"**The probe failed**: {meta.get('status')}: {meta.get('reason', '')}", ""])
    parts = [_backends(meta, sec), _correctness(sec["correctness"], failures, prof)]
    parts += [_large(sec["large"])] if sec["large"] else []
    parts += [_behaviour(sec["behaviour"])] if sec["behaviour"] else []
    parts += [_timing(sec["timing"], prof, dry)] if sec["timing"] else []
    parts += [_largest(sec["largest"], largest, meta, prof)] if sec["largest"] else []
    parts += [_budget(meta, rows, prof)]
    for p in parts:
        L += [""] + p
    return "\n".join(L) + "\n"
