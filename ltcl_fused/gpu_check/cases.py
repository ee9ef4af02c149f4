"""What the check runs: the two profiles (GPU, dry run), the losses and their inputs, and the case plan.

A case is a JSON-able dict (``id``, ``section``, ``kind`` and the parameters its kind needs); cases are
grouped, and each group runs in a worker process of its own (``runner.py``), so one crash costs one case.
The GPU profile and the dry-run profile differ only in sizes, budgets and grouping; both plan the same
kinds of cases through the same functions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
BACKENDS = ("triton", "cuda", "torch")
SECTIONS = ("correctness", "large", "behaviour", "timing", "largest")
N_CLASSES = 5                       # correctness inputs: every class present, several positives per anchor
TIMING_CLASSES = 100                # timing inputs: long-tailed labels over 100 classes (as benchmarks/)
TIMING_TAU, TIMING_GAMMA, TIMING_ETA = 0.07, 2.0, 5.0  # afcl (γ = 2, η = 5): issue 12's target setting


# ---------------------------------------------------------------------------------------------------------------
# losses: inputs (fp64, CPU, seeded) and the call of the public API
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    name: str
    kind: str                                   # "contrast" | "bcl" | "rescom" | "two_views" | "mttv"
    call: Callable                              # (tensors, backend, check_finite) -> per-anchor loss
    grads: Tuple[str, ...]                      # inputs that get gradients


def _contrast(fn, **kw):
    return lambda t, b, cf: fn(t["features"], t["labels"], reduction="none", backend=b, check_finite=cf, **kw)


def _two_views(fn, **kw):
    return lambda t, b, cf: fn(t["z1"], t["z2"], reduction="none", backend=b, check_finite=cf, **kw)


def _specs() -> Dict[str, LossSpec]:
    import ltcl_fused as lf
    return {s.name: s for s in (
        LossSpec("supcon", "contrast", _contrast(lf.supcon, temperature=0.1), ("features",)),
        LossSpec("afcl", "contrast", _contrast(lf.afcl, gamma=2.0, eta=2.0, temperature=0.1), ("features",)),
        LossSpec("fcl", "contrast", _contrast(lf.fcl, gamma=2.0, temperature=0.1), ("features",)),
        LossSpec("acl", "contrast", _contrast(lf.acl, eta=2.0, temperature=0.1), ("features",)),
        LossSpec("bcl", "bcl", lambda t, b, cf: lf.bcl(t["features"], t["labels"], t["prototypes"], temperature=0.1,
                                                        reduction="none", backend=b, check_finite=cf),
                 ("features", "prototypes")),
        LossSpec("rescom", "rescom", lambda t, b, cf: lf.rescom(t["features"], t["labels"], t["queue"],
                                                                 t["queue_labels"], k_pos=2, k_neg=16, temperature=0.2,
                                                                 reduction="none", backend=b, check_finite=cf),
                 ("features",)),
        LossSpec("dcl", "two_views", _two_views(lf.dcl), ("z1", "z2")),
        LossSpec("hcl", "two_views", _two_views(lf.hcl, beta=1.0), ("z1", "z2")),
        LossSpec("bayesian_cl", "two_views", _two_views(lf.bayesian_cl), ("z1", "z2")),
        LossSpec("mttv", "mttv", lambda t, b, cf: lf.mttv(t["embeddings"], reduction="none", backend=b,
                                                           check_finite=cf), ("embeddings",)),
    )}


_SPECS: Dict[str, LossSpec] = {}


def spec(name: str) -> LossSpec:
    if not _SPECS:
        _SPECS.update(_specs())
    return _SPECS[name]


LOSSES = ("supcon", "afcl", "fcl", "acl", "bcl", "rescom", "dcl", "hcl", "bayesian_cl", "mttv")


def make_inputs(loss: str, B: int, D: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """fp64 CPU inputs of ``loss`` for B samples of two views (2B anchors), unit-norm features."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, 2, D, generator=g, dtype=torch.float64), dim=-1)
    kind = spec(loss).kind
    if kind == "two_views":
        return {"z1": x[:, 0].contiguous(), "z2": x[:, 1].contiguous()}
    if kind == "mttv":
        return {"embeddings": x.reshape(2 * B, D)}
    n_cls = min(N_CLASSES, B)
    y = torch.randint(0, n_cls, (B,), generator=g)
    y[:n_cls] = torch.arange(n_cls)
    out = {"features": x, "labels": y}
    if kind == "bcl":
        out["prototypes"] = F.normalize(torch.randn(n_cls, D, generator=g, dtype=torch.float64), dim=-1)
    if kind == "rescom":  # every class in the queue often enough for k_pos = 2 and k_neg = 16
        Q = max(4 * B, 20 * n_cls)
        out["queue"] = F.normalize(torch.randn(Q, D, generator=g, dtype=torch.float64), dim=-1)
        out["queue_labels"] = torch.arange(n_cls).repeat(Q // n_cls + 1)[:Q][torch.randperm(Q, generator=g)]
    return out


def cast(tensors: Dict[str, torch.Tensor], dtype: torch.dtype, device) -> Dict[str, torch.Tensor]:
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in tensors.items()}


def long_tailed_labels(n: int, gen: torch.Generator, n_classes: int = TIMING_CLASSES, ratio: float = 100.0):
    """``n`` labels from an exponential long-tailed class profile (imbalance ``ratio``), as benchmarks/providers."""
    w = ratio ** (-torch.arange(n_classes, dtype=torch.float64) / max(n_classes - 1, 1))
    return torch.multinomial(w / w.sum(), n, replacement=True, generator=gen)


def timing_inputs(N: int, D: int, dtype: torch.dtype, rt, seed: int = 0) -> Dict[str, torch.Tensor]:
    """N anchors (two views of N/2 samples), unit norm, long-tailed labels; made on the device."""
    g = rt.generator(seed)
    x = torch.randn(N // 2, 2, D, generator=g, device=rt.device, dtype=torch.float32)
    x = F.normalize(x, dim=-1).to(dtype).requires_grad_(True)
    y = long_tailed_labels(N // 2, torch.Generator().manual_seed(seed)).to(rt.device)
    return {"features": x, "labels": y}


def timing_call(loss: str, provider: str, t: Dict[str, torch.Tensor]):
    import ltcl_fused as lf
    kw = dict(temperature=TIMING_TAU, backend=provider, check_finite=False)
    if loss == "supcon":
        return lf.supcon(t["features"], t["labels"], **kw)
    if loss == "afcl":
        return lf.afcl(t["features"], t["labels"], gamma=TIMING_GAMMA, eta=TIMING_ETA, **kw)
    raise ValueError(f"timing: unknown loss {loss!r}")


# ---------------------------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------------------------
def _bc(m, n, d, w, s):
    return [m, n, d, w, s]  # a BlockConfig as JSON (triton_kernels/configs.py)


@dataclass
class Profile:
    name: str
    device: str
    dims: Tuple[int, ...]
    batches: Tuple[int, ...]                 # B; the anchors are the 2B rows of two views
    dtypes: Tuple[str, ...] = tuple(DTYPES)
    losses: Tuple[str, ...] = LOSSES
    backends: Tuple[str, ...] = BACKENDS
    # chunked-D vs single-D Triton configurations (ops.FORCE_CONFIG), as (fwd, bwd) BlockConfigs
    config_losses: Tuple[str, ...] = ("supcon", "afcl", "acl", "bcl", "dcl", "hcl", "bayesian_cl", "mttv")
    config_dtypes: Tuple[str, ...] = ("bf16", "fp32")
    config_dim: int = 128
    config_batch: int = 150
    chunked: Tuple[list, list] = (_bc(32, 32, 32, 4, 1), _bc(32, 32, 32, 4, 1))
    single: Tuple[list, list] = (_bc(32, 32, 128, 4, 1), _bc(32, 32, 128, 4, 1))
    # one case whose keys pass 2^31 elements (checked on sampled rows)
    large: dict = field(default_factory=lambda: dict(B=64, keys=1_100_000, D=2048, dtype="bf16", rows=64,
                                                     k_pos=4, k_neg=16))
    # streams, graphs, torch.compile, host syncs
    behaviour: dict = field(default_factory=lambda: dict(B=150, D=128, dtype="fp32",
                                                         losses=("supcon", "afcl", "dcl"), sync_losses=LOSSES,
                                                         compile_losses=("afcl", "dcl")))
    # timing of forward+backward beside one N×N×D torch.mm
    timing_N: Tuple[int, ...] = (8192, 65536, 262144)
    timing_D: int = 128
    timing_dtypes: Tuple[str, ...] = ("bf16", "fp32")
    timing_losses: Tuple[str, ...] = ("supcon", "afcl")
    timing_providers: Tuple[str, ...] = ("triton", "cuda", "torch", "reference")
    timing_caps: Dict[str, int] = field(default_factory=lambda: {"reference": 16384})
    min_repeats: int = 10
    max_repeats: int = 50
    target_s: float = 1.0                    # timed seconds per case (within the repeats bounds)
    case_limit_s: float = 25.0               # a timing case predicted to take longer is skipped (too_slow)
    gemm_block_elems: int = 1 << 28          # rows per torch.mm block = this // N (N×N is never stored)
    # the largest N whose afcl step runs (bf16, D = 128), doubling from largest_start
    largest_start: int = 65536
    largest_max: int = 1 << 26
    largest_D: int = 128
    largest_step_s: float = 30.0
    # budget (seconds from the start) and its split: each phase ends at this fraction of the budget
    budget_s: float = 480.0
    phase_end: Dict[str, float] = field(default_factory=lambda: {"parallel": 0.58, "timing": 0.86, "largest": 0.94})
    build_timeout_frac: float = 0.52
    jobs: int = 8
    # which case fields name a case's worker group ("<section>/<backend>" before "<section>")
    group_by: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: {
        "correctness/triton": ("backend", "dtype", "D"),  # each group compiles its own kernels
        "correctness": ("backend", "dtype"), "configs": ("backend", "dtype", "config"), "behaviour": ("backend",),
        "large": (), "timing": (), "largest": ()})
    group_prefix: Dict[str, str] = field(default_factory=dict)  # e.g. {"large": "parallel"}: one group name
    phase_of: Dict[str, str] = field(default_factory=lambda: {"correctness": "parallel", "large": "parallel",
                                                              "behaviour": "parallel", "timing": "timing",
                                                              "largest": "largest"})

    def replace(self, **kw) -> "Profile":
        return dataclasses.replace(self, **kw)


def gpu_profile(cpu_count: int = 16) -> Profile:
    return Profile(name="gpu", device="cuda", dims=(64, 128, 200), batches=(37, 150, 1030),
                   jobs=max(2, min(8, cpu_count - 4)))


def dry_profile() -> Profile:
    """Tiny shapes on CPU tensors under the Triton interpreter (block 64): the same cases, about a minute."""
    return Profile(
        name="dry", device="cpu", dims=(24,), batches=(12,),
        config_dtypes=("fp32",), config_dim=40, config_batch=12,
        chunked=(_bc(16, 32, 16, 1, 1), _bc(16, 16, 16, 1, 1)), single=(_bc(16, 16, 64, 1, 1), _bc(16, 16, 64, 1, 1)),
        large=dict(B=8, keys=700, D=24, dtype="bf16", rows=8, k_pos=2, k_neg=8),
        behaviour=dict(B=12, D=16, dtype="fp32", losses=("supcon", "dcl"),
                       sync_losses=("supcon", "dcl"), compile_losses=("afcl",),
                       compile_backends=("triton",)),
        timing_N=(32, 64), timing_D=16, timing_caps={}, min_repeats=2, max_repeats=3, target_s=0.1,
        case_limit_s=10.0, gemm_block_elems=1 << 10,
        largest_start=32, largest_max=128, largest_D=16, largest_step_s=5.0,
        budget_s=600.0, jobs=2,
        # few worker processes (each one's imports cost seconds here): one per backend for the parallel phase
        group_by={"correctness": ("backend",), "configs": ("backend",), "behaviour": ("backend",),
                  "large": ("backend",), "timing": (), "largest": ()},
        group_prefix={"correctness": "parallel", "large": "parallel", "behaviour": "parallel", "largest": "timing"},
        phase_of={"correctness": "parallel", "large": "parallel", "behaviour": "parallel", "timing": "timing",
                  "largest": "timing"})


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------
def _group_name(section: str, case: dict, keys: Tuple[str, ...]) -> str:
    return "-".join([section] + [str(case[k]) for k in keys if k in case])


def _keys(p: Profile, what: str, backend: Optional[str]) -> Tuple[str, ...]:
    return p.group_by.get(f"{what}/{backend}", p.group_by.get(what, ()))


def plan(p: Profile, *, backends=None, sections=None, inject_failure: bool = False) -> List[dict]:
    """The groups of cases to run, in scheduling order: [{name, section, phase, needs_cuda, cases}]."""
    backends = tuple(b for b in p.backends if backends is None or b in backends)
    sections = tuple(s for s in SECTIONS if sections is None or s in sections)
    groups: Dict[str, dict] = {}

    def add(section, case, what=None):
        case["section"] = section
        phase = p.phase_of[section]
        name = _group_name(p.group_prefix.get(section, section), case, _keys(p, what or section, case.get("backend")))
        g = groups.setdefault(name, dict(name=name, section=section, phase=phase, cases=[]))
        g["cases"].append(case)

    if "large" in sections:
        L = p.large
        for b in backends:
            for kind in ("large_supcon", "large_mining"):
                add("large", dict(id=f"large/{b}/{kind[6:]}", kind=kind, backend=b, **L))
    if "behaviour" in sections:
        bh = p.behaviour
        for b in backends:
            common = dict(backend=b, B=bh["B"], D=bh["D"], dtype=bh["dtype"])
            for what in ("stream", "graph"):
                for loss in bh["losses"]:
                    add("behaviour", dict(id=f"behaviour/{what}/{b}/{loss}", kind=what, loss=loss, **common))
            for loss in (bh["compile_losses"] if b in bh.get("compile_backends", BACKENDS) else ()):
                add("behaviour", dict(id=f"behaviour/compile/{b}/{loss}", kind="compile", loss=loss, **common))
            for loss in bh["sync_losses"]:
                for cf in (True, False):
                    add("behaviour", dict(id=f"behaviour/syncs/{b}/{loss}/check_finite={cf}", kind="syncs",
                                          loss=loss, check_finite=cf, **common))
    if "correctness" in sections:
        # the largest D first: its chunked kernels are the most numerous compiles
        for b in backends:
            for D in sorted(p.dims, reverse=True):
                for dt in p.dtypes:
                    for loss in p.losses:
                        for B in p.batches:
                            add("correctness", dict(id=f"correctness/{b}/{loss}/{dt}/D{D}/N{2 * B}", kind="loss",
                                                    backend=b, loss=loss, dtype=dt, D=D, B=B, N=2 * B))
            if b == "triton":
                for dt in p.config_dtypes:
                    for loss in p.config_losses:
                        add("correctness", dict(
                            id=f"correctness/triton/{loss}/{dt}/D{p.config_dim}/N{2 * p.config_batch}/configs",
                            kind="configs", backend=b, loss=loss, dtype=dt, D=p.config_dim, B=p.config_batch,
                            N=2 * p.config_batch, chunked=list(p.chunked), single=list(p.single), config="configs"),
                            "configs")
        if inject_failure:
            _inject(p, add, backends)
    if "timing" in sections:
        for dt in p.timing_dtypes:
            for N in p.timing_N:
                rep = dict(min_repeats=p.min_repeats, max_repeats=p.max_repeats, target_s=p.target_s,
                           case_limit_s=p.case_limit_s, dtype=dt, D=p.timing_D, N=N)
                add("timing", dict(id=f"timing/torch.mm/{dt}/N{N}", kind="gemm", provider="torch.mm", loss="-",
                                   block_elems=p.gemm_block_elems, **rep))
                for loss in p.timing_losses:
                    for prov in p.timing_providers:
                        if prov in BACKENDS and prov not in backends:
                            continue
                        add("timing", dict(id=f"timing/{prov}/{loss}/{dt}/N{N}", kind="step", provider=prov,
                                           loss=loss, cap=p.timing_caps.get(prov), **rep))
    if "largest" in sections:
        prefer = [b for b in BACKENDS if b in backends]  # auto's order on CUDA tensors
        N = p.largest_start
        while N <= p.largest_max:
            add("largest", dict(id=f"largest/afcl/bf16/N{N}", kind="largest", loss="afcl", dtype="bf16",
                                D=p.largest_D, N=N, prefer=prefer, step_limit_s=p.largest_step_s))
            N *= 2
    order = {"large": 0, "behaviour": 1, "correctness": 2, "timing": 3, "largest": 4}
    # CUDA-backend cases wait for the extension build: they go last in their group, and a group that starts
    # with one ("needs_cuda") goes last in its phase
    for g in groups.values():
        g["cases"].sort(key=uses_cuda)
        g["needs_cuda"] = uses_cuda(g["cases"][0])
    return sorted(groups.values(), key=lambda g: (g["needs_cuda"], order[g["section"]]))


def uses_cuda(case: dict) -> bool:
    return case.get("backend") == "cuda" or case.get("provider") == "cuda"


def _inject(p: Profile, add, backends) -> None:
    """Hidden test hook (--inject-failure): a perturbed loss value (must fail the tolerance rule) and a worker
    that dies (must be recorded as a crash, the cases after it still run) in the torch correctness group."""
    if "torch" not in backends:
        return
    D, B = p.dims[0], p.batches[0]
    base = dict(backend="torch", loss="supcon", dtype="fp32", D=D, B=B, N=2 * B)
    add("correctness", dict(id="correctness/torch/supcon/fp32/injected-perturbation", kind="loss", perturb=1e-3,
                            **base))
    add("correctness", dict(id="correctness/torch/injected-crash", kind="crash", **base))
    add("correctness", dict(id="correctness/torch/supcon/fp32/after-crash", kind="loss", **base))


def n_dot_d(case: dict) -> int:
    return int(case["keys"]) * int(case["D"])


def exceeds_int32(case: dict) -> bool:
    return n_dot_d(case) > 2 ** 31


def predicted_s(prev_N: int, prev_ms: float, N: int) -> float:
    """Seconds of one forward+backward at N from one at prev_N (quadratic in N)."""
    return prev_ms / 1e3 * (N / prev_N) ** 2
