"""``python -m ltcl_fused.gpu_check --out DIR [--dry-run]``: see docs/gpu.md."""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ltcl_fused.gpu_check",
                                 description="Check ltcl_fused on this GPU machine (correctness, behaviour, timing).")
    ap.add_argument("--out", required=True, help="output folder (gpu_check.json, gpu_check.csv, summary.md, plots)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors under the Triton interpreter, tiny shapes (about a minute; no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (GPU default 480)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes at once in the parallel phase")
    ap.add_argument("--backends", default=None, help="comma-separated subset of triton,cuda,torch")
    ap.add_argument("--sections", default=None,
                    help="comma-separated subset of correctness,large,behaviour,timing,largest")
    # test hook: a perturbed result and a dying worker in the torch correctness group (must fail / be contained)
    ap.add_argument("--inject-failure", action="store_true",
                    default=os.environ.get("LTCL_GPU_CHECK_INJECT_FAILURE") == "1", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # a worker process started by the runner (its environment is set there)
        from .worker import main as worker_main
        return worker_main(argv[1])
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    else:
        import torch
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA device"
            print(f"ltcl_fused.gpu_check: {why}; run it on a GPU machine, or use --dry-run (CPU tensors, Triton "
                  "interpreter)", file=sys.stderr)
            return 2
    from .runner import run
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
