"""Values and gradients of a backend against ``backend="reference"``, with the test suite's tolerance rules.

Truth is the dense reference run in float64 on the very inputs the run under test sees (cast to its
dtype, then up to float64). Errors are ``max |x − truth| / max |truth|`` over the per-anchor losses
(``reduction="none"``) and over each gradient (of their sum).
- float64: both errors at most ``TIGHT`` (1e-9).
- float32 / bfloat16 / float16: each error at most ``(1 + REL_SLACK) · e_ref + EPS_SLACK · eps(dtype)``,
  ``e_ref`` being the same-dtype dense reference's own error against the truth (the rule of
  tests/test_triton_losses.py, with a slack that also scales with ``e_ref``: at these shapes the two
  errors are of the same size and either may be the larger by chance).
Every case runs twice and the two results must be bit-identical (no atomics anywhere: deterministic).
Backends with a second kernel path (SECOND_PATH: "cuda" with LTCL_CUDA_SYMMETRIC=0, its general backward
kernels instead of the default symmetric one) run each case a third time on it, held to the same bound.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import cases as C

TIGHT = 1e-9
REL_SLACK = 1.0
EPS_SLACK = 8.0
LARGE_BOUND_EPS = 2.0  # large-index case: error <= 2 eps(bf16) (a bf16 result rounds at eps/2)
MINING_TOL = 1e-4      # large-index mining: selected similarities within this of the dense top-k


@dataclass
class Outcome:
    value: torch.Tensor
    grads: Dict[str, torch.Tensor]


def evaluate(sp: "C.LossSpec", tensors: Dict[str, torch.Tensor], backend: str, check_finite: bool = True) -> Outcome:
    """Per-anchor losses and the gradients (of their sum) of every input in ``sp.grads``, on fresh leaves."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in sp.grads else v) for k, v in tensors.items()}
    out = sp.call(leaves, backend, check_finite)
    out.backward(torch.ones_like(out))
    grads = {}
    for k in sp.grads:
        if leaves[k].grad is None:
            raise RuntimeError(f"no gradient reached `{k}`")
        grads[k] = leaves[k].grad.detach()
    return Outcome(out.detach(), grads)


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """``max |x − truth| / max |truth|`` over the finite entries of the truth; inf when a shape differs, x is
    not finite where the truth is, or x differs where the truth is not finite (±inf must match exactly)."""
    x, t = x.detach().double(), truth.detach().double().to(x.device)
    if x.shape != t.shape:
        return math.inf
    tf = torch.isfinite(t)
    same_nonfinite = (x == t) | (torch.isnan(x) & torch.isnan(t))
    if bool((tf & ~torch.isfinite(x)).any()) or bool((~tf & ~same_nonfinite).any()):
        return math.inf
    if not bool(tf.any()):
        return 0.0
    d = (x - t).abs()[tf].max()
    scale = t.abs()[tf].max().clamp(min=1e-12)
    return float(d / scale)


def bound(dtype: torch.dtype, e_ref: Optional[float]) -> float:
    if dtype == torch.float64:
        return TIGHT
    base = e_ref if e_ref is not None and math.isfinite(e_ref) else math.inf
    return (1.0 + REL_SLACK) * base + EPS_SLACK * torch.finfo(dtype).eps


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def same_bits(a: Outcome, b: Outcome) -> bool:
    pairs = [(a.value, b.value)] + [(a.grads[k], b.grads[k]) for k in a.grads]
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in pairs)


def compare(out: Outcome, truth: Outcome, dtype: torch.dtype, ref: Optional[Outcome]) -> dict:
    """Errors of ``out`` (and of the same-dtype reference ``ref``, None for fp64) against ``truth``, the bounds
    and whether both errors are within them."""
    e_loss = rel_err(out.value, truth.value)
    g_err = {k: rel_err(out.grads[k], truth.grads[k]) for k in truth.grads}
    worst = max(g_err, key=lambda k: g_err[k]) if g_err else ""
    e_grad = g_err[worst] if g_err else 0.0
    r_loss = r_grad = None
    if ref is not None:
        r_loss = rel_err(ref.value, truth.value)
        r_grad = max((rel_err(ref.grads[k], truth.grads[k]) for k in truth.grads), default=0.0)
    b_loss, b_grad = bound(dtype, r_loss), bound(dtype, r_grad)
    ok = e_loss <= b_loss and e_grad <= b_grad
    why = []
    if not e_loss <= b_loss:
        why.append(f"loss error {e_loss:.3g} > bound {b_loss:.3g}")
    if not e_grad <= b_grad:
        why.append(f"gradient of `{worst}` error {e_grad:.3g} > bound {b_grad:.3g}")
    return dict(ok=ok, e_loss=e_loss, e_grad=e_grad, ref_e_loss=r_loss, ref_e_grad=r_grad, bound_loss=b_loss,
                bound_grad=b_grad, worst_grad=worst, why="; ".join(why))


def _truth_and_ref(sp, x, dtype, rt):
    truth = evaluate(sp, C.cast(x, torch.float64, rt.device), "reference")
    ref = None if dtype == torch.float64 else evaluate(sp, x, "reference")
    return truth, ref


def _inputs(case, rt):
    dtype = C.DTYPES[case["dtype"]]
    x = C.cast(C.make_inputs(case["loss"], int(case["B"]), int(case["D"]), seed=int(case.get("seed", 0))), dtype,
               rt.device)
    return C.spec(case["loss"]), x, dtype


# backends with a second kernel path for the losses that contrast a batch with itself (SPEC.md): the environment
# variable, the value that selects that path (ltcl_fused/backends/cpp_engine.py) and what it is. Every correctness
# case of such a backend runs once more (a third time) on it and must meet the same bound: both paths get checked.
SECOND_PATH = {"cuda": ("LTCL_CUDA_SYMMETRIC", "0", "the general backward kernels")}


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_loss_case(case: dict, rt, ctx: dict) -> dict:
    """One (backend, loss, dtype, D, N) case: values and gradients vs the reference, run twice, bit-identical;
    for a backend in SECOND_PATH, once more on its second kernel path (fields ``second_*``)."""
    sp, x, dtype = _inputs(case, rt)
    truth, ref = _truth_and_ref(sp, x, dtype, rt)
    out1 = evaluate(sp, x, case["backend"])
    out2 = evaluate(sp, x, case["backend"])
    bitwise = same_bits(out1, out2)
    if case.get("perturb"):  # the hidden --inject-failure hook: a result that must fail the tolerance rule
        out1 = Outcome(out1.value * (1.0 + float(case["perturb"])), out1.grads)
    res = compare(out1, truth, dtype, ref)
    res["bitwise_repeat"] = bitwise
    why = [res.pop("why")] if not res["ok"] else []
    if not bitwise:
        why.append("two runs on the same inputs differ bitwise")
    if case["backend"] in SECOND_PATH:
        var, value, what = SECOND_PATH[case["backend"]]
        with _env(var, value):
            alt = compare(evaluate(sp, x, case["backend"]), truth, dtype, ref)
        res.update(second_path=f"{var}={value}", second_e_loss=alt["e_loss"], second_e_grad=alt["e_grad"],
                   second_ok=alt["ok"])
        if not alt["ok"]:
            why.append(f"{what} ({var}={value}): {alt['why']}")
    return _verdict(res, why)


def _verdict(res: dict, why) -> dict:
    ok = res.pop("ok") and not why
    res.update(status="pass" if ok else "fail", reason="; ".join(w for w in why if w))
    return res


def kernel_config(pair):
    from ltcl_fused.triton_kernels.configs import BlockConfig, KernelConfig
    return KernelConfig(BlockConfig(*pair[0]), BlockConfig(*pair[1]), (), 0)


def run_configs_case(case: dict, rt, ctx: dict) -> dict:
    """The same case with a chunked-D and a single-D Triton configuration forced (``ops.FORCE_CONFIG``): each
    within the tolerance rule, and their difference reported."""
    from ltcl_fused.backends import get_engine
    ops = get_engine("triton")._kernels()
    if ops is None:
        raise RuntimeError(get_engine("triton").unavailable_reason(rt.device))
    D = int(case["D"])
    cfgs = {name: kernel_config(case[name]) for name in ("chunked", "single")}
    paths = {name: (cfg.fwd.single_d(D), cfg.bwd.single_d(D)) for name, cfg in cfgs.items()}
    if paths["chunked"] != (False, False) or paths["single"] != (True, True):
        raise ValueError(f"the forced configurations do not take the intended D paths at D={D}: {paths}")
    sp, x, dtype = _inputs(case, rt)
    truth, ref = _truth_and_ref(sp, x, dtype, rt)
    outs = {}
    for name, cfg in cfgs.items():
        ops.FORCE_CONFIG = cfg
        try:
            outs[name] = evaluate(sp, x, "triton")
        finally:
            ops.FORCE_CONFIG = None
    res, why = {}, []
    for name, out in outs.items():
        r = compare(out, truth, dtype, ref)
        if not r["ok"]:
            why.append(f"{name}: {r['why']}")
        for k in ("e_loss", "e_grad"):
            res[k] = max(res.get(k, 0.0), r[k])
        res.update(ref_e_loss=r["ref_e_loss"], ref_e_grad=r["ref_e_grad"], bound_loss=r["bound_loss"],
                   bound_grad=r["bound_grad"])
    res["chunked_vs_single"] = max([rel_err(outs["chunked"].value, outs["single"].value)]
                                   + [rel_err(outs["chunked"].grads[k], outs["single"].grads[k]) for k in sp.grads])
    res["ok"] = not why
    return _verdict(res, why)


# ---------------------------------------------------------------------------------------------------------------
# the large-index case: keys with N·D > 2^31 elements, checked on sampled rows
# ---------------------------------------------------------------------------------------------------------------
def sample_rows(n: int, d: int, k: int, seed: int = 0):
    """Rows to check: both ends, the rows around element offset 2^31 (row 2^31 // d), and random rows."""
    b = (2 ** 31) // d
    rows = {0, 1, n - 2, n - 1} | {r for r in (b - 1, b, b + 1) if 0 <= r < n}
    g = torch.Generator().manual_seed(seed)
    rows |= set(torch.randint(0, n, (max(0, k - len(rows)),), generator=g).tolist())
    return sorted(r for r in rows if 0 <= r < n)


def _large_inputs(case: dict, rt, ctx: dict):
    key = ("large", case["B"], case["keys"], case["D"], case["dtype"])
    if ctx.get("large_key") != key:
        ctx.pop("large", None)
        ctx.pop("large_truth", None)
        rt.empty_cache()
        B, R, D, dt = int(case["B"]), int(case["keys"]), int(case["D"]), C.DTYPES[case["dtype"]]
        g = rt.generator(0)
        feats = F.normalize(torch.randn(B, 2, D, generator=g, device=rt.device), dim=-1).to(dt)
        keys = torch.randn(R, D, generator=g, device=rt.device, dtype=dt).mul_(1.0 / math.sqrt(D))
        labels = torch.randint(0, C.N_CLASSES, (B,), generator=g, device=rt.device)
        key_labels = torch.randint(0, C.N_CLASSES, (R,), generator=g, device=rt.device)
        ctx["large"] = dict(feats=feats, keys=keys, labels=labels, key_labels=key_labels,
                            rows=torch.tensor(sample_rows(R, D, int(case["rows"])), device=rt.device))
        ctx["large_key"] = key
    return ctx["large"]


def _large_supcon(t, backend, feats, keys):
    import ltcl_fused as lf
    return lf.supcon(feats, t["labels"], ref_features=keys, ref_labels=t["key_labels"], temperature=0.1,
                     reduction="none", backend=backend)


def run_large_supcon(case: dict, rt, ctx: dict) -> dict:
    """SupCon of 2B anchors against themselves and ``keys`` memory-bank columns (N·D > 2^31 on the GPU): loss
    values, the anchors' gradient and the keys' gradient on sampled rows (both ends, around element 2^31)
    against the dense reference in float32 on the same (upcast) inputs."""
    t = _large_inputs(case, rt, ctx)
    if "large_truth" not in ctx:
        f32 = t["feats"].float().requires_grad_(True)
        k32 = t["keys"].float().requires_grad_(True)
        loss = _large_supcon(t, "reference", f32, k32)
        loss.backward(torch.ones_like(loss))
        ctx["large_truth"] = dict(value=loss.detach(), g_feat=f32.grad.detach(), g_rows=k32.grad[t["rows"]].detach())
        del f32, k32, loss
        rt.empty_cache()
    truth = ctx["large_truth"]
    feats = t["feats"].clone().requires_grad_(True)
    keys = t["keys"].requires_grad_(True)
    try:
        loss = _large_supcon(t, case["backend"], feats, keys)
        loss.backward(torch.ones_like(loss))
        errs = dict(e_loss=rel_err(loss, truth["value"]), e_grad=max(rel_err(feats.grad, truth["g_feat"]),
                                                                     rel_err(keys.grad[t["rows"]], truth["g_rows"])))
    finally:
        keys.grad = None
        keys.requires_grad_(False)
        rt.empty_cache()
    b = LARGE_BOUND_EPS * torch.finfo(C.DTYPES[case["dtype"]]).eps
    res = dict(errs, bound_loss=b, bound_grad=b, n_times_d=C.n_dot_d(case), exceeds_int32=C.exceeds_int32(case),
               rows_checked=int(t["rows"].numel()))
    why = [f"{k} {v:.3g} > bound {b:.3g}" for k, v in errs.items() if not v <= b]
    res["ok"] = not why
    return _verdict(res, why)


def run_large_mining(case: dict, rt, ctx: dict) -> dict:
    """Hard-pair mining of the 2B anchors against all ``keys``: the selected keys are of the right class and
    their similarities are the dense top-k values (float32 similarities of the same inputs)."""
    import ltcl_fused as lf
    t = _large_inputs(case, rt, ctx)
    A = t["feats"].transpose(0, 1).reshape(-1, t["feats"].shape[-1])
    a_lab = t["labels"].repeat(2)
    kp, kn = int(case["k_pos"]), int(case["k_neg"])
    pos, neg = lf.hard_pair_mining(A, a_lab, t["keys"], t["key_labels"], k_pos=kp, k_neg=kn, backend=case["backend"])
    Af = A.float()
    chunk = max(1, (1 << 28) // max(1, A.shape[1]))
    sim = torch.cat([Af @ t["keys"][q:q + chunk].float().T for q in range(0, t["keys"].shape[0], chunk)], dim=1)
    same = a_lab[:, None] == t["key_labels"][None, :]
    want_pos = sim.masked_fill(~same, math.inf).topk(kp, dim=1, largest=False).values
    want_neg = sim.masked_fill(same, -math.inf).topk(kn, dim=1, largest=True).values
    why = []
    if pos.shape != (A.shape[0], kp) or neg.shape != (A.shape[0], kn):
        why.append(f"index shapes {tuple(pos.shape)}, {tuple(neg.shape)}")
        err = math.inf
    elif bool((pos < 0).any()) or bool((neg < 0).any()):
        why.append("a slot is -1 although every anchor has enough candidates")
        err = math.inf
    else:
        if not bool(same.gather(1, pos).all()):
            why.append("a mined positive is not of the anchor's class")
        if bool(same.gather(1, neg).any()):
            why.append("a mined negative is of the anchor's class")
        got_pos = sim.gather(1, pos).sort(dim=1).values
        got_neg = sim.gather(1, neg).sort(dim=1, descending=True).values
        err = max(float((got_pos - want_pos.sort(dim=1).values).abs().max()),
                  float((got_neg - want_neg).abs().max()))
        if not err <= MINING_TOL:
            why.append(f"selected similarities differ from the dense top-k by {err:.3g} > {MINING_TOL:g}")
    del sim, same
    rt.empty_cache()
    boundary = (2 ** 31) // int(case["D"])
    res = dict(e_loss=err, bound_loss=MINING_TOL, n_times_d=C.n_dot_d(case), exceeds_int32=C.exceeds_int32(case),
               max_key_row=int(max(int(pos.max()), int(neg.max()))) if pos.numel() and neg.numel() else -1,
               rows_past_2e31=int((pos >= boundary).sum() + (neg >= boundary).sum()), ok=not why)
    return _verdict(res, why)
