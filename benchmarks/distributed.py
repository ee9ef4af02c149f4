"""Time and peak memory per rank of ltcl_fused.distributed on CPU (Gloo, loopback), world sizes 2 and 4.

    python benchmarks/distributed.py [--rows 1024] [--dim 512] [--worlds 2 4] [--losses supcon afcl]
                                     [--backend torch] [--out benchmarks/results/distributed_cpu.csv]

Losses: ``supcon``, ``afcl`` (labels from 10 classes) and the self-supervised ``dcl``, ``hcl``,
``bayesian_cl`` (z1, z2 = the two views of the rank's rows/2 samples) and ``mttv`` (the same rows as
interleaved pairs).

Every (world size, mode, loss) runs in freshly spawned processes (one per rank, one thread each), so
the peak resident memory of one configuration is not hidden by another's. Per rank: the median wall
time of forward + backward over ``--reps`` calls after one warm-up, and the peak RSS growth during those
calls (``ru_maxrss`` after minus the RSS just before the first call: the loss's working set plus the
gathered or travelling feature blocks). A row with ``world=1, mode=single`` is the plain single-process
loss on the same global batch, for comparison. On a machine with fewer cores than ranks the ranks share
cores: the times then include that contention (the CSV records ``cpu_count``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import resource
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _data(rank, rows, dim, n_cls=10):
    g = torch.Generator().manual_seed(rank)
    B = rows // 2
    x = torch.nn.functional.normalize(torch.randn(B, 2, dim, generator=g), dim=-1)
    lab = torch.randint(0, n_cls, (B,), generator=g)
    return x, lab


SSL_LOSSES = ("dcl", "hcl", "bayesian_cl", "mttv")


def _call(lfmod, loss, x, lab, kw):
    if loss == "supcon":
        return lfmod.supcon(x, lab, temperature=0.1, **kw)
    if loss == "afcl":
        return lfmod.afcl(x, lab, temperature=0.1, gamma=2.0, eta=1.0, **kw)
    if loss == "mttv":  # [B, 2, D] -> rows 2b, 2b+1 are the two views of sample b
        return lfmod.mttv(x.reshape(-1, x.shape[-1]), temperature=0.3, **kw)
    return getattr(lfmod, loss)(x[:, 0], x[:, 1], temperature=0.5, **kw)  # dcl, hcl, bayesian_cl defaults


def _measure(fn, x, reps):
    times = []
    base = _rss_mib()
    for i in range(reps + 1):
        xi = x.clone().requires_grad_(True)
        t = time.perf_counter()
        fn(xi).backward()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, max(0.0, _maxrss_mib() - base)


def _worker(rank, W, port, cfg, outdir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=600))
    import ltcl_fused.distributed as lfd
    x, lab = _data(rank, cfg["rows"], cfg["dim"])
    ms, mib = _measure(lambda xi: _call(lfd, cfg["loss"], xi, lab, dict(mode=cfg["mode"], backend=cfg["backend"])),
                       x, cfg["reps"])
    torch.save({"ms": ms, "mib": mib}, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _single(rank, W, cfg, outdir):
    torch.set_num_threads(1)
    import ltcl_fused as lf
    parts = [_data(r, cfg["rows"], cfg["dim"]) for r in range(W)]
    x, lab = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    ms, mib = _measure(lambda xi: _call(lf, cfg["loss"], xi, lab, dict(backend=cfg["backend"])), x, cfg["reps"])
    torch.save({"ms": ms, "mib": mib}, os.path.join(outdir, "rank0.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024, help="flattened rows per rank (B·V with V = 2)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--losses", nargs="+", default=["supcon", "afcl"], choices=["supcon", "afcl", *SSL_LOSSES])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed_cpu.csv"))
    a = ap.parse_args()
    rows = []
    for W in a.worlds:
        for loss in a.losses:
            for mode in ("single", "gather", "ring"):
                cfg = dict(rows=a.rows, dim=a.dim, loss=loss, mode=mode, backend=a.backend, reps=a.reps)
                with tempfile.TemporaryDirectory() as d:
                    if mode == "single":
                        mp.spawn(_single, args=(W, cfg, d), nprocs=1)
                        ranks = 1
                    else:
                        mp.spawn(_worker, args=(W, _free_port(), cfg, d), nprocs=W)
                        ranks = W
                    res = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(ranks)]
                for r, v in enumerate(res):
                    row = dict(world=W if mode != "single" else 1, mode=mode, loss=loss, backend=a.backend,
                               local_rows=a.rows if mode != "single" else a.rows * W, global_rows=a.rows * W,
                               dim=a.dim, rank=r, time_ms=round(v["ms"], 2), peak_rss_growth_mib=round(v["mib"], 1),
                               global_features_mib=round(a.rows * W * a.dim * 4 / 2**20, 2),
                               cpu_count=os.cpu_count())
                    rows.append(row)
                    print(row, flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
