"""ltcl_fused.nn modules with distributed=True on 2 real Gloo ranks equal the single-process modules on the
concatenated batch (values; with grad_sync="sum" each rank's gradient is its slice of the single-process one).
ResComLoss starts from an empty queue, which its enqueue then fills with every rank's rows in rank order."""
from __future__ import annotations

import datetime
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ltcl_fused.nn as lnn

W, D, C = 2, 5, 4
SIZES = (3, 6)  # uneven slices
ATOL = 1e-12


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(sum(SIZES), 2, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, C, (sum(SIZES),), generator=g)
    x2 = torch.nn.functional.normalize(torch.randn(sum(SIZES), 2, D, generator=g, dtype=torch.float64), dim=-1)
    return x, y, x2


def _modules(distributed, group=None):
    kw = dict(distributed=True, group=group, grad_sync="sum") if distributed else {}
    return {
        "supcon": lnn.SupConLoss(temperature=0.2, backend="torch", **kw),
        "supcon_ring": lnn.SupConLoss(temperature=0.2, backend="torch", **({**kw, "mode": "ring"} if kw else {})),
        "afcl": lnn.AFCLLoss(gamma=1.0, eta=2.0, temperature=0.3, backend="torch", **kw),
        "rescom": lnn.ResComLoss(C, 3, D, k_pos=1, k_neg=2, temperature=0.2, backend="torch",
                                 queue_dtype=torch.float64, **kw),
    }


def _steps(mods, x, y, x2):
    """Per module: [(loss, grad of x)] over two steps (ResCom: empty queue, then the queue it filled)."""
    out = {}
    for name, m in mods.items():
        res = []
        for xb in (x, x2) if name == "rescom" else (x,):
            xb = xb.clone().requires_grad_()
            v = m(xb, y)
            v.backward()
            res.append((v.detach(), xb.grad))
        out[name] = res
    return out


def _worker(rank, port, folder):
    if any(n == "lo" for _, n in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y, x2 = _batch()
        sl = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
        res = _steps(_modules(True), x[sl], y[sl], x2[sl])
        torch.save(res, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(_free_port(), d), nprocs=W, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(W)]


@pytest.mark.parametrize("name", ["supcon", "supcon_ring", "afcl", "rescom"])
def test_distributed_module_equals_single_process_module(ranks, name):
    x, y, x2 = _batch()
    single = _steps({name: _modules(False)[name]}, x, y, x2)[name]
    for step, (v, g) in enumerate(single):
        for rank in range(W):
            v_r, g_r = ranks[rank][name][step]
            torch.testing.assert_close(v_r, v, atol=ATOL, rtol=0)
            sl = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
            torch.testing.assert_close(g_r, g[sl], atol=ATOL, rtol=0)
        assert float(g.abs().sum()) > 0
