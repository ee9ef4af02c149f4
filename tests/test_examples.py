"""examples/train_supcon_lt.py runs end to end: a few steps in one process, and on 2 Gloo ranks via torchrun
(where both ranks must report the same global loss and the same DDP-synchronised parameters)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_supcon_lt.py")
FAST = ["--steps", "6", "--probe-steps", "10", "--batch", "64", "--no-progress"]


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the example runs as a user would
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run(cmd, timeout=300):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_LINE = re.compile(r"rank (\d)/(\d): final stage-1 loss ([-\d.]+), parameter checksum ([-\d.]+)")


def test_single_process_rescom_with_checkpoint(tmp_path):
    ck = tmp_path / "ck.pt"
    out = _run([sys.executable, SCRIPT, *FAST, "--save", str(ck)])
    assert "balanced test accuracy" in out and "loss rescom" in out
    (rank,) = RANK_LINE.findall(out)
    assert rank[:2] == ("0", "1") and float(rank[2]) > 0
    state = torch.load(ck)
    assert int(state["loss"]["queue.filled"].sum()) > 0  # the module's queue is in its state_dict
    import ltcl_fused as lf
    loss = lf.nn.ResComLoss(10, 8, 64, k_pos=1, k_neg=16)
    loss.load_state_dict(state["loss"])
    assert torch.equal(loss.queue.filled, state["loss"]["queue.filled"])


def test_two_ranks_with_torchrun(loss="rescom"):  # the queue is the distributed one (collective enqueue)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                SCRIPT, *FAST, "--loss", loss])
    ranks = sorted(RANK_LINE.findall(out))
    assert [r[:2] for r in ranks] == [("0", "2"), ("1", "2")], out
    assert ranks[0][2] == ranks[1][2]  # the loss of the global batch, on every rank
    assert ranks[0][3] == ranks[1][3]  # DDP kept the encoders identical
    assert out.count("balanced test accuracy") == 1  # rank 0 reports
