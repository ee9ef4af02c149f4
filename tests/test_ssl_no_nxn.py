"""The chunked SSL path never creates a 2B×2B tensor: every aten op's outputs are recorded during forward+backward."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ltcl_fused as lf
from ltcl_fused.backends import ssl_torch

N, D = 2048, 8  # 2B = 2048 anchors


class SizeRecorder(TorchDispatchMode):
    """Records the largest element count of any tensor an aten op returns, and every op seen."""

    def __init__(self):
        super().__init__()
        self.largest, self.op, self.ops = 0, None, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(N // 2, D, generator=g), dim=1)
    z2 = F.normalize(z1 + 0.5 * torch.randn(N // 2, D, generator=g), dim=1)
    return z1, z2


CASES = {
    "dcl": lambda z1, z2, b: lf.dcl(z1, z2, backend=b),
    "simclr": lambda z1, z2, b: lf.dcl(z1, z2, debiased=False, backend=b),
    "hcl": lambda z1, z2, b: lf.hcl(z1, z2, beta=1.0, backend=b),
    "bayesian_cl": lambda z1, z2, b: lf.bayesian_cl(z1, z2, alpha=0.7, beta=0.8, backend=b),
    "mttv-both": lambda z1, z2, b: lf.mttv(torch.stack([z1, z2], 1).reshape(N, D), backend=b),
    "mttv-low-official": lambda z1, z2, b: lf.mttv(torch.stack([z1, z2], 1).reshape(N, D), filter="low",
                                                   official_self_term=True, backend=b),
}


def _record(fn, backend):
    z1, z2 = (z.clone().requires_grad_(True) for z in _inputs())
    rec = SizeRecorder()
    with rec:
        loss = fn(z1, z2, backend)
        loss.backward()
    assert torch.isfinite(loss) and z1.grad is not None and torch.isfinite(z1.grad).all()
    return rec


@pytest.mark.parametrize("name", list(CASES))
def test_ssl_torch_backend_never_allocates_n_by_n(name, monkeypatch):
    monkeypatch.setattr(ssl_torch, "BLOCK_ELEMENTS", N * N // 8)  # 256 rows of 2048 per block
    rec = _record(CASES[name], "torch")
    assert "aten.mm.default" in rec.ops or "aten.addmm_.default" in rec.ops  # the backward was recorded too
    assert any("addmm_" in op for op in rec.ops)
    assert rec.largest < N * N, f"{name}: {rec.op} made a tensor of {rec.largest} >= (2B)² = {N * N} elements"


def test_recorder_catches_the_dense_reference():
    """The recorder can fail: the dense reference does build (2B)×(2B)."""
    rec = _record(CASES["dcl"], "reference")
    assert rec.largest >= N * N
