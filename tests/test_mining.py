"""Streaming hard-pair mining (ResCom, SPEC.md section 4) against the dense reference on every backend here.

Ties make indices ambiguous, so the checks compare the similarities of the selected keys (recomputed in
float64 from the returned indices) with those selected by ``ltcl_fused.reference.hard_pair_mining``, and
check that every returned index is a valid, distinct candidate of the right kind.
"""
import os

import pytest
import torch

import ltcl_fused as lf
from ltcl_fused import reference as R
from ltcl_fused.backends import mining_torch
from ltcl_fused.losses.rescom import resolve_mining

from _truth import K as TRUTH_K, assert_within, slack


def _available(backend):
    try:
        resolve_mining(backend, torch.device("cpu"), "test")
        return True
    except (lf.BackendUnavailable, NotImplementedError):
        return False


BACKENDS = ["torch", "triton", "cpu"]


def _backend_params():
    out = []
    for b in BACKENDS:
        marks = [] if _available(b) else [pytest.mark.skip(reason=f"backend {b!r} cannot mine here")]
        out.append(pytest.param(b, marks=marks))
    return out


def _problem(M, Q, D, C, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1)
    K = torch.nn.functional.normalize(torch.randn(Q, D, generator=g, dtype=torch.float64), dim=-1)
    if ties:  # many exactly repeated keys: equal similarities everywhere
        K = K[torch.randint(0, max(1, Q // 4), (Q,), generator=g)]
        A = A.round(decimals=1)
        K = K.round(decimals=1)
    a_lab = torch.randint(0, C, (M,), generator=g)
    k_lab = torch.randint(0, C, (Q,), generator=g)
    return A.to(dtype), a_lab, K.to(dtype), k_lab


def _sims(A, K, idx):
    """float64 similarities of the selected keys, -inf in padded (-1) slots."""
    s = torch.einsum("md,mkd->mk", A.double(), K.double()[idx.clamp(min=0)])
    return s.masked_fill(idx < 0, float("-inf"))


def _check_valid(idx, a_lab, k_lab, same):
    M, k = idx.shape
    assert idx.dtype == torch.int64
    ok = idx >= 0
    assert bool((idx[ok] < k_lab.numel()).all())
    match = (k_lab[idx.clamp(min=0)] == a_lab[:, None])
    assert bool((match == same)[ok].all()), "an index of the wrong class was selected"
    for r in range(M):
        row = idx[r][ok[r]]
        assert row.unique().numel() == row.numel(), "a key was selected twice"
        # padding only at the end
        assert bool(ok[r, :row.numel()].all())


def _compare(A, a_lab, K, k_lab, pos, neg, k_pos, k_neg, atol):
    """fp64: the selected similarities to ``atol``. fp32/bf16 (``atol`` None): the rule of tests/_truth.py on
    the sorted selected similarities: error vs the fp64 selection's <= K x that of the fp32 reference's
    selection + slack (the engines accumulate the similarities of 16-bit inputs in fp32); the order within
    a row up to K x the fp32 rounding of the similarities (measured) + slack."""
    rp, rn = R.hard_pair_mining(A.double(), a_lab, K.double(), k_lab, k_pos=k_pos, k_neg=k_neg)
    assert pos.shape == (A.shape[0], k_pos) and neg.shape == (A.shape[0], k_neg)
    _check_valid(pos, a_lab, k_lab, True)
    _check_valid(neg, a_lab, k_lab, False)
    sp, sn = _sims(A, K, pos), _sims(A, K, neg)
    if atol is None:
        lp, ln = R.hard_pair_mining(A.float(), a_lab, K.float(), k_lab, k_pos=k_pos, k_neg=k_neg)
        for what, got, low, tru in (("positives", sp, lp, rp), ("negatives", sn, ln, rn)):
            assert_within(got.sort(dim=1).values, _sims(A, K, low).sort(dim=1).values,
                          _sims(A, K, tru).sort(dim=1).values, what=f"similarities of the mined {what}",
                          dtype=torch.float32)
        s64 = A.double() @ K.double().T
        atol = TRUTH_K * float((A.float() @ K.float().T - s64).abs().max()) + \
            slack(torch.float32) * float(s64.abs().max())
    else:
        torch.testing.assert_close(sp.sort(dim=1).values, _sims(A, K, rp).sort(dim=1).values, atol=atol, rtol=0)
        torch.testing.assert_close(sn.sort(dim=1).values, _sims(A, K, rn).sort(dim=1).values, atol=atol, rtol=0)
    # the documented order: positives ascending, negatives descending in similarity (up to rounding)
    assert bool((sp.diff(dim=1) >= -atol).all()) and bool((sn.diff(dim=1) <= atol).all())


ATOL = {torch.float64: 1e-12, torch.float32: None}  # fp32: tests/_truth.py


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M,Q,D,C,k_pos,k_neg", [
    (1, 1, 1, 1, 1, 0),
    (5, 40, 3, 2, 1, 1),
    (37, 129, 17, 3, 4, 37),
    (19, 700, 8, 2, 200, 300),     # k in the hundreds, one tile of the Triton kernel at most a few
])
def test_matches_reference(backend, dtype, M, Q, D, C, k_pos, k_neg):
    if backend == "triton" and Q > 200 and dtype == torch.float32:
        pytest.skip("interpreter time: the large case runs once, in float64")
    A, a_lab, K, k_lab = _problem(M, Q, D, C, dtype, seed=M + Q)
    same = R.hard_pair_mining  # noqa: F841  (reference imported for clarity)
    cnt_same = (a_lab[:, None] == k_lab[None, :]).sum(1)
    k_pos = min(k_pos, int(cnt_same.min()))
    k_neg = min(k_neg, int((Q - cnt_same).min()))
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=k_pos, k_neg=k_neg, backend=backend)
    _compare(A, a_lab, K, k_lab, pos, neg, k_pos, k_neg, ATOL[dtype])


@pytest.mark.parametrize("backend", _backend_params())
def test_ties(backend):
    A, a_lab, K, k_lab = _problem(23, 90, 5, 3, torch.float64, seed=7, ties=True)
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=5, k_neg=20, backend=backend)
    _compare(A, a_lab, K, k_lab, pos, neg, 5, 20, 1e-12)


@pytest.mark.parametrize("tile", [1, 7, 64])
def test_torch_streaming_tiles(tile):
    """Many tile merges (tile smaller than k): the state must survive every merge."""
    A, a_lab, K, k_lab = _problem(9, 300, 6, 2, torch.float64, seed=tile)
    cnt = (a_lab[:, None] == k_lab[None, :]).sum(1)
    kp, kn = min(50, int(cnt.min())), min(120, int((300 - cnt).min()))
    pos, neg = mining_torch.mine(A, a_lab, K, k_lab, kp, kn, tile=tile)
    _compare(A, a_lab, K, k_lab, pos, neg, kp, kn, 1e-12)


def test_torch_low_precision_inputs():
    """bf16 inputs: similarities accumulated in fp32; the selection matches fp32 mining of the same values."""
    A, a_lab, K, k_lab = _problem(16, 200, 32, 4, torch.bfloat16, seed=3)
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=3, k_neg=30, backend="torch")
    _compare(A, a_lab, K, k_lab, pos, neg, 3, 30, None)


@pytest.mark.parametrize("backend", _backend_params() + ["reference"])
def test_fewer_candidates_raise(backend):
    A, a_lab, K, k_lab = _problem(6, 20, 4, 2, torch.float64, seed=1)
    a_lab[:] = 0
    k_lab[:] = 1
    k_lab[:3] = 0                                  # 3 same-class keys, 17 other-class keys
    with pytest.raises(ValueError, match="k_pos"):
        lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=4, k_neg=1, backend=backend)
    with pytest.raises(ValueError, match="k_neg"):
        lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=1, k_neg=18, backend=backend)
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=3, k_neg=17, backend=backend)  # exactly enough
    assert bool((pos >= 0).all()) and bool((neg >= 0).all())


@pytest.mark.parametrize("backend", _backend_params())
def test_allow_fewer_pads_with_minus_one(backend):
    A, a_lab, K, k_lab = _problem(8, 30, 4, 3, torch.float64, seed=2)
    k_lab[k_lab == 2] = 1                         # class 2 has no key at all
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=12, k_neg=25, backend=backend, allow_fewer=True)
    same = a_lab[:, None] == k_lab[None, :]
    _check_valid(pos, a_lab, k_lab, True)
    _check_valid(neg, a_lab, k_lab, False)
    for r in range(8):
        n_same, n_other = int(same[r].sum()), int((~same[r]).sum())
        assert int((pos[r] >= 0).sum()) == min(12, n_same)
        assert int((neg[r] >= 0).sum()) == min(25, n_other)
        if n_same <= 12:   # every candidate is returned
            assert set(pos[r][pos[r] >= 0].tolist()) == set(torch.nonzero(same[r]).flatten().tolist())
    # the rows that have enough candidates agree with the reference on those rows
    rows = (same.sum(1) >= 12) & ((~same).sum(1) >= 25)
    if rows.any():
        rp, rn = R.hard_pair_mining(A[rows], a_lab[rows], K, k_lab, k_pos=12, k_neg=25)
        torch.testing.assert_close(_sims(A[rows], K, pos[rows]), _sims(A[rows], K, rp))
        torch.testing.assert_close(_sims(A[rows], K, neg[rows]), _sims(A[rows], K, rn))


def test_empty_keys_and_zero_k():
    A, a_lab, K, k_lab = _problem(4, 10, 3, 2, torch.float32)
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=0, k_neg=0, backend="torch")
    assert pos.shape == (4, 0) and neg.shape == (4, 0) and pos.dtype == torch.int64
    pos, neg = lf.hard_pair_mining(A, a_lab, K[:0], k_lab[:0], k_pos=2, k_neg=1, backend="torch", allow_fewer=True)
    assert bool((pos == -1).all()) and bool((neg == -1).all())


def test_bad_arguments_name_the_argument():
    A, a_lab, K, k_lab = _problem(4, 10, 3, 2, torch.float32)
    cases = [
        (dict(k_pos=-1, k_neg=1), ValueError, "k_pos"),
        (dict(k_pos=1.5, k_neg=1), ValueError, "k_pos"),
        (dict(k_pos=1, k_neg=True), ValueError, "k_neg"),
        (dict(k_pos=1, k_neg=1, backend="gpu"), ValueError, "backend"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            lf.hard_pair_mining(A, a_lab, K, k_lab, **kw)
    with pytest.raises(ValueError, match="keys"):
        lf.hard_pair_mining(A, a_lab, K[:, :2], k_lab, k_pos=1, k_neg=1)
    with pytest.raises(TypeError, match="keys"):
        lf.hard_pair_mining(A, a_lab, K.double(), k_lab, k_pos=1, k_neg=1)
    with pytest.raises(ValueError, match="key_labels"):
        lf.hard_pair_mining(A, a_lab, K, k_lab[:5], k_pos=1, k_neg=1)
    with pytest.raises(TypeError, match="anchor_labels"):
        lf.hard_pair_mining(A, a_lab.float(), K, k_lab, k_pos=1, k_neg=1)
    with pytest.raises(ValueError, match="anchors"):
        lf.hard_pair_mining(A.clone().fill_(float("nan")), a_lab, K, k_lab, k_pos=1, k_neg=1)


def test_auto_on_cpu_is_exact():
    A, a_lab, K, k_lab = _problem(11, 80, 5, 3, torch.float64, seed=5)
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=2, k_neg=9)
    _compare(A, a_lab, K, k_lab, pos, neg, 2, 9, 1e-12)


@pytest.mark.parametrize("backend", [p for p in _backend_params() if p.values[0] == "triton"])
def test_triton_native_sort_path(backend, monkeypatch):
    """The GPU path (tl.topk + tl.bitonic_merge) under the interpreter, on small tiles (it is slow there);
    the other tests run the same network written with masked sums."""
    from ltcl_fused.losses.rescom import _triton_module
    tm = _triton_module()
    monkeypatch.setattr(tm, "NATIVE_SORT", True)
    monkeypatch.setattr(tm, "FORCE_CONFIG", tm.MiningConfig(16, 16, 16, 1, 1))
    A, a_lab, K, k_lab = _problem(20, 50, 17, 2, torch.float32, seed=11)
    cnt = (a_lab[:, None] == k_lab[None, :]).sum(1)
    kp, kn = min(3, int(cnt.min())), min(16, int((50 - cnt).min()))
    pos, neg = lf.hard_pair_mining(A, a_lab, K, k_lab, k_pos=kp, k_neg=kn, backend=backend)
    _compare(A, a_lab, K, k_lab, pos, neg, kp, kn, ATOL[torch.float32])
