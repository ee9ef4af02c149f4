"""The worker process: runs one group's cases in order and appends one JSON line per case to its results file.

``python -m ltcl_fused.gpu_check --worker SPEC.json`` (started by ``runner.py``). A case that raises is
recorded with its exception's first line and its traceback's last line, and the next case runs. After a
failing case on the GPU the worker checks that the CUDA context still works; if not, it writes a
``{"_restart": reason}`` line and exits with code 3, and the runner starts a fresh worker for the cases
left (a worker that dies outright costs the case it was running: recorded as ``crash``).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Optional

from . import behaviour, correctness, machine, timing
from .cases import BACKENDS
from .device import is_oom, last_line, make_runtime

RESTART_EXIT = 3
PROGRESS, RESULT = "gpu_check: running ", "gpu_check:   -> "  # the worker's progress lines in its log
# operations a backend documents as not implemented: the error it raises contains this text
KNOWN_GAPS = {("cuda", "bayesian_cl"): "Bayesian ranks on CUDA"}


def _crash(case, rt, ctx):  # the hidden --inject-failure hook: a worker that dies without a word
    sys.stdout.flush()
    os.abort()


KINDS = {
    "probe": lambda case, rt, ctx: machine.probe(rt, case),
    "loss": correctness.run_loss_case,
    "configs": correctness.run_configs_case,
    "large_supcon": correctness.run_large_supcon,
    "large_mining": correctness.run_large_mining,
    "stream": behaviour.run_stream,
    "graph": behaviour.run_graph,
    "compile": behaviour.run_compile,
    "syncs": behaviour.run_syncs,
    "gemm": timing.run_gemm,
    "step": timing.run_step,
    "largest": timing.run_largest,
    "crash": _crash,
}


def wait_for_build(ctx: dict) -> dict:
    """The CUDA extension build's status file written by the runner; waits while the build runs."""
    path = ctx.get("build_file")
    while True:
        try:
            with open(path) as f:
                st = json.load(f)
        except (OSError, ValueError, TypeError):
            st = {"status": "running"}
        if st.get("status") != "running":
            return st
        if time.monotonic() > ctx["deadline"] - 5:
            return {"status": "not_run", "reason": "the CUDA extension build had not finished within the budget"}
        time.sleep(1.0)


def backend_unavailable(backend: str, rt, ctx: dict) -> Optional[str]:
    """None when ``backend`` can run on this worker's device, else one line saying why (cached per worker)."""
    cache = ctx.setdefault("available", {})
    if backend not in cache:
        reason = None
        if backend == "cuda":
            st = wait_for_build(ctx)
            if st.get("status") != "ok":
                reason = st.get("reason") or f"CUDA extension build: {st.get('status')}"
        if reason is None and backend in BACKENDS:
            from ltcl_fused.backends import get_engine
            reason = get_engine(backend).unavailable_reason(rt.device)
        cache[backend] = reason
    return cache[backend]


def _error_fields(e: BaseException) -> dict:
    msg = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    tb = traceback.extract_tb(e.__traceback__)
    ours = [fr for fr in tb if "ltcl_fused" in fr.filename or "triton_kernels" in fr.filename]
    fr = (ours or tb or [None])[-1]
    return dict(reason=f"{type(e).__name__}: {msg[0] if msg else ''}"[:300],
                traceback_last=last_line(traceback.format_exc()),
                where=f"{os.path.basename(fr.filename)}:{fr.lineno} in {fr.name}" if fr else "")


def run_case(case: dict, rt, ctx: dict) -> dict:
    from ltcl_fused.backends import BackendUnavailable
    b = case.get("backend") or (case.get("provider") if case.get("provider") in BACKENDS else None)
    if b:
        reason = backend_unavailable(b, rt, ctx)
        if reason is not None:
            return dict(status="unavailable", reason=reason)
    try:
        return KINDS[case["kind"]](case, rt, ctx)
    except (NotImplementedError, BackendUnavailable) as e:
        return dict(status="unavailable", **_error_fields(e))
    except Exception as e:  # noqa: BLE001 - every failure is a result
        fields = _error_fields(e)
        gap = KNOWN_GAPS.get((b, case.get("loss")))
        if gap and gap in str(e):
            return dict(status="unsupported", **fields)
        traceback.print_exc()
        return dict(status="oom" if is_oom(e) else "error", **fields)


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    rt = make_runtime(spec["device"])
    ctx = dict(deadline=time.monotonic() + (float(spec["deadline"]) - time.time()), build_file=spec.get("build_file"))
    with open(spec["results"], "a") as out:
        def write(obj):
            out.write(json.dumps(obj, default=str) + "\n")
            out.flush()

        for case in spec["cases"]:
            left = ctx["deadline"] - time.monotonic()
            if left < float(case.get("min_left_s", 1.0)):
                write(dict(id=case["id"], status="not_run", reason=f"time budget of this section used up "
                                                                   f"({max(0.0, left):.0f} s left)"))
                continue
            t0 = time.monotonic()
            print(f"{PROGRESS}{case['id']} ({time.strftime('%H:%M:%S')})", flush=True)
            res = run_case(case, rt, ctx)
            res = dict(id=case["id"], **res, wall_s=round(time.monotonic() - t0, 3))
            write(res)
            print(f"{RESULT}{res['status']} {res.get('reason', '')[:200]}", flush=True)
            if res["status"] in ("error", "fail", "oom"):
                bad = rt.health()
                if bad is not None:
                    write({"_restart": bad})
                    return RESTART_EXIT
    return 0
