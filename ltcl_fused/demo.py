"""The main job: does AFCL help on long-tailed data? A two-stage experiment on a bundled data set.

    python -m ltcl_fused.demo                  # 1-3 min on 2 CPU cores: 6 methods x 5 seeds, table + PNG
    python -m ltcl_fused.demo --quick          # seconds: smoke test
    python -m ltcl_fused.demo --synthetic      # afcl on a large synthetic batch: fused backend vs dense reference

Data: scikit-learn's bundled 8x8 digits (no download). A fixed split (independent of the training
seed) holds out 50 images per class as a balanced test set; the training set keeps
``n_c = round(120 · ρ^(−c/9))`` images of class c (exponential long-tailed profile, imbalance ratio ρ,
default 50: 120 images of digit 0 down to 2-3 of digit 9).

Recipe (the AFCL paper's two stages): (1) an MLP encoder + projection head is pre-trained with a
contrastive loss on two augmented views (random 1-pixel shifts, pixel noise, pixel dropout), calling
``ltcl_fused.supcon / fcl / acl / afcl / bcl`` with ``backend="auto"``; (2) a linear classifier is
trained with cross-entropy on the frozen encoder features. The CE baseline trains encoder and
classifier end to end with cross-entropy. BCL follows its paper in stage 1 (prototypes from the
classifier weights through a head, plus logit-adjusted CE with weight 1 and BCL with weight 0.35)
and gets the same stage-2 linear probe as the other contrastive losses.

Metrics on the balanced test set: unweighted accuracy = mean of the per-class accuracies (balanced
accuracy); weighted accuracy = per-class accuracies weighted by the training class frequencies (the
accuracy one would see on a test set drawn like the training set, as in the paper's imbalanced test
sets); per-class accuracy of the 3 tail classes. Mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("ce", "supcon", "fcl", "acl", "afcl", "bcl")
LABELS = {"ce": "CE", "supcon": "SupCon", "fcl": "FCL", "acl": "ACL", "afcl": "AFCL", "bcl": "BCL"}
N_CLASSES = 10
N_TEST_PER_CLASS = 50
N_HEAD = 120
N_TAIL_REPORTED = 3


@dataclass
class Config:
    imbalance: float = 50.0
    seeds: tuple = (0, 1, 2, 3, 4)
    methods: tuple = METHODS
    steps: int = 400            # stage-1 optimisation steps
    probe_steps: int = 300      # stage-2 (linear classifier) steps
    batch: int = 128            # samples per step (two views each -> 2·batch anchors)
    lr: float = 2e-3
    temperature: float = 0.1
    fcl_gamma: float = 1.0      # FCL: Core-tuning's focal contrastive loss
    acl_eta: float = 10.0
    afcl_gamma: float = 1.0
    afcl_eta: float = 10.0
    bcl_weight: float = 0.35
    hidden: int = 256
    feat_dim: int = 128
    proj_dim: int = 64
    backend: str = "auto"
    progress: bool = True


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------
def long_tailed_counts(n_head: int, n_classes: int, ratio: float) -> List[int]:
    """Exponential profile: class c keeps ``round(n_head · ratio^(−c/(C−1)))`` images (at least 1)."""
    return [max(1, int(round(n_head * ratio ** (-c / (n_classes - 1))))) for c in range(n_classes)]


def load_long_tailed_digits(ratio: float):
    """(x_train, y_train, x_test, y_test, counts): a split that depends only on ``ratio``, never on the seed."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(12345)  # fixed split
    counts = long_tailed_counts(N_HEAD, N_CLASSES, ratio)
    tr, te = [], []
    for c in range(N_CLASSES):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        te.append(idx[:N_TEST_PER_CLASS])
        tr.append(idx[N_TEST_PER_CLASS:N_TEST_PER_CLASS + counts[c]])
    tr, te = torch.cat(tr), torch.cat(te)
    return x[tr], y[tr], x[te], y[te], counts


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel (zero fill), Gaussian pixel noise, 10% pixel dropout; x is [B, 64]."""
    B = x.shape[0]
    img = F.pad(x.view(B, 1, 8, 8), (1, 1, 1, 1))
    dx = torch.randint(0, 3, (B,), generator=g)
    dy = torch.randint(0, 3, (B,), generator=g)
    rows = (dy[:, None] + torch.arange(8)[None, :])               # [B, 8]
    cols = (dx[:, None] + torch.arange(8)[None, :])
    out = img[torch.arange(B)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]  # [B, 8, 8]
    out = out.reshape(B, 64)
    out = out + 0.1 * torch.randn(out.shape, generator=g)
    keep = (torch.rand(out.shape, generator=g) > 0.1).float()
    return out * keep


# --------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, hidden: int, feat_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, feat_dim), nn.BatchNorm1d(feat_dim), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def _head(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


def contrastive_loss(method: str, z: torch.Tensor, y: torch.Tensor, cfg: Config, prototypes=None):
    """The stage-1 loss on unit-norm projections ``z`` [B, 2, d] through the public API of ltcl_fused."""
    import ltcl_fused as lf
    kw = dict(temperature=cfg.temperature, backend=cfg.backend)
    if method == "supcon":
        return lf.supcon(z, y, **kw)
    if method == "fcl":
        return lf.fcl(z, y, gamma=cfg.fcl_gamma, **kw)
    if method == "acl":
        return lf.acl(z, y, eta=cfg.acl_eta, **kw)
    if method == "afcl":
        return lf.afcl(z, y, gamma=cfg.afcl_gamma, eta=cfg.afcl_eta, **kw)
    if method == "bcl":
        return lf.bcl(z, y, prototypes, **kw)
    raise ValueError(method)


def _bar(total, desc, cfg):
    if not cfg.progress:
        return contextlib.nullcontext(None)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)


def train_one(method: str, seed: int, data, cfg: Config) -> Dict:
    """Train (two stages, or CE end to end) and evaluate one method with one seed."""
    x_tr, y_tr, x_te, y_te, counts = data
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    enc = Encoder(cfg.hidden, cfg.feat_dim)
    clf = nn.Linear(cfg.feat_dim, N_CLASSES)
    params = list(enc.parameters())
    proj = proto_head = None
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float32) / sum(counts))
    if method == "ce":
        params += list(clf.parameters())
    else:
        proj = _head(cfg.feat_dim, cfg.feat_dim, cfg.proj_dim)
        params += list(proj.parameters())
        if method == "bcl":
            proto_head = _head(cfg.feat_dim, cfg.feat_dim, cfg.proj_dim)
            params += list(proto_head.parameters()) + list(clf.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    n = len(y_tr)
    bs = min(cfg.batch, n)
    perm, pos = torch.randperm(n, generator=g), 0
    enc.train()
    t0 = time.perf_counter()
    with _bar(cfg.steps, f"{LABELS[method]:>6s} seed {seed}", cfg) as bar:
        for step in range(cfg.steps):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + bs]
            pos += bs
            xb, yb = x_tr[idx], y_tr[idx]
            if method == "ce":
                loss = F.cross_entropy(clf(enc(augment(xb, g))), yb)
            else:
                v = torch.cat([augment(xb, g), augment(xb, g)])        # [2B, 64]: view 0 then view 1
                h = enc(v)
                z = F.normalize(proj(h), dim=1).view(2, bs, -1).transpose(0, 1)  # [B, 2, d]
                prototypes = None
                if method == "bcl":
                    prototypes = F.normalize(proto_head(clf.weight), dim=1)
                loss = contrastive_loss(method, z, yb, cfg, prototypes)
                if method == "bcl":  # BCL's recipe: logit-adjusted CE + 0.35 BCL
                    ce = F.cross_entropy(clf(h) + log_prior, yb.repeat(2))
                    loss = ce + cfg.bcl_weight * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
    enc.eval()
    if method != "ce":  # stage 2: linear classifier on frozen features
        with torch.no_grad():
            f_tr = enc(x_tr)
        clf = nn.Linear(cfg.feat_dim, N_CLASSES)
        opt2 = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(cfg.probe_steps):
            opt2.zero_grad(set_to_none=True)
            F.cross_entropy(clf(f_tr), y_tr).backward()
            opt2.step()
    with torch.no_grad():
        pred = clf(enc(x_te)).argmax(1)
    per_class = [float((pred[y_te == c] == c).float().mean()) for c in range(N_CLASSES)]
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    return {"method": method, "seed": seed, "unweighted": sum(per_class) / N_CLASSES,
            "weighted": float((prior * torch.tensor(per_class, dtype=torch.float64)).sum()),
            "per_class": per_class, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------------
def which_backend(backend: str, device=torch.device("cpu")) -> str:
    """The backend that runs the row-statistics engine for ``backend`` here, and why others were skipped."""
    from . import backends
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            eng = backends.resolve(backend, device, "rowstats", "ltcl_fused.demo")
        except Exception as e:  # noqa: BLE001
            return f"none ({e})"
    name = "reference" if eng is None else eng.name
    skipped = "; ".join(str(x.message) for x in w)
    return name + (f" [{skipped}]" if skipped else "")


def _mean_std(v):
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def summarise(results: List[Dict], counts: List[int], cfg: Config) -> str:
    tail = list(range(N_CLASSES - N_TAIL_REPORTED, N_CLASSES))
    head = f"{'method':<8s} {'unweighted acc':>15s} {'weighted acc':>14s} " + " ".join(
        f"{'class ' + str(c) + ' (n=' + str(counts[c]) + ')':>15s}" for c in tail)
    lines = [head, "-" * len(head)]
    for m in cfg.methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        u, w = _mean_std([r["unweighted"] for r in rs]), _mean_std([r["weighted"] for r in rs])
        cells = [f"{100 * u[0]:6.1f} ± {100 * u[1]:4.1f}", f"{100 * w[0]:5.1f} ± {100 * w[1]:4.1f}"]
        for c in tail:
            pc = _mean_std([r["per_class"][c] for r in rs])
            cells.append(f"{100 * pc[0]:5.1f} ± {100 * pc[1]:4.1f}")
        lines.append(f"{LABELS[m]:<8s} {cells[0]:>15s} {cells[1]:>14s} " + " ".join(f"{c:>15s}" for c in cells[2:]))
    return "\n".join(lines)


def plot(results: List[Dict], counts: List[int], cfg: Config, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in cfg.methods if any(r["method"] == m for r in results)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = range(len(methods))
    for k, (key, lab) in enumerate([("unweighted", "unweighted (balanced)"), ("weighted", "weighted")]):
        ms = [_mean_std([r[key] for r in results if r["method"] == m]) for m in methods]
        a1.bar([x + 0.38 * k for x in xs], [100 * m for m, _ in ms], 0.38, yerr=[100 * s for _, s in ms],
               capsize=3, label=lab)
    a1.set_xticks([x + 0.19 for x in xs])
    a1.set_xticklabels([LABELS[m] for m in methods])
    a1.set_ylabel("test accuracy (%)")
    lo = min(100 * r[k] for r in results for k in ("unweighted", "weighted"))
    a1.set_ylim(max(0, lo - 10), 100)
    a1.legend(loc="lower right", fontsize=8)
    a1.set_title(f"digits, long-tailed (imbalance ratio {cfg.imbalance:g}), {len(cfg.seeds)} seeds")
    for m in methods:
        pcs = [_mean_std([r["per_class"][c] for r in results if r["method"] == m])[0] for c in range(N_CLASSES)]
        a2.plot(range(N_CLASSES), [100 * p for p in pcs], marker="o", label=LABELS[m])
    a2.set_xticks(range(N_CLASSES))
    a2.set_xticklabels([f"{c}\n{counts[c]}" for c in range(N_CLASSES)], fontsize=8)
    a2.set_xlabel("class (digit) / training images")
    a2.set_ylabel("per-class test accuracy (%)")
    a2.set_title("per-class accuracy, head → tail")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_experiment(cfg: Config, out: Optional[str]) -> Dict:
    data = load_long_tailed_digits(cfg.imbalance)
    counts = data[4]
    print(f"digits long-tailed: imbalance ratio {cfg.imbalance:g}, {len(data[1])} training images "
          f"(per class {counts}), balanced test set of {len(data[3])}")
    print(f"contrastive losses: ltcl_fused with backend={cfg.backend!r} -> runs on: {which_backend(cfg.backend)}")
    results = []
    t0 = time.perf_counter()
    runs = [(m, s) for s in cfg.seeds for m in cfg.methods]
    if cfg.progress:
        from tqdm import tqdm
        it = tqdm(runs, desc="runs", dynamic_ncols=True)
    else:
        it = runs
    for m, s in it:
        results.append(train_one(m, s, data, cfg))
    table = summarise(results, counts, cfg)
    print(f"\nresults ({len(cfg.seeds)} seeds, mean ± std, %; tail = the {N_TAIL_REPORTED} rarest classes), "
          f"{time.perf_counter() - t0:.0f} s")
    print(table)
    report = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
              "class_counts": counts, "results": results, "table": table}
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "demo_results.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "demo_results.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "seed", "unweighted", "weighted", "seconds"] +
                       [f"acc_class{c}" for c in range(N_CLASSES)])
            for r in results:
                w.writerow([r["method"], r["seed"], f"{r['unweighted']:.4f}", f"{r['weighted']:.4f}",
                            f"{r['seconds']:.1f}"] + [f"{p:.4f}" for p in r["per_class"]])
        with open(os.path.join(out, "demo_table.txt"), "w") as f:
            f.write(table + "\n")
        png = plot(results, counts, cfg, os.path.join(out, "demo_accuracy.png"))
        print(f"wrote {png}, demo_results.csv, demo_results.json, demo_table.txt in {out}")
    return report


# --------------------------------------------------------------------------------------------------------
# --synthetic: one large afcl call, fused backend vs the dense reference (each in its own process)
# --------------------------------------------------------------------------------------------------------
def _kb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        return float(re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M).group(1))


def _synthetic_worker(spec: dict) -> dict:
    import ltcl_fused as lf
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    dev = torch.device(spec["device"])
    g = torch.Generator().manual_seed(0)
    B = spec["n"] // 2
    x = F.normalize(torch.randn(B, 2, spec["d"], generator=g), dim=-1).to(dev).requires_grad_(True)
    y = torch.randint(0, 100, (B,), generator=g).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _kb("VmRSS") * 1024
    t0 = time.perf_counter()
    try:
        loss = lf.afcl(x, y, gamma=spec["gamma"], eta=spec["eta"], temperature=0.1, backend=spec["backend"])
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
    except (RuntimeError, MemoryError) as e:
        msg = str(e).lower()
        oom = "out of memory" in msg or "allocate" in msg or isinstance(e, MemoryError)
        return {"status": "oom" if oom else "error", "reason": str(e).splitlines()[0][:160]}
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else _kb("VmHWM") * 1024) - base
    return {"status": "ok", "seconds": dt, "peak_mib": peak / 2 ** 20, "loss": float(loss),
            "grad_norm": float(x.grad.norm())}


def run_synthetic(n: int, d: int, backend: str, device: str, mem_limit_gb: float, timeout: float,
                  threads: Optional[int] = None) -> List[Dict]:
    """afcl(γ=2, η=10) forward+backward on n anchors of dim d: ``backend`` vs backend='reference'."""
    dev = torch.device(device)
    best = which_backend(backend, dev)
    print(f"synthetic afcl (gamma=2, eta=10): N={n} anchors (two views of {n // 2}), D={d}, device {device}")
    rows = []
    for be in (backend, "reference"):
        spec = {"n": n, "d": d, "backend": be, "device": device, "gamma": 2.0, "eta": 10.0, "threads": threads}
        code = ("import json,sys,resource\n"
                + (f"resource.setrlimit(resource.RLIMIT_AS, (int({mem_limit_gb}*2**30), int({mem_limit_gb}*2**30)))\n"
                   if device == "cpu" and mem_limit_gb else "")
                + "from ltcl_fused.demo import _synthetic_worker\n"
                + "print('SYNTH ' + json.dumps(_synthetic_worker(json.loads(sys.argv[1]))))")
        try:
            p = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                               timeout=timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("SYNTH ")]
            if line:
                r = json.loads(line[-1][6:])
            elif p.returncode == -9:
                r = {"status": "oom", "reason": "killed (out of memory)"}
            else:
                tail = (p.stderr.strip().splitlines() or ["?"])[-1]
                r = {"status": "oom" if "alloc" in tail.lower() else "error", "reason": tail[:160]}
        except subprocess.TimeoutExpired:
            r = {"status": "timeout", "reason": f"over {timeout:.0f} s"}
        label = f"{be} -> {best}" if be == backend else be
        r["backend"] = label
        rows.append(r)
        if r["status"] == "ok":
            print(f"  {label:<40s} {r['seconds']:8.2f} s   peak {r['peak_mib']:9.1f} MiB   loss {r['loss']:.6f}")
        else:
            print(f"  {label:<40s} {r['status'].upper()}: {r['reason']}")
    if all(r["status"] == "ok" for r in rows):
        f, ref = rows
        print(f"  fused vs dense: {ref['seconds'] / f['seconds']:.2f}x time, {ref['peak_mib'] / max(f['peak_mib'], 1e-9):.1f}x "
              f"memory, |loss difference| = {abs(f['loss'] - ref['loss']):.2e}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ltcl_fused.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests (seconds)")
    ap.add_argument("--out", default="demo_out", help="output folder for the table, CSV, JSON and PNG")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2,3,4)")
    ap.add_argument("--methods", default=None, help=f"comma-separated from {','.join(METHODS)}")
    ap.add_argument("--imbalance", type=float, default=50.0, help="imbalance ratio n_max/n_min (10 to 100)")
    ap.add_argument("--steps", type=int, default=None, help="stage-1 steps per run")
    ap.add_argument("--backend", default="auto", help="ltcl_fused backend for the contrastive losses")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 for the training demo, whose model is tiny: more "
                         "threads only add synchronisation, and on a busy machine OpenMP spin-waits slow it down "
                         "many times; torch's default for --synthetic)")
    ap.add_argument("--synthetic", action="store_true", help="one large afcl call: fused backend vs dense")
    ap.add_argument("--n", type=int, default=None, help="--synthetic: anchors (default 8192 CPU, 65536 GPU)")
    ap.add_argument("--d", type=int, default=128, help="--synthetic: feature dim")
    ap.add_argument("--device", default=None, help="--synthetic: cpu or cuda (default: cuda when available)")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="--synthetic: address-space cap per run (CPU)")
    ap.add_argument("--timeout", type=float, default=600.0, help="--synthetic: seconds per run")
    a = ap.parse_args(argv)
    if a.synthetic:
        dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        n = a.n or (65536 if dev == "cuda" else 8192)
        rows = run_synthetic(n, a.d, a.backend, dev, a.mem_limit_gb, a.timeout, a.threads)
        return 0 if rows and rows[0]["status"] == "ok" else 1
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(a.threads or 1)
    cfg = Config(imbalance=a.imbalance, backend=a.backend, progress=not a.no_progress)
    if a.quick:
        cfg.seeds, cfg.steps, cfg.probe_steps, cfg.batch = (0,), 15, 30, 64
    if a.seeds:
        cfg.seeds = tuple(int(s) for s in a.seeds.split(","))
    if a.methods:
        bad = [m for m in a.methods.split(",") if m not in METHODS]
        if bad:
            ap.error(f"unknown method(s) {bad}; choose from {','.join(METHODS)}")
        cfg.methods = tuple(a.methods.split(","))
    if a.steps:
        cfg.steps = a.steps
    if not 1.0 <= cfg.imbalance <= 1000.0:
        ap.error("--imbalance must lie in [1, 1000]")
    try:
        run_experiment(cfg, a.out)
    finally:
        torch.set_num_threads(prev_threads)  # leave an in-process caller's setting as it was
    return 0


if __name__ == "__main__":
    sys.exit(main())
