"""Shared harness of the multi-process (Gloo, CPU) tests: one spawn of 3 ranks runs every case on the
world of 3 (default group) and then on the subgroup of global ranks [1, 2] as a world of 2 (its group
rank 0 is global rank 1, which exercises the rank mapping of ``group=``); each rank saves its results,
the tests read them."""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _hang import HANG_GUARD_S

WORLDS = (2, 3)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int) -> None:
    if "GLOO_SOCKET_IFNAME" not in os.environ and any(n == "lo" for _, n in socket.if_nameindex()):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=HANG_GUARD_S))  # a hang guard only


def _guarded(fn, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported by the test that reads this result
        return {"error": traceback.format_exc()}


def run_worlds(rank, port, outdir, cases, modes, run_case, extras):
    """The body of every worker: ``run_case(name, mode, W, group_rank, group)`` for each case and mode,
    then each ``(key, fn)`` of ``extras`` as ``fn(W, group_rank, group)``, on both worlds."""
    init(rank, max(WORLDS), port)
    sub = dist.new_group([1, 2])
    try:
        for W, group, members in ((3, None, [0, 1, 2]), (2, sub, [1, 2])):
            if rank not in members:
                continue
            grank = members.index(rank)
            res = {(name, mode): _guarded(run_case, name, mode, W, grank, group) for name in cases for mode in modes}
            res.update({key: _guarded(fn, W, grank, group) for key, fn in extras})
            torch.save(res, os.path.join(outdir, f"w{W}_rank{grank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_results(worker):
    """Run ``worker(rank, port, outdir)`` on 3 processes; returns ``W -> [result dict of each group rank]``."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(free_port(), d), nprocs=max(WORLDS), join=True)
        out = {W: [torch.load(os.path.join(d, f"w{W}_rank{r}.pt"), weights_only=False) for r in range(W)]
               for W in WORLDS}
    return out.__getitem__


def ok(res):
    if "error" in res:
        pytest.fail("worker raised:\n" + res["error"])
    return res
