"""Peak memory of hard-pair mining as the number of keys grows (CPU): streaming stays O(M·(k + tile)).

Each measurement runs in a fresh subprocess. The child builds the inputs, runs one warm-up call on a small
problem, resets its RSS high-water mark (``echo 5 > /proc/self/clear_refs``), runs the mining once and reports
``VmHWM − VmRSS-before`` (the extra resident memory the call needed) and the wall time. The dense reference
(which forms the M × Q similarity matrix and its masks) is measured the same way for comparison.

    python benchmarks/mining_memory.py                      # M=256, D=64, k_pos=1, k_neg=400, Q up to 1e6
    python benchmarks/mining_memory.py --keys 1000 10000 --backends torch cpu

Writes benchmarks/results/mining_memory.csv and .png.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(backend, Q, M, D, k_pos, k_neg, threads):
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(threads)
    import ltcl_fused as lf

    g = torch.Generator().manual_seed(0)
    C = 100
    A = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1)
    K = torch.nn.functional.normalize(torch.randn(Q, D, generator=g), dim=-1)
    a_lab = torch.randint(0, C, (M,), generator=g)
    k_lab = torch.arange(Q) % C                                     # class-balanced keys, Q/C per class
    kp = min(k_pos, Q // C)
    kn = min(k_neg, Q - Q // C - 1)
    lf.hard_pair_mining(A[:8], a_lab[:8], K[:2000], k_lab[:2000], k_pos=1, k_neg=5, backend=backend)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    t = time.perf_counter()
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=kp, k_neg=kn, backend=backend)
    dt = time.perf_counter() - t
    peak = _status("VmHWM")
    print(json.dumps(dict(backend=backend, Q=Q, M=M, D=D, k_pos=kp, k_neg=kn, seconds=dt,
                          extra_peak_mb=(peak - base) / 2 ** 20, inputs_mb=(A.numel() + K.numel()) * 4 / 2 ** 20,
                          dense_sim_mb=M * Q * 4 / 2 ** 20, outputs_mb=(pos.numel() + neg.numel()) * 8 / 2 ** 20)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu", "reference"])
    ap.add_argument("--M", type=int, default=256)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--k-pos", type=int, default=1)
    ap.add_argument("--k-neg", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mining_memory"))
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        b, Q, M, D, kp, kn, th = a.child
        return child(b, int(Q), int(M), int(D), int(kp), int(kn), int(th))
    rows = []
    for Q in a.keys:
        for b in a.backends:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", b, str(Q), str(a.M), str(a.D),
                   str(a.k_pos), str(a.k_neg), str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{b} Q={Q}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{b:>9} Q={Q:>8}  extra peak {row['extra_peak_mb']:9.1f} MB   "
                  f"(dense M×Q fp32 {row['dense_sim_mb']:8.1f} MB)  {row['seconds']:7.2f} s", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in a.backends:
            pts = [(r["Q"], r["extra_peak_mb"]) for r in rows if r["backend"] == b]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=b)
        pts = sorted({(r["Q"], r["dense_sim_mb"]) for r in rows})
        ax.plot(*zip(*pts), ls="--", color="gray", label="M×Q fp32 matrix")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of keys Q")
        ax.set_ylabel("extra peak RSS of one mining call (MB)")
        ax.set_title(f"hard-pair mining, M={a.M}, D={a.D}, k_pos={a.k_pos}, k_neg={a.k_neg}, CPU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out + ".png", dpi=120)
    except ImportError:
        pass
    print("wrote", a.out + ".csv")


if __name__ == "__main__":
    main()
