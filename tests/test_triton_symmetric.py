"""The symmetric backward of the Triton engine (issue 12): when the anchors are the columns (C is A, the same
labels, self_offset = 0), ``rowstats_backward(..., symmetric=True)`` returns (dA + dC, None) from one
row-parallel kernel, ``rowstats_bwd_sym_kernel``: dX_i = inv_tau Σ_j (G_ij + G_ji) X_j.

Checked against the dense contract (``contract.dense_backward``, dA + dC) in fp64 (1e-10 relative) and fp32
(the fp64 truth, tests/_truth.py), under the interpreter: sizes that are not multiples of the blocks, many
tiles and D chunks (forced small configurations) and the single-chunk path, bias, focal with γ > 0 and γ = 0,
anchors without positives, one class, rows led by one column by tens of nats; then the decision in
``engine.function.row_stats`` and a loss end to end against the reference backend.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from ltcl_fused.backends import get_engine  # noqa: E402
from ltcl_fused.engine.contract import dense_backward, dense_forward  # noqa: E402

from _truth import assert_within  # noqa: E402

ENG = get_engine("triton")
DEVICE = torch.device("cpu") if ENG.unavailable_reason(torch.device("cpu")) is None else torch.device("cuda")
if ENG.unavailable_reason(DEVICE) is not None:  # pragma: no cover
    pytest.skip(f"triton engine unavailable: {ENG.unavailable_reason(DEVICE)}", allow_module_level=True)

from ltcl_fused.triton_kernels.configs import BlockConfig, KernelConfig  # noqa: E402

# chunked D (D > 32) with several row and column tiles; a single-chunk one
SMALL = KernelConfig(BlockConfig(16, 32, 32, 1, 1), BlockConfig(32, 16, 32, 1, 1), (), 0)
SINGLE = KernelConfig(BlockConfig(16, 16, 64, 1, 1), BlockConfig(16, 32, 64, 1, 1), (), 64)


def _problem(N, D, bias, labels="random", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64) * (scale / math.sqrt(D))
    if labels == "random":
        lab = torch.randint(0, 3, (N,), generator=g)
        lab[: N // 4] = 100 + torch.arange(N // 4)  # anchors without positives
    elif labels == "one":
        lab = torch.zeros(N, dtype=torch.int64)
    else:  # "unique": no positives at all
        lab = torch.arange(N)
    bs = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    bo = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    coefs = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(5)]
    for c in coefs[:4]:
        c[::3] = 0.0
    return X, lab, bs, bo, coefs


def _cast(t, dt):
    return None if t is None else t.to(dt)


def _sym(X, lab, inv_tau, bs, bo, gamma, focal, st, coefs):
    d = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = ENG.rowstats_backward(d(X), d(X), d(lab), d(lab), 0, inv_tau, d(bs), d(bo), gamma, focal,
                                *[d(t) for t in st], *[d(c) for c in coefs], symmetric=True)
    assert len(out) == 2 and out[1] is None
    return out[0].cpu()


def _dense_sum(X, lab, inv_tau, bs, bo, gamma, focal, st, coefs):
    dA, dC = dense_backward(X, X, lab, lab, 0, inv_tau, bs, bo, gamma, focal, *st, *coefs)
    return dA + dC


def _check(N, D, bias, focal, gamma, dtype, labels="random", scale=1.0, tau=0.3, seed=0):
    X, lab, bs, bo, coefs = _problem(N, D, bias, labels, scale, seed)
    inv_tau = 1.0 / tau
    ref = dense_forward(X, X, lab, lab, 0, inv_tau, bs, bo, gamma, focal)
    if focal:  # the chain rule's rt: the dominant negative's f⁻ (as engine.function computes it)
        top = ref[6]
        top_neg = (top >= 0) & (lab[top.clamp(min=0)] != lab)
        coefs[4] = torch.where(top_neg, coefs[2], torch.zeros_like(coefs[2]))
    st = (ref[0], ref[6], ref[7])
    truth = _dense_sum(X, lab, inv_tau, bs, bo, gamma, focal, st, coefs)
    if dtype == torch.float64:
        got = _sym(X, lab, inv_tau, bs, bo, gamma, focal, st, coefs)
        assert got.dtype == torch.float64 and got.shape == truth.shape
        err = (got - truth).abs().max() / truth.abs().max().clamp(min=1e-30)
        assert err <= 1e-10, f"relative max error {err:.2e} > 1e-10"
        return got, truth
    low = lambda t: None if t is None else (t.to(dtype) if t.is_floating_point() else t)  # noqa: E731
    args = (X.to(dtype), lab, inv_tau, _cast(bs, dtype), _cast(bo, dtype), gamma, focal,
            (low(st[0]), st[1], low(st[2])), [low(c) for c in coefs])
    got = _sym(*args)
    same = _dense_sum(*args)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_within(got, same, truth, what="dX")
    return got, truth


# (N, D, bias, focal, gamma)
CASES = [
    (1, 3, True, True, 2.0),       # a single anchor: empty row, zero gradient
    (2, 3, True, True, 0.5),       # one valid column per row: p = 1 exactly
    (37, 17, False, False, 0.0),   # SupCon
    (37, 17, True, True, 0.5),
    (45, 70, False, True, 0.0),    # ACL-like γ = 0
    (70, 40, True, True, 2.0),
]
IDS = lambda c: "N{}D{}{}{}g{}".format(c[0], c[1], "_bias" if c[2] else "", "_focal" if c[3] else "", c[4])  # noqa


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp64_vs_contract(case):
    _check(*case, dtype=torch.float64)


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5]], ids=IDS)
def test_fp32_vs_truth(case):
    _check(*case, dtype=torch.float32)


@pytest.mark.parametrize("cfg", ["small", "single"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_block_paths(force_config, cfg, dtype):
    """Sizes that are not multiples of the blocks, several tiles; chunked D (read-modify-write) or one chunk."""
    force_config(SMALL if cfg == "small" else SINGLE)
    D = 70 if cfg == "small" else 50
    _check(37, D, True, True, 0.5, dtype)
    _check(21, D, False, False, 0.0, dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("labels", ["one", "unique"])
@pytest.mark.parametrize("focal,gamma", [(False, 0.0), (True, 2.0), (True, 0.0)])
def test_label_extremes(force_config, labels, focal, gamma, dtype):
    """One class (every other column a positive) and no positives at all (every anchor without one)."""
    force_config(SMALL)
    _check(33, 20, True, focal, gamma, dtype, labels=labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dominant_column(dtype):
    """Rows led by one column by tens of nats (lrest from the other columns, rt of a dominant negative)."""
    _check(37, 8, True, True, 0.5, dtype, scale=3.0, tau=0.1)
    _check(30, 8, False, True, 0.0, dtype, scale=3.0, tau=0.1, seed=2)


def test_matches_the_general_kernels():
    """The symmetric kernel and dA + dC of the general pair agree (fp64, to rounding)."""
    X, lab, bs, bo, coefs = _problem(45, 30, True)
    st = dense_forward(X, X, lab, lab, 0, 2.0, bs, bo, 0.5, True)
    st = (st[0], st[6], st[7])
    dA, dC = ENG.rowstats_backward(X, X, lab, lab, 0, 2.0, bs, bo, 0.5, True, *st, *coefs)
    got = _sym(X, lab, 2.0, bs, bo, 0.5, True, st, coefs)
    torch.testing.assert_close(got, dA + dC, rtol=1e-12, atol=1e-12)


def test_rejects_a_rectangular_problem():
    X, lab, bs, bo, coefs = _problem(6, 4, False)
    st = dense_forward(X, X[:4], lab, lab[:4], 0, 2.0, None, None, 0.0, False)
    with pytest.raises(ValueError, match="symmetric"):
        ENG.rowstats_backward(X[:4], X, lab[:4], lab, 0, 2.0, None, None, 0.0, False, st[0][:4], st[6][:4],
                              st[7][:4], *[c[:4] for c in coefs], symmetric=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_row_stats_decides(monkeypatch, dtype):
    """engine.function.row_stats asks for the symmetric backward exactly when C is A, c_lab is a_lab,
    self_offset == 0 and the engine lists "rowstats" in symmetric_ops; the gradient is the same either way."""
    from ltcl_fused.engine.function import row_stats
    assert "rowstats" in ENG.symmetric_ops
    seen = []
    orig = type(ENG).rowstats_backward

    def spy(self, *a, **kw):
        seen.append(kw.get("symmetric", False))
        return orig(self, *a, **kw)

    monkeypatch.setattr(type(ENG), "rowstats_backward", spy)
    g = torch.Generator().manual_seed(3)
    X0 = torch.randn(29, 12, generator=g, dtype=torch.float64).to(dtype)
    lab = torch.randint(0, 4, (29,), generator=g)
    grads = []
    for kind in ("same", "copy", "offset"):
        X = X0.clone().to(DEVICE).requires_grad_()
        labs = lab.to(DEVICE)
        C = X if kind != "copy" else X.clone()
        so = 0 if kind != "offset" else -1
        st = row_stats(ENG, X, C, labs, labs, self_offset=so, inv_tau=2.0, gamma=0.5, focal=True)
        (st.lse.sum() + 0.3 * st.pos_sum.sum() + 0.7 * st.fpos.sum() - 0.2 * st.fneg.sum()).backward()
        grads.append(X.grad.cpu())
    assert seen == [True, False, False]
    # the copy: dA + dC through two inputs (the same terms, summed in another order)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol * grads[1].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("loss", ["supcon", "afcl"])
def test_loss_end_to_end(monkeypatch, loss, dtype):
    """SupCon and AFCL (γ = 2, η = 0.5) with contrast_mode="all" (every row an anchor, no reference rows): the
    symmetric path, against the reference backend in fp64."""
    import ltcl_fused
    seen = []
    orig = type(ENG).rowstats_backward

    def spy(self, *a, **kw):
        seen.append(kw.get("symmetric", False))
        return orig(self, *a, **kw)

    monkeypatch.setattr(type(ENG), "rowstats_backward", spy)
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(24, 2, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (24,), generator=g)

    def run(backend, x):
        f = x.clone().to(DEVICE if backend == "triton" else "cpu").requires_grad_()
        if loss == "supcon":
            val = ltcl_fused.supcon(f, labels.to(f.device), temperature=0.2, backend=backend)
        else:
            val = ltcl_fused.afcl(f, labels.to(f.device), temperature=0.2, gamma=2.0, eta=0.5, backend=backend)
        val.backward()
        return val.detach().cpu(), f.grad.cpu()

    got = run("triton", feats.to(dtype))
    assert seen == [True]
    truth = run("reference", feats)
    if dtype == torch.float64:
        torch.testing.assert_close(got[0], truth[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], truth[1], rtol=1e-10, atol=1e-10)
    else:
        same = run("reference", feats.to(dtype))
        assert_within(got[0], same[0], truth[0], what="loss", floor=1.0)
        assert_within(got[1], same[1], truth[1], what="gradient")
