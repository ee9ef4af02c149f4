"""Every backend's backward on a block of columns that does not hold the row's dominant column.

The distributed ring hands an engine one block of columns at a time with the row statistics of the
whole row: lse is finite but top = -1 ("not in this block"). Every column must then take the generic
formula with that lse (regression: the torch lean path and the C++ CPU/CUDA kernels zeroed such rows).
"""
import pytest
import torch

from ltcl_fused.backends import get_engine
from ltcl_fused.engine.contract import dense_backward, dense_forward


@pytest.mark.parametrize("name", ["torch", "cpu", "triton", "cuda_emu"])
@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_backward_with_dominant_column_elsewhere(name, focal, bias):
    if name == "cuda_emu":  # the CUDA engine's kernels on the CPU emulator (tests/_cuda_emu.py)
        import _cuda_emu
        eng = _cuda_emu.engine()
    else:
        eng = get_engine(name)
    reason = eng.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(3)
    M, N, D = 7, 11, 5
    A = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    C = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    a_lab, c_lab = torch.randint(0, 3, (M,), generator=g), torch.randint(0, 3, (N,), generator=g)
    bs = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    bo = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    args = (A, C, a_lab, c_lab, -1, 2.0, bs, bo, 1.5, focal)
    st = dense_forward(*args)
    lse = st[0] + 0.7          # the whole row's lse: other blocks hold more mass
    top = torch.full((M,), -1, dtype=torch.int64)
    lrest = st[7] + 0.3
    coefs = [torch.randn(M, generator=g, dtype=torch.float64) for _ in range(5)]
    want = dense_backward(*args, lse, top, lrest, *coefs)
    got = eng.rowstats_backward(*args, lse, top, lrest, *coefs)
    assert want[0].abs().max() > 0.1  # the case is not trivially zero
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, rtol=1e-10, atol=1e-12)
