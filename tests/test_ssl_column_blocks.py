"""The SSL contract on column blocks (operation "ssl_ranked", ltcl_fused/engine/ssl_contract.py): the columns
split into blocks handled by separate engine calls combine exactly into the whole-row statistics and
gradients (plain sets by log-sum-exp; the Bayesian ranks through every block's sorted set values merged
into a rank reference). Checked for the torch and cpu engines and the dense oracle against the dense
oracle on the undivided columns (fp64 1e-10; fp32 against the fp64 truth), with exact ties across blocks
and signed zeros. "cuda_emu" is the CUDA engine's kernels run by the CPU emulator (tests/_cuda_emu.py)."""

import pytest
import torch
import torch.nn.functional as F

from ltcl_fused import ext
from ltcl_fused.backends import get_engine
from ltcl_fused.engine.ssl_contract import (DenseSSLEngine, SSLConfig, combine_blocks, dense_backward,
                                            dense_forward, dense_set_values, merge_set_values)

F64, F32 = torch.float64, torch.float32

CONFIGS = {
    "neg": SSLConfig(),
    "hcl": SSLConfig(scales=(0.7, 1.7)),
    "bayes": SSLConfig(bayes=(0.5, 1.0, 0.1)),
    "bayes-a8b6": SSLConfig(bayes=(0.8, 0.6, 0.3)),
    "bayes-scale2": SSLConfig(scales=(2.0,), bayes=(0.6, 0.9, 0.1)),
    "bayes-omega0": SSLConfig(bayes=(1.0, 1.0, 0.1)),
    "mttv-both": SSLConfig(exclude_partner=False, filter="both", lower=0.1, upper=0.9),
    "mttv-low-self": SSLConfig(exclude_partner=False, include_self=True, filter="low", lower=0.2),
}
ENGINES = ("torch", "cpu", "cuda_emu", "dense")


def _engine(name):
    if name == "dense":
        return DenseSSLEngine()
    if name == "cuda_emu":
        import _cuda_emu
        return _cuda_emu.engine()
    if name == "cpu":
        reason = ext.unavailable_reason()
        if reason is not None:
            pytest.fail(f"the C++ extension does not build here: {reason}")
    return get_engine(name)


def _problem(M, N, D, dtype, seed, ties):
    """Anchors are the columns [off, off + M) (so they have self columns); partner = another column."""
    g = torch.Generator().manual_seed(seed)
    if ties:  # half-integers: exact products, exact ties between blocks (repeated rows), exact zeros
        base = torch.randint(-2, 3, (max(2, N // 4), D), generator=g).double() / 2
        C = base[torch.randint(0, base.shape[0], (N,), generator=g)]
    else:
        C = F.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    off = N - M - 3
    A = C[off:off + M].clone()
    partner = torch.randint(0, N, (M,), generator=g)
    partner[::5] = -1
    return A.to(dtype), C.to(dtype), partner, off


def _blocks(N, cuts):
    edges = [0] + list(cuts) + [N]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _rebase(partner, self_offset, M, a, b):
    """Partner and self offset of block [a, b); the contract needs all self columns in one block."""
    p = torch.where((partner >= a) & (partner < b), partner - a, torch.full_like(partner, -1))
    if self_offset < 0 or not a <= self_offset < b:
        assert self_offset < 0 or self_offset + M <= a or b <= self_offset
        return p, -1
    assert self_offset + M <= b
    return p, self_offset - a


def _blockwise(eng, A, C, partner, so, inv_tau, cfg, cuts, coef, cpos):
    """Statistics and gradients assembled from column blocks the way the ring does it."""
    blocks = _blocks(C.shape[0], cuts)
    parts = [(C[a:b].contiguous(),) + _rebase(partner, so, A.shape[0], a, b) for a, b in blocks]
    ref = None
    if cfg.bayes is not None:
        ref = merge_set_values([eng.ssl_set_values(A, Cb, pb, sob, inv_tau, cfg) for Cb, pb, sob in parts])
    st = combine_blocks([eng.ssl_forward(A, Cb, pb, sob, inv_tau, cfg, rank_ref=ref) for Cb, pb, sob in parts])
    dA = torch.zeros_like(A)
    dCs = []
    for Cb, pb, sob in parts:
        a_, c_ = eng.ssl_backward(A, Cb, pb, sob, inv_tau, cfg, st.lse, coef, cpos, rank_ref=ref)
        dA = dA + a_
        dCs.append(c_)
    return st, dA, torch.cat(dCs)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("ties", [False, True])
def test_blocks_combine_to_the_whole_row_fp64(engine, name, ties):
    cfg = CONFIGS[name]
    A, C, partner, so = _problem(23, 61, 6, F64, seed=hash((name, ties)) % 1000, ties=ties)
    inv_tau = 0.5 if ties else 2.0
    ref = dense_forward(A, C, partner, so, inv_tau, cfg)
    g = torch.Generator().manual_seed(3)
    coef = torch.randn(ref.lse.shape, generator=g, dtype=F64)
    coef[:, ::4] = 0
    cpos = torch.randn(A.shape[0], generator=g, dtype=F64)
    rA, rC = dense_backward(A, C, partner, so, inv_tau, cfg, ref.lse, coef, cpos)
    eng = _engine(engine)
    for cuts in ([20, 21, 30], [1], [34, 59]):  # uneven blocks, one-column blocks
        st, dA, dC = _blockwise(eng, A, C, partner, so, inv_tau, cfg, cuts, coef, cpos)
        for what, a, b in zip(("lse", "pos", "pos_in"), st, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what} {cuts}: {m}")
        torch.testing.assert_close(dA, rA, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dC, rC, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("engine", ["torch", "cpu", "cuda_emu"])
@pytest.mark.parametrize("name", ["bayes", "hcl", "mttv-both"])
def test_blocks_fp32_against_fp64_truth(engine, name):
    """fp32 blocks against the fp64 dense truth, no worse than the undivided fp32 dense oracle (plus slack)."""
    cfg = CONFIGS[name]
    A, C, partner, so = _problem(40, 90, 16, F64, seed=11, ties=False)
    truth = dense_forward(A, C, partner, so, 2.0, cfg)
    dense32 = dense_forward(A.float(), C.float(), partner, so, 2.0, cfg)
    base_err = (dense32.lse.double() - truth.lse).abs().max().item()
    eng = _engine(engine)
    coef = torch.ones_like(dense32.lse)
    cpos = torch.ones_like(dense32.pos)
    st, _, _ = _blockwise(eng, A.float(), C.float(), partner, so, 2.0, cfg, [30, 31, 45], coef, cpos)
    assert st.lse.dtype == F32
    err = (st.lse.double() - truth.lse).abs().max().item()
    assert err <= 4 * base_err + 2e-6, (err, base_err)


@pytest.mark.parametrize("engine", ENGINES)
def test_ranked_with_own_values_is_the_plain_call_exactly(engine):
    """rank_ref = this block's own set values reproduces the plain Bayesian call bit for bit (ties included)."""
    eng = _engine(engine)
    for ties in (False, True):
        for dt in (F64, F32):
            A, C, partner, so = _problem(30, 50, 5, dt, seed=7, ties=ties)
            for cfg in (CONFIGS["bayes"], CONFIGS["bayes-scale2"]):
                plain = eng.ssl_forward(A, C, partner, so, 0.5, cfg)
                ref = merge_set_values([eng.ssl_set_values(A, C, partner, so, 0.5, cfg)])
                ranked = eng.ssl_forward(A, C, partner, so, 0.5, cfg, rank_ref=ref)
                assert torch.equal(plain.lse, ranked.lse), (engine, ties, dt)
                coef, cpos = torch.ones_like(plain.lse), torch.ones_like(plain.pos)
                for x, y in zip(eng.ssl_backward(A, C, partner, so, 0.5, cfg, plain.lse, coef, cpos),
                                eng.ssl_backward(A, C, partner, so, 0.5, cfg, plain.lse, coef, cpos, rank_ref=ref)):
                    assert torch.equal(x, y), (engine, ties, dt)


@pytest.mark.parametrize("engine", ["torch", "cpu", "cuda_emu"])
def test_set_values_match_the_oracle(engine):
    eng = _engine(engine)
    for name in ("bayes", "mttv-both", "mttv-low-self"):
        cfg = CONFIGS[name]
        A, C, partner, so = _problem(19, 44, 4, F64, seed=5, ties=True)
        v, c = eng.ssl_set_values(A, C, partner, so, 0.5, cfg)
        rv, rc = dense_set_values(A, C, partner, so, 0.5, cfg)
        assert v.dtype == F64 and c.dtype == torch.int64 and v.shape == rv.shape
        assert torch.equal(c, rc)
        assert torch.equal(v, rv)  # exact: half-integer products


def test_signed_zeros_tie_across_blocks():
    """-0.0 in one block and +0.0 in another are the same value: they share a rank."""
    A = torch.tensor([[1.0], [2.0]], dtype=F64)
    C = torch.tensor([[-0.0], [1.0], [0.0], [-1.0], [-0.0], [0.5], [0.0]], dtype=F64)
    partner = torch.tensor([5, -1])
    cfg = SSLConfig(bayes=(0.7, 0.6, 0.2))
    want = dense_forward(A, C, partner, -1, 1.0, cfg)
    for engine in ENGINES:
        eng = _engine(engine)
        for dt in (F64, F32):
            st, _, _ = _blockwise(eng, A.to(dt), C.to(dt), partner, -1, 1.0, cfg, [1, 3, 4],
                                  torch.ones(1, 2, dtype=dt), torch.ones(2, dtype=dt))
            torch.testing.assert_close(st.lse, want.lse.to(st.lse.dtype), rtol=1e-6, atol=1e-12)


def test_cpu_ranked_ops_reject_bad_references():
    _engine("cpu")
    A, C, partner, so = _problem(6, 12, 3, F64, seed=1, ties=False)
    args = (so, 1.0, [1.0], True, False, 0, 0.0, 1.0, [0.5, 1.0, 0.1])
    ok_ref, ok_n = torch.zeros(6, 4, dtype=F64), torch.full((6,), 4)
    with pytest.raises(RuntimeError, match="rank_ref"):
        torch.ops.ltcl_fused.ssl_fwd_ranked(A, C, partner, *args, ok_ref[:3], ok_n)
    with pytest.raises(RuntimeError, match="rank_n"):
        torch.ops.ltcl_fused.ssl_fwd_ranked(A, C, partner, *args, ok_ref, torch.full((6,), 5))
    with pytest.raises(RuntimeError, match="bayes"):
        torch.ops.ltcl_fused.ssl_fwd_ranked(A, C, partner, so, 1.0, [1.0], True, False, 0, 0.0, 1.0, [], ok_ref,
                                            ok_n)


def test_opcheck_column_block_ops():
    """Schemas, fake kernels (ltcl_fused/ext.py) and dispatch of the CPU ranked ops."""
    _engine("cpu")
    A, C, partner, so = _problem(9, 14, 3, F64, seed=2, ties=False)
    sv = (A, C, partner, so, 0.5, True, False, 0, 0.0, 1.0)
    torch.library.opcheck(torch.ops.ltcl_fused.ssl_set_values.default, sv)
    ref = merge_set_values([torch.ops.ltcl_fused.ssl_set_values(*sv)])
    args = (A, C, partner, so, 0.5, [1.0], True, False, 0, 0.0, 1.0, [0.6, 0.9, 0.2], *ref)
    torch.library.opcheck(torch.ops.ltcl_fused.ssl_fwd_ranked.default, args)
    lse = torch.ops.ltcl_fused.ssl_fwd_ranked(*args)[0]
    torch.library.opcheck(torch.ops.ltcl_fused.ssl_bwd_ranked.default,
                          args + (lse, torch.randn(lse.shape, dtype=F64), torch.randn(9, dtype=F64)))
