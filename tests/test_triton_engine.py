"""Triton engine vs the dense contract oracle, under the Triton interpreter (CPU tensors).

Forward statistics (lse, pos_sum, fpos, fneg, upos, uneg, top, lrest) and the backward (dA, dC) of
``ltcl_fused/engine/contract.py`` for shapes that are not multiples of any block, rectangular
anchors × columns with and without a self column, bias on/off, focal on/off, γ ∈ {0, 0.5, 2},
random coefficients (some exactly 0), both the single-chunk and the chunked-D kernel paths.
"""
import math

import pytest
import torch

pytest.importorskip("triton")
# numpy warns about exp overflow / log(0) inside masked-out lanes of the interpreter's tiles
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

from ltcl_fused.backends import get_engine  # noqa: E402
from ltcl_fused.engine.contract import dense_backward, dense_forward  # noqa: E402

from _truth import check  # noqa: E402

ENG = get_engine("triton")
# CPU tensors under the interpreter (CI); CUDA tensors when run on a GPU machine with TRITON_INTERPRET=0
DEVICE = torch.device("cpu") if ENG.unavailable_reason(torch.device("cpu")) is None else torch.device("cuda")
if ENG.unavailable_reason(DEVICE) is not None:  # pragma: no cover
    pytest.skip(f"triton engine unavailable: {ENG.unavailable_reason(DEVICE)}", allow_module_level=True)


def _fwd(*args):
    out = ENG.rowstats_forward(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    return tuple(o.cpu() for o in out)


def _bwd(*args):
    out = ENG.rowstats_backward(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    return tuple(o.cpu() for o in out)

from ltcl_fused.triton_kernels.configs import BlockConfig, KernelConfig  # noqa: E402

# small tiles: several row/column tiles and D chunks even on small shapes (chunked-D path when D > 32)
SMALL = KernelConfig(BlockConfig(16, 32, 32, 1, 1), BlockConfig(32, 16, 32, 1, 1), (), 0)
# single-chunk path with several tiles
SINGLE = KernelConfig(BlockConfig(16, 16, 64, 1, 1), BlockConfig(16, 32, 64, 1, 1), (), 64)


def _problem(M, N, D, self_offset, bias, n_cls=3, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(M, D, generator=g, dtype=torch.float64) * (scale / math.sqrt(D))
    C = torch.randn(N, D, generator=g, dtype=torch.float64) * (scale / math.sqrt(D))
    a_lab = torch.randint(0, n_cls, (M,), generator=g)
    c_lab = torch.randint(0, n_cls, (N,), generator=g)
    if self_offset >= 0:  # anchors are columns self_offset.. of C
        C[self_offset:self_offset + M] = A
        c_lab[self_offset:self_offset + M] = a_lab
    bs = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    bo = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    coefs = [torch.randn(M, generator=g, dtype=torch.float64) for _ in range(5)]
    for c in coefs[:4]:
        c[::3] = 0.0  # zero coefficients must contribute exactly 0
    return A, C, a_lab, c_lab, bs, bo, coefs


def _cast(t, dt):
    return None if t is None else (t.to(dt) if t.is_floating_point() else t)


def _check(M, N, D, so, bias, focal, gamma, dtype, scale=1.0, seed=0, tau=0.3):
    A, C, al, cl, bs, bo, coefs = _problem(M, N, D, so, bias, scale=scale, seed=seed)
    args = lambda dt: (A.to(dt), C.to(dt), al, cl, so, 1.0 / tau, _cast(bs, dt), _cast(bo, dt), gamma, focal)  # noqa
    names = ("lse", "pos_sum", "fpos", "fneg", "upos", "uneg", "top", "lrest")
    fp64 = dtype == torch.float64
    if fp64:
        out = _fwd(*args(dtype))
    else:  # fp32: against the fp64 truth, bounded by the fp32 dense oracle's error (tests/_truth.py); the
        # same-dtype oracle decides which statistics may over/underflow (e.g. rest -> 0 past ~100 nats)
        fl = lambda A, C, bs, bo: (A, C, al, cl, so, 1.0 / tau, bs, bo, gamma, focal)  # noqa: E731
        out, _ = check(lambda *x: _fwd(*fl(*x)), lambda *x: dense_forward(*fl(*x)),
                       [A.to(dtype), C.to(dtype), _cast(bs, dtype), _cast(bo, dtype)], grad=False, names=names)
    ref = dense_forward(*args(torch.float64))
    assert len(out) == 8
    assert out[6].dtype == torch.int64 and (not fp64 or torch.equal(out[6], ref[6])), "dominant column (top) differs"
    for name, o, r in zip(names, out, ref):
        if name == "top":
            continue
        assert o.dtype == (torch.float64 if fp64 else torch.float32), name
        if fp64:
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=name)  # the contract never makes NaN
    # backward from the exact statistics with random coefficients
    st = (ref[0], ref[6], ref[7])
    if fp64:
        g = _bwd(*args(dtype), *st, *coefs)
    else:
        top = ref[6]
        bl = lambda A, C, bs, bo, lse, lrest, *co: fl(A, C, bs, bo) + (lse, top, lrest) + co  # noqa: E731
        g, _ = check(lambda *x: _bwd(*bl(*x)), lambda *x: dense_backward(*bl(*x)),
                     [A.to(dtype), C.to(dtype), _cast(bs, dtype), _cast(bo, dtype), ref[0].float(), ref[7].float(),
                      *[c.float() for c in coefs]], grad=False, names=("dA", "dC"), value_floor=0)
    gr = dense_backward(*args(torch.float64), *st, *coefs)
    for name, o, r in zip(("dA", "dC"), g, gr):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        if fp64:
            err = (o - r).abs().max() / r.abs().max().clamp(min=1e-30)
            assert err <= 1e-10, f"{name}: relative max error {err:.2e} > 1e-10"


# (M, N, D, self_offset, bias, focal, gamma)
CASES = [
    (1, 1, 3, 0, True, True, 2.0),       # a single anchor: empty row, lse = -inf, zero gradients
    (2, 2, 3, 0, True, True, 0.5),       # one valid column per row: p = 1 exactly
    (37, 37, 17, 0, False, False, 0.0),
    (37, 37, 17, 0, True, True, 0.5),
    (29, 129, 64, 0, False, True, 0.0),  # rectangular, anchors = first columns
    (29, 129, 130, -1, True, True, 2.0),  # rectangular, no self column, D > one chunk
    (129, 129, 3, 0, True, False, 0.0),
    (300, 300, 17, 0, False, True, 2.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}N{}D{}so{}{}{}g{}".format(
    c[0], c[1], c[2], c[3], "_bias" if c[4] else "", "_focal" if c[5] else "", c[6]))
def test_fp64_vs_contract(case):
    _check(*case, dtype=torch.float64)


@pytest.mark.parametrize("case", [CASES[3], CASES[5], (64, 100, 64, 36, True, True, 0.5)], ids=str)
def test_fp32_vs_contract(case):
    _check(*case, dtype=torch.float32)


@pytest.mark.parametrize("cfg", ["small", "single"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_block_paths(force_config, cfg, dtype):
    """Many tiles and D chunks on small shapes: chunked-D read-modify-write and the single-chunk path."""
    force_config(SMALL if cfg == "small" else SINGLE)
    D = 70 if cfg == "small" else 50
    _check(37, 70, D, 0, True, True, 0.5, dtype)
    _check(21, 45, D, -1, False, True, 0.0, dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dominant_column(dtype):
    """Rows led by one column by tens of nats: log(1 − p) of the top column from lrest, rt in the backward."""
    _check(37, 50, 8, 0, True, True, 0.5, dtype, scale=3.0, tau=0.1)  # leads up to ~56 nats
    _check(20, 33, 8, -1, False, True, 0.0, dtype, scale=3.0, tau=0.1, seed=2)


def test_ties_first_argmax(force_config):
    """Equal maxima in different column tiles: top is the first one, as in the contract."""
    force_config(SMALL)
    A = torch.ones(3, 4, dtype=torch.float64)
    C = torch.ones(70, 4, dtype=torch.float64)
    lab = torch.zeros(70, dtype=torch.int64)
    out = _fwd(A, C, lab[:3], lab, -1, 2.0, None, None, 0.5, True)
    ref = dense_forward(A, C, lab[:3], lab, -1, 2.0, None, None, 0.5, True)
    assert torch.equal(out[6], ref[6]) and torch.equal(out[6], torch.zeros(3, dtype=torch.int64))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_noncontiguous_and_labels_dtype():
    A, C, al, cl, bs, bo, _ = _problem(20, 40, 9, -1, True)
    At = A.t().contiguous().t()  # column-major view of the same values
    Cs = torch.stack([C, C], 2)[..., 0]  # row stride 2·D, column stride 2
    out = _fwd(At, Cs, al.to(torch.int32), cl.to(torch.int32), -1, 2.0, bs, bo, 2.0, True)
    ref = dense_forward(A, C, al, cl, -1, 2.0, bs, bo, 2.0, True)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def test_unavailable_reason_one_line():
    assert ENG.name == "triton" and "rowstats" in ENG.ops
    assert ENG.unavailable_reason(DEVICE) is None
    r = ENG.unavailable_reason(torch.device("meta"))
    assert isinstance(r, str) and "\n" not in r


def test_large_d():
    """D = 2048: 32 chunks of the interpreter's 64-wide D tiles in every kernel."""
    _check(5, 9, 2048, 0, True, True, 0.5, torch.float64)
