"""The suite's one rule for low-precision results (DESIGN.md "Numerics").

A fp32 / fp16 / bf16 result is never compared with another low-precision result at a fixed tolerance.
It is compared with the fp64 *truth*: the reference evaluated in float64 on the same inputs, upcast
(exactly: every fp32/fp16/bf16 value is a float64 value). The tolerance comes from the dense reference's
own error in the low dtype, measured on the same inputs in the same test:

    err(x) = max |x - truth|                       (max over the output's elements, computed in float64)
    scale  = max(max |truth|, floor)               (floor: 1 for values, 0 for gradients; 1 if truth == 0)
    pass  <=>  err(fused) <= K * err(reference) + SLACK(dtype) * scale

for the value and for every gradient, each on its own. ``check`` runs the three evaluations (fused on the
low-precision inputs, reference on the same inputs, reference on the upcast inputs), differentiates
``sum(w * out)`` with fixed weights ``w`` (exact in every dtype) for the gradients, and asserts the rule;
``assert_within`` asserts it for one output when the test has computed the three tensors itself.

The constants, chosen once for the whole suite from its own measurements (``LTCL_TRUTH_LOG``, below: the
2,258 value/gradient checks of 377 test cases, run on a 2-core AMD EPYC with AVX-512):

``K = 4``. The fused engines and the dense reference round differently (blocked online LSE vs one dense
logsumexp, other GEMM blockings, MKL's Intel and AMD code paths), so neither error is a fixed fraction
of the other. Where err(reference) is above the slack (94 checks), err(fused)/err(reference) had a
median of 0.6 and a maximum of 1.14 in fp32 and 2.07 in bf16 (a Triton MTTV gradient); flash-attention
uses 2 for the same comparison. 4 leaves a factor 2 over the worst measured ratio, and in fp32 it is far
below the size of a real bug: a coefficient off by 1e-3 relative or a dropped column moves a result by
1e-4..1e-2 relative, 100-10,000 times err(reference).

``SLACK = 64 fp32 ulps (+ 1 ulp of a 16-bit output dtype)``, relative to ``scale``. It covers the case the
factor cannot: a reference that happens to land (almost) on the truth, e.g. a single loss value whose
rounding errors cancel, or exact small-integer inputs (ties tests) where err(reference) is 0 or 1 ulp.
Every engine accumulates in fp32 whatever the input dtype (DESIGN.md); in the 21 checks where K x
err(reference) alone was below err(fused), err(fused) was at most 9.2 fp32 ulps of ``scale``. A result
stored in bf16/fp16 adds one rounding to that dtype (at most half an ulp of ``scale``). 64 · 2^-23 =
7.6e-6 relative: a 1e-3 relative bug is 130 times above it.

What the rule can see: in fp32, bugs of 1e-4 relative and up. In bf16/fp16 the yardstick is the 16-bit
reference's error, a few 16-bit ulps: those checks catch gross bugs only (measured: a gradient scaled by
1.03 fails the fp16 checks, by 1.1 some of the bf16 ones); the fp32 checks of the same kernels carry the
precision.

Non-finite entries: where the truth is non-finite (an empty row's lse = -inf, the released MTTV code's
NaN), the fused result must hold the same value. Where the truth is finite, the fused result may be
±inf only where the same-dtype reference is the same ±inf (the dtype's range, e.g. exp overflow in fp32),
never NaN. Errors are taken over the entries where both sides are finite. Integer outputs (indices) must
equal the truth's or the same-dtype reference's entry, entry by entry.

Set ``LTCL_TRUTH_LOG=/some/file`` to append one JSON line per check (errors, scale, dtype): the data the
constants above were chosen from.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import torch

K = 4.0
SLACK_FP32_ULPS = 64
_EPS32 = torch.finfo(torch.float32).eps
_HALF = (torch.float16, torch.bfloat16)
_LOW = (torch.float32,) + _HALF


def slack(dtype: torch.dtype) -> float:
    """The relative slack of a result stored in ``dtype`` (module docstring)."""
    return SLACK_FP32_ULPS * _EPS32 + (torch.finfo(dtype).eps if dtype in _HALF else 0.0)


def weights(shape, dtype, device=None) -> torch.Tensor:
    """Fixed backward weights ``1 + ((37 i) mod 128) / 128``: exact in bf16, fp16, fp32 and fp64, in a
    scrambled order (a gradient that mixes up rows is caught), 1 for a scalar."""
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, device=device, dtype=torch.float64)
    return (1.0 + torch.remainder(37.0 * i, 128.0) / 128.0).reshape(shape).to(dtype)


def _cls(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 +inf, 2 -inf, 3 nan."""
    c = torch.zeros(t.shape, dtype=torch.int8)
    c[torch.isposinf(t)] = 1
    c[torch.isneginf(t)] = 2
    c[torch.isnan(t)] = 3
    return c


def _log(rec: dict) -> None:
    path = os.environ.get("LTCL_TRUTH_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def assert_within(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, *, what: str = "result",
                  dtype: Optional[torch.dtype] = None, k: float = K, floor: float = 0.0) -> dict:
    """Assert the rule for one output: ``got`` (fused, low precision), ``ref`` (same-dtype dense reference),
    ``truth`` (fp64). ``dtype`` (default ``got.dtype``) sets the slack; ``scale`` is at least ``floor``
    (and 1 when the truth is identically 0). Returns the errors."""
    assert got.shape == truth.shape and ref.shape == truth.shape, \
        f"{what}: shapes fused {tuple(got.shape)}, reference {tuple(ref.shape)}, truth {tuple(truth.shape)}"
    dtype = dtype or got.dtype
    if not got.dtype.is_floating_point:  # indices: each entry is the truth's or the same-dtype reference's
        bad = (got.cpu() != truth.cpu()) & (got.cpu() != ref.cpu())
        assert not bad.any(), f"{what}: {int(bad.sum())} entries differ from both the truth and the reference"
        return {"what": what}
    g, r, t = (x.detach().cpu().double() for x in (got, ref, truth))
    cg, cr, ct = _cls(g), _cls(r), _cls(t)
    wrong = ((ct != 0) & (cg != ct)) | ((ct == 0) & (cg != 0) & ((cg != cr) | (cg == 3)))
    assert not wrong.any(), (f"{what}: non-finite entries differ from the truth at {int(wrong.sum())} places, e.g. "
                             f"fused {g[wrong][:4].tolist()} truth {t[wrong][:4].tolist()} "
                             f"reference {r[wrong][:4].tolist()}")
    fg, fr = (cg == 0) & (ct == 0), (cr == 0) & (ct == 0)
    err_got = float((g - t)[fg].abs().max()) if fg.any() else 0.0
    err_ref = float((r - t)[fr].abs().max()) if fr.any() else 0.0
    both = fg & fr
    diff = float((g - r)[both].abs().max()) if both.any() else 0.0
    scale = max(float(t[ct == 0].abs().max()) if (ct == 0).any() else 0.0, floor) or 1.0
    s = slack(dtype)
    bound = k * err_ref + s * scale
    rec = {"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "what": what, "dtype": str(dtype),
           "err_fused": err_got, "err_ref": err_ref, "diff": diff, "scale": scale, "bound": bound}
    _log(rec)
    assert err_got <= bound, (
        f"{what} ({dtype}): error vs the fp64 truth {err_got:.3e} > bound {bound:.3e} = {k:g} x reference "
        f"error {err_ref:.3e} + {s:.2e} x scale {scale:.3e} (fused - reference: {diff:.3e})")
    return rec


def _flat(out) -> list:
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    return list(out)


def _evaluate(fn, inputs, cast, grad):
    xs = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = cast(x).detach().clone()
            if grad is True or (grad and i in grad):
                x.requires_grad_(True)
        xs.append(x)
    outs = _flat(fn(*xs))
    leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = []
    if leaves:
        terms = [(o * weights(o.shape, o.dtype, o.device)).sum() for o in outs
                 if isinstance(o, torch.Tensor) and o.requires_grad]
        assert terms, "no output depends on the differentiated inputs"
        gs = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
        grads = list(gs)
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], grads, \
        [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and x.requires_grad]


def check(fused: Callable, reference: Callable, inputs: Sequence, *, grad=True, what: str = "",
          ref_dtype: Optional[torch.dtype] = None, k: float = K, names: Optional[Sequence[str]] = None,
          value_floor: float = 1.0, grad_floor: float = 0.0):
    """Assert the rule for every output of ``fused(*inputs)`` and (``grad``) every input gradient.

    ``fused`` and ``reference`` take the same positional ``inputs`` and return a tensor or a (named) tuple
    of tensors. Floating tensors in ``inputs`` are the low-precision inputs (fp32/fp16/bf16, mixed dtypes
    allowed); anything else is passed unchanged. ``grad``: True (every floating input), False, or the
    indices of the inputs to differentiate. ``ref_dtype``: measure the reference's error with the floating
    inputs cast to this dtype (e.g. float32 for 16-bit inputs, when the claim under test is fp32
    accumulation: a stricter bound than the 16-bit reference's). ``value_floor``: the least ``scale`` of an
    output (1: losses and row statistics are O(1) log-domain quantities whose fp32 error stays absolute
    near 0, e.g. ``-log(r)`` with ``r`` one ulp below 1; pass 0 for outputs that are gradients, such as an
    engine backward's dA, dC). ``grad_floor``: the same for the gradients of ``grad`` inputs (0: relative;
    a test whose gradient is identically 0 in exact arithmetic, so that fp32 returns rounding noise, says so
    with ``grad_floor=1``).
    Returns ``(fused outputs, fused grads)``.
    """
    low = [x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    assert low and all(d in _LOW for d in low), f"check() is for fp32/fp16/bf16 inputs, got {low}"
    outs, grads, gidx = _evaluate(fused, inputs, lambda x: x, grad)
    rcast = (lambda x: x) if ref_dtype is None else (lambda x: x.to(ref_dtype))
    routs, rgrads, _ = _evaluate(reference, inputs, rcast, grad)
    touts, tgrads, _ = _evaluate(reference, inputs, lambda x: x.double(), grad)
    names = list(names) if names else [f"output {i}" for i in range(len(touts))]
    pre = f"{what}: " if what else ""
    assert len(outs) == len(touts), f"{pre}{len(outs)} outputs, the reference has {len(touts)}"
    for i, (o, r, t) in enumerate(zip(outs, routs, touts)):
        if t is None:
            assert o is None, f"{pre}{names[i]}: fused returned a tensor where the reference returns None"
            continue
        if ref_dtype is not None and o.dtype.is_floating_point:
            r = r.to(o.dtype)  # the fp32 reference's result stored as the fused result is
        assert_within(o, r, t, what=f"{pre}{names[i] if len(touts) > 1 else 'value'}", k=k, floor=value_floor)
    for i, g, r, t in zip(gidx, grads, rgrads, tgrads):
        if t is None:
            continue
        assert g is not None, f"{pre}no gradient for input {i}"
        assert g.dtype == inputs[i].dtype, f"{pre}gradient of input {i} is {g.dtype}, input is {inputs[i].dtype}"
        assert_within(g, r.to(g.dtype), t, what=f"{pre}gradient of input {i}", k=k, floor=grad_floor)
    return outs, grads
