"""How a training step behaves on the device: a side stream, a CUDA graph, torch.compile, host syncs.

- stream: the step on a side stream whose inputs are written late (``rt.delayed_copy``): a kernel launched
  on another stream than the current one reads them before they exist. Must equal the default-stream result
  bit for bit (the torch backend: to ``CUBLAS_TOL``).
- graph: warm-up, capture of forward+backward (``check_finite=False``) into a CUDA graph, new inputs copied
  into the static leaves, replay: must equal an eager step on the new inputs bit for bit (torch: ``CUBLAS_TOL``).
- compile: ``torch.compile`` of a step with a Linear layer in front of the loss: loss and weight gradient
  equal the eager step's to ``COMPILE_TOL`` (the compiler may reorder the PyTorch epilogue's float ops).
- syncs: host syncs of one forward+backward after a warm-up, counted by ``rt.count_syncs``. Triton and CUDA
  must sync at most once with ``check_finite=True`` and never with ``check_finite=False`` (issue 11); the
  torch backend's count is reported, not judged.
"""
from __future__ import annotations

import torch

from . import cases as C
from .correctness import Outcome, evaluate, rel_err, same_bits

COMPILE_TOL = 1e-4
# the torch backend's matrix products are cuBLAS calls, whose algorithm may depend on the stream's workspace:
# its stream and graph results must agree to this, the fused kernels' bit for bit
CUBLAS_TOL = 1e-5
SYNC_LIMIT = {True: 1, False: 0}
JUDGED_SYNC_BACKENDS = ("triton", "cuda")


def _inputs(case, rt):
    dtype = C.DTYPES[case["dtype"]]
    x = C.cast(C.make_inputs(case["loss"], int(case["B"]), int(case["D"]), seed=int(case.get("seed", 0))), dtype,
               rt.device)
    return C.spec(case["loss"]), x


def _result(ok: bool, why: str, **extra) -> dict:
    return dict(status="pass" if ok else "fail", reason="" if ok else why, **extra)


def _agree(a: Outcome, b: Outcome, backend: str):
    """(equal enough, max relative difference, note): bitwise for the fused backends, CUBLAS_TOL for torch."""
    diff = max([rel_err(a.value, b.value)] + [rel_err(a.grads[k], b.grads[k]) for k in a.grads])
    if same_bits(a, b):
        return True, diff, ""
    if backend == "torch" and diff <= CUBLAS_TOL:
        return True, diff, f"not bit-identical (cuBLAS), max relative difference {diff:.2g}"
    return False, diff, ""


def run_stream(case: dict, rt, ctx: dict) -> dict:
    sp, x = _inputs(case, rt)
    base = evaluate(sp, x, case["backend"])
    with rt.side_stream():
        late = {k: (rt.delayed_copy(v) if v.is_floating_point() else v) for k, v in x.items()}
        side = evaluate(sp, late, case["backend"])
    rt.synchronize()
    ok, diff, note = _agree(base, side, case["backend"])
    return _result(ok, f"the side-stream result differs from the default-stream result (max relative difference "
                       f"{diff:.3g})", e_loss=diff, note=note or rt.streams_note)


def run_graph(case: dict, rt, ctx: dict) -> dict:
    sp, x = _inputs(case, rt)
    x2 = C.cast(C.make_inputs(case["loss"], int(case["B"]), int(case["D"]), seed=1), C.DTYPES[case["dtype"]],
                rt.device)
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in sp.grads else v) for k, v in x.items()}
    for k, v in x2.items():  # labels stay those of the capture; the new step gets them too
        if k not in sp.grads:
            x2[k] = leaves[k]

    def step():
        for k in sp.grads:
            leaves[k].grad = None
        out = sp.call(leaves, case["backend"], False)
        out.backward(torch.ones_like(out))
        return out

    replay = rt.capture(step)
    with torch.no_grad():
        for k in sp.grads:
            leaves[k].copy_(x2[k])
    out = replay()
    rt.synchronize()
    got = Outcome(out.detach().clone(), {k: leaves[k].grad.detach().clone() for k in sp.grads})
    want = evaluate(sp, x2, case["backend"], check_finite=False)
    ok, diff, note = _agree(got, want, case["backend"])
    return _result(ok, f"the graph replay differs from an eager step on the same inputs (max relative difference "
                       f"{diff:.3g})", e_loss=diff, note=note or rt.graph_note)


def run_compile(case: dict, rt, ctx: dict) -> dict:
    import torch._dynamo
    sp, x = _inputs(case, rt)
    D, dtype = int(case["D"]), C.DTYPES[case["dtype"]]
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D, dtype=dtype, device=rt.device)

    def step(inp):
        z = {k: (lin(v) if k in sp.grads else v) for k, v in inp.items()}
        loss = sp.call(z, case["backend"], False).sum()
        loss.backward()
        return loss.detach()

    eager = step(x)
    g_eager = lin.weight.grad.detach().clone()
    lin.weight.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=rt.compile_backend)(x)
    g_comp = lin.weight.grad.detach().clone()
    e = max(rel_err(compiled, eager), rel_err(g_comp, g_eager))
    return _result(e <= COMPILE_TOL, f"compiled step differs from eager by {e:.3g} > {COMPILE_TOL:g}",
                   e_loss=e, bound_loss=COMPILE_TOL, note=f"torch.compile(backend={rt.compile_backend!r})")


def run_syncs(case: dict, rt, ctx: dict) -> dict:
    sp, x = _inputs(case, rt)
    cf = bool(case["check_finite"])

    def step():
        return evaluate(sp, x, case["backend"], check_finite=cf)

    step()  # warm-up: compiles and first-use work are not counted
    _, n = rt.count_syncs(step)
    if n is None:
        return dict(status="skipped", reason="host syncs are counted on CUDA only (torch.cuda.set_sync_debug_mode)",
                    syncs="")
    limit = SYNC_LIMIT[cf]
    if case["backend"] not in JUDGED_SYNC_BACKENDS:
        return dict(status="measured", reason="", syncs=n, sync_limit="")
    return dict(status="pass" if n <= limit else "fail", syncs=n, sync_limit=limit,
                reason="" if n <= limit else f"{n} host syncs per step (at most {limit} with check_finite={cf})")
