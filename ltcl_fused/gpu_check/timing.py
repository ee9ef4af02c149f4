"""Forward+backward times beside one N×N×D ``torch.mm``, peak memory, and the largest N an afcl step runs at.

``gemm``: one N×N×D product ``A Aᵀ`` (A = [N, D] in the case's dtype), computed in row blocks of
``block_elems // N`` rows into one reused buffer, so N×N is never stored: the unit every provider is
reported in (``x_gemm = total_ms / gemm_ms``, filled in by the report from the gemm rows).
``step``: ``loss(...).backward()`` of one provider (triton, cuda, torch, reference), timed by ``device.measure``
(warm-up, then the median of at least ``min_repeats`` runs), ``peak_mem_mb`` = peak allocated above the inputs.
A series (provider, loss, dtype) stops growing after an OOM or error, skips an N above its provider's cap,
and skips an N whose predicted time (quadratic from the previous N) exceeds ``case_limit_s``.
``largest``: one afcl step per N, doubling, until it fails, runs out of memory or would take too long.
"""
from __future__ import annotations

import time

import torch

from . import cases as C
from .device import is_oom, measure


def _series(ctx: dict, key):
    return ctx.setdefault("series", {}).get(key)


def _record(ctx: dict, key, N: int, res: dict) -> None:
    ctx.setdefault("series", {})[key] = (N, res.get("status"), res.get("total_ms"))


def _gate(ctx: dict, key, case: dict, limit_s: float, runs: int):
    """A skip result for this case of the series, or None to run it."""
    prev = _series(ctx, key)
    N = int(case["N"])
    if case.get("cap") and N > int(case["cap"]):
        return dict(status="skipped", reason=f"N above this provider's cap of {case['cap']} (dense: O(N²) memory)")
    if prev is None:
        return None
    pN, pstatus, pms = prev
    if pstatus != "ok":
        return dict(status="skipped", reason=f"{pstatus} at N={pN}")
    pred = C.predicted_s(pN, pms, N)
    if pred * runs > limit_s:
        return dict(status="too_slow", reason=f"predicted {pred:.2f} s per step from N={pN} "
                                               f"(x{runs} runs > the {limit_s:g} s case limit)")
    return None


def run_gemm(case: dict, rt, ctx: dict) -> dict:
    N, D, dtype = int(case["N"]), int(case["D"]), C.DTYPES[case["dtype"]]
    key = ("torch.mm", case["dtype"])
    skip = _gate(ctx, key, case, float(case["case_limit_s"]), int(case["min_repeats"]) + 2)
    if skip:
        return skip
    A = torch.randn(N, D, generator=rt.generator(0), device=rt.device, dtype=torch.float32).to(dtype)
    rb = max(1, min(N, int(case["block_elems"]) // N))
    buf = torch.empty(rb, N, device=rt.device, dtype=dtype)

    def run():
        for r0 in range(0, N, rb):
            r1 = min(N, r0 + rb)
            torch.mm(A[r0:r1], A.T, out=buf[: r1 - r0])

    m = measure(rt.clock(), run, None, min_repeats=int(case["min_repeats"]), max_repeats=int(case["max_repeats"]),
                target_s=float(case["target_s"]), deadline=ctx["deadline"])
    res = dict(status="ok", repeats=m["repeats"], total_ms=m["total_ms"], fwd_ms=m["total_ms"], bwd_ms="",
               reason="fewer repeats than asked (budget)" if m["short"] else "", rows_per_block=rb)
    _record(ctx, key, N, res)
    return res


def run_step(case: dict, rt, ctx: dict) -> dict:
    N, D, dtype, prov, loss = int(case["N"]), int(case["D"]), C.DTYPES[case["dtype"]], case["provider"], case["loss"]
    key = (prov, loss, case["dtype"])
    runs = int(case["min_repeats"]) + 2
    skip = _gate(ctx, key, case, float(case["case_limit_s"]), runs)
    if skip:
        return skip
    res = dict(status="ok", reason="")
    try:
        t = C.timing_inputs(N, D, dtype, rt)
        base = rt.reset_peak()  # the peak above the inputs

        def clear():
            t["features"].grad = None

        m = measure(rt.clock(), lambda: C.timing_call(loss, prov, t), lambda out: out.backward(),
                    min_repeats=int(case["min_repeats"]), max_repeats=int(case["max_repeats"]),
                    target_s=float(case["target_s"]), deadline=ctx["deadline"], before=clear)
        peak = rt.peak_mb(base)
        res.update(repeats=m["repeats"], fwd_ms=m["fwd_ms"], bwd_ms=m["bwd_ms"], total_ms=m["total_ms"],
                   min_ms=m["min_ms"], warmup_s=round(m["warmup_s"], 3),
                   peak_mem_mb="" if peak is None else round(peak, 2))
        if m["short"]:
            res["reason"] = f"only {m['repeats']} timed repeats (budget)"
    except Exception as e:  # noqa: BLE001 - OOM is a result here, not a crash
        if not is_oom(e):
            raise
        res = dict(status="oom", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}")
    finally:
        t = None
        rt.empty_cache()
    _record(ctx, key, N, res)
    return res


def run_largest(case: dict, rt, ctx: dict) -> dict:
    """One afcl step (bf16) at this N on the first backend of ``prefer`` that can run; the series stops at the
    first failure, OOM, or when this N is predicted to take longer than ``step_limit_s``."""
    from .worker import backend_unavailable
    N, D, dtype = int(case["N"]), int(case["D"]), C.DTYPES[case["dtype"]]
    prov = ctx.get("largest_backend")
    if prov is None:
        for b in case["prefer"]:
            if backend_unavailable(b, rt, ctx) is None:
                prov = ctx["largest_backend"] = b
                break
        else:
            return dict(status="unavailable", reason="no backend of " + ", ".join(case["prefer"]) + " can run")
    key = ("largest", prov)
    skip = _gate(ctx, key, case, float(case["step_limit_s"]), 1)
    if skip:
        _record(ctx, key, N, skip)
        return dict(skip, provider=prov)
    left = ctx["deadline"] - time.monotonic()
    prev = _series(ctx, key)
    if prev is not None and C.predicted_s(prev[0], prev[2], N) > left:
        res = dict(status="not_run", reason=f"predicted {C.predicted_s(prev[0], prev[2], N):.1f} s > the "
                                             f"{left:.0f} s left in the budget")
        _record(ctx, key, N, res)
        return dict(res, provider=prov)
    res = dict(status="ok", reason="", provider=prov)
    try:
        if prev is None:  # compile on a small problem first
            w = C.timing_inputs(min(N, 4096), D, dtype, rt)
            C.timing_call(case["loss"], prov, w).backward()
            del w
        base = rt.reset_peak()
        t = C.timing_inputs(N, D, dtype, rt)
        clock = rt.clock()
        e0 = clock.mark()
        C.timing_call(case["loss"], prov, t).backward()
        e1 = clock.mark()
        clock.wait()
        peak = rt.peak_mb(base)
        res.update(total_ms=clock.elapsed_ms(e0, e1), repeats=1, peak_mem_mb="" if peak is None else round(peak, 2),
                   inputs_mb=round(t["features"].numel() * t["features"].element_size() / 2 ** 20, 2))
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        res.update(status="oom", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}")
    finally:
        t = w = None
        rt.empty_cache()
    _record(ctx, key, N, res)
    return res
