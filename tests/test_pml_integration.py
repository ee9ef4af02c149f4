"""ltcl_fused.integrations.pml.SupConLoss against pytorch-metric-learning's SupConLoss itself.

fp64: values and gradients equal PML's fp64 to ~1e-12. fp32: the error of our fp32 result against PML in
fp64 (the truth) is at most a few times PML's own fp32 error, plus a few ulps of slack. Cases cover
shapes, ``ref_emb`` (with and without PML's same-labels-object rule), exact ties, anchors without
positives, batches that PML reduces to its zero loss, and label dtypes.
"""
from __future__ import annotations

import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ltcl_fused.integrations.pml import SupConLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

BACKENDS = ["auto", "torch"]


def _case(name, dtype=torch.float64):
    """(embeddings, labels, ref_emb or None, ref_labels or None) of a named case (float64 leaves)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # not hash(): salted per process
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    lab = lambda n, c: torch.randint(0, c, (n,), generator=g)  # noqa: E731
    if name == "small":
        return rnd(7, 4), lab(7, 3), None, None
    if name == "two":
        return rnd(2, 3), torch.tensor([1, 1]), rnd(3, 3), torch.tensor([1, 0, 1])
    if name == "medium":
        return rnd(64, 16), lab(64, 10), None, None
    if name == "large_d":
        return rnd(150, 70) * 3.0, lab(150, 5), None, None
    if name == "no_positive_anchors":
        y = torch.arange(20)
        y[:6] = torch.tensor([0, 0, 1, 1, 1, 2])  # 14 anchors have no positive
        return rnd(20, 8), y, None, None
    if name == "ties":  # duplicated rows and integer features: exactly tied similarities
        x = torch.randint(-2, 3, (12, 5), generator=g).to(torch.float64)
        x[x.abs().sum(1) == 0, 0] = 1.0
        x = torch.cat([x, x[:6]])
        return x, lab(18, 3), None, None
    if name == "ref":
        return rnd(20, 6), lab(20, 4), rnd(13, 6), lab(13, 4)
    if name == "ref_single_anchor":
        return rnd(1, 6), torch.tensor([2]), rnd(5, 6), torch.tensor([2, 0, 2, 1, 3])
    if name == "ref_bank":
        return rnd(32, 8), lab(32, 6), rnd(100, 8), lab(100, 6)
    if name == "ref_no_positive_anchors":
        return rnd(10, 4), torch.arange(10), rnd(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    if name == "ref_ties":
        x = torch.randint(-1, 2, (9, 4), generator=g).to(torch.float64)
        x[x.abs().sum(1) == 0, 0] = 1.0
        return x, lab(9, 2), torch.cat([x, x[:3]]), lab(12, 2)
    raise KeyError(name)


CASES = ["small", "two", "medium", "large_d", "no_positive_anchors", "ties", "ref", "ref_single_anchor",
         "ref_bank", "ref_no_positive_anchors", "ref_ties"]


def _run(loss_fn, x, y, r, ry, same_label_object=False, dtype=torch.float64):
    x = x.to(dtype).requires_grad_()
    leaves = [x]
    kw = {}
    if r is not None:
        r = r.to(dtype).requires_grad_()
        leaves.append(r)
        kw = dict(ref_emb=r, ref_labels=y if same_label_object else ry)
    out = loss_fn(x, y, **kw)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]


def _assert_close(a, b, atol, rtol=0.0):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_fp64_equals_pml(case, temperature, backend):
    x, y, r, ry = _case(case)
    v_pml, g_pml = _run(pml_losses.SupConLoss(temperature=temperature), x, y, r, ry)
    v_lf, g_lf = _run(SupConLoss(temperature=temperature, backend=backend), x, y, r, ry)
    assert float(v_pml) > 0  # a real loss, not PML's zero
    _assert_close(v_lf, v_pml, atol=1e-12, rtol=1e-12)
    for a, b in zip(g_lf, g_pml):
        _assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert float(g_lf[0].abs().sum()) > 0


@pytest.mark.parametrize("case", ["ref", "ref_ties", "ref_single_anchor"])
def test_same_labels_object_drops_the_diagonal_as_pml_does(case):
    """PML leaves column i out for anchor i when ``ref_labels is labels`` (needs as many refs as anchors)."""
    x, y, r, _ = _case(case)
    r = r[: x.shape[0]] if r.shape[0] >= x.shape[0] else torch.cat([r, r])[: x.shape[0]]
    for same in (True, False):
        ry = y if same else y.clone()
        v_pml, g_pml = _run(pml_losses.SupConLoss(0.2), x, y, r, ry, same_label_object=same)
        v_lf, g_lf = _run(SupConLoss(0.2), x, y, r, ry, same_label_object=same)
        _assert_close(v_lf, v_pml, atol=1e-12, rtol=1e-12)
        for a, b in zip(g_lf, g_pml):
            _assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_ref_emb_is_embeddings_with_a_copy_of_the_labels_keeps_self_as_positive():
    x, y, _, _ = _case("small")
    x = x.requires_grad_()
    outs = []
    for f in (pml_losses.SupConLoss(0.1), SupConLoss(0.1)):
        v = f(x, y, ref_emb=x, ref_labels=y.clone())
        outs.append((v.detach(), torch.autograd.grad(v, [x])[0]))
    _assert_close(outs[1][0], outs[0][0], atol=1e-12, rtol=1e-12)
    _assert_close(outs[1][1], outs[0][1], atol=1e-12, rtol=1e-10)
    assert not torch.allclose(outs[1][0], SupConLoss(0.1)(x, y).detach())  # differs from the no-ref loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["small", "medium", "large_d", "ties", "ref", "ref_bank", "no_positive_anchors"])
def test_fp32_error_against_fp64_truth_is_no_worse_than_pml_fp32(case, backend):
    x, y, r, ry = _case(case)
    truth_v, truth_g = _run(pml_losses.SupConLoss(0.1), x, y, r, ry)
    p32_v, p32_g = _run(pml_losses.SupConLoss(0.1), x, y, r, ry, dtype=torch.float32)
    l32_v, l32_g = _run(SupConLoss(0.1, backend=backend), x, y, r, ry, dtype=torch.float32)
    assert l32_v.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps

    def err(a, b):
        return float((a.double() - b).abs().max())
    assert err(l32_v, truth_v) <= 4 * err(p32_v, truth_v) + 8 * eps * float(truth_v.abs())
    for lg, pg, tg in zip(l32_g, p32_g, truth_g):
        assert err(lg, tg) <= 4 * err(pg, tg) + 8 * eps * float(tg.abs().max())


@pytest.mark.parametrize("name,x,y,r,ry", [
    ("no_positive_pair", torch.randn(6, 3, dtype=torch.float64), torch.arange(6), None, None),
    ("no_negative_pair", torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.int64), None, None),
    ("one_pair_each", torch.randn(1, 3, dtype=torch.float64), torch.tensor([0]), torch.randn(2, 3, dtype=torch.float64),
     torch.tensor([0, 1])),
    ("single_sample", torch.randn(1, 3, dtype=torch.float64), torch.tensor([4]), None, None),
    ("ref_only_negatives", torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1]),
     torch.randn(3, 3, dtype=torch.float64), torch.tensor([2, 3, 4])),
])
def test_batches_pml_reduces_to_zero(name, x, y, r, ry):
    v_pml, g_pml = _run(pml_losses.SupConLoss(0.1), x, y, r, ry)
    v_lf, g_lf = _run(SupConLoss(0.1), x, y, r, ry)
    assert float(v_pml) == 0.0 and torch.equal(v_lf, v_pml)
    for a, b in zip(g_lf, g_pml):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("labels", [torch.tensor([0., 1., 0., 2., 1., 1.5]), torch.tensor([10**12, 3, 10**12, 3, 7, 7]),
                                    torch.tensor([True, False, True, True, False, False])])
def test_label_dtypes_as_pml(labels):
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _assert_close(SupConLoss(0.2)(x, labels), pml_losses.SupConLoss(0.2)(x, labels), atol=1e-12, rtol=1e-12)


def test_triton_engine_under_the_interpreter():
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    pytest.importorskip("triton")
    x, y, r, ry = _case("ref")
    v_pml, g_pml = _run(pml_losses.SupConLoss(0.1), x, y, r, ry)
    v_lf, g_lf = _run(SupConLoss(0.1, backend="triton"), x, y, r, ry)
    _assert_close(v_lf, v_pml, atol=1e-10, rtol=1e-10)
    for a, b in zip(g_lf, g_pml):
        _assert_close(a, b, atol=1e-10, rtol=1e-9)


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_engine_never_forms_the_similarity_matrix(backend):
    N, R = 1100, 1200
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g).requires_grad_()
    r = torch.randn(R, 8, generator=g).requires_grad_()
    y, ry = torch.randint(0, 20, (N,), generator=g), torch.randint(0, 20, (R,), generator=g)
    rec = _Largest()
    with rec:
        SupConLoss(0.1, backend=backend)(x, y, ref_emb=r, ref_labels=ry).backward()
    assert 0 < rec.largest < N * R
    rec = _Largest()  # and the recorder does see PML's dense matrix
    with rec:
        pml_losses.SupConLoss(0.1)(x, y, ref_emb=r, ref_labels=ry)
    assert rec.largest >= N * R


def test_result_dtype_follows_the_embeddings_like_pml():
    x, y, _, _ = _case("small")
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        assert SupConLoss(0.1)(x.to(dt), y).dtype == pml_losses.SupConLoss(0.1)(x.to(dt), y).dtype == dt


def test_unsupported_calls_raise_one_clear_error():
    x, y, r, ry = _case("ref")
    f = SupConLoss(0.1)
    a = torch.arange(3)
    with pytest.raises(ValueError, match="`indices_tuple` is not supported"):
        f(x, y, indices_tuple=(a, a, a))
    with pytest.raises(ValueError, match="`labels` are required"):
        f(x)
    with pytest.raises(ValueError, match="`ref_labels` are required with `ref_emb`"):
        f(x, y, ref_emb=r)
    with pytest.raises(ValueError, match="`ref_labels` given without `ref_emb`"):
        f(x, y, ref_labels=ry)
    with pytest.raises(ValueError, match=r"`labels` must have shape \[20\]"):
        f(x, y[:5])
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = x.clone()
        bad[3, 1] = float("nan")
        f(bad, y)
    with pytest.raises(TypeError, match="'distance', 'reducer' not supported"):
        SupConLoss(0.1, distance=None, reducer=None)
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        SupConLoss(0.0)


def test_docstring_lists_the_differences_and_the_unsupported_indices_tuple():
    doc = SupConLoss.__doc__
    for phrase in ("normalis", "ref_emb", "without positives", "indices_tuple", "lf.supcon", "is the very same tensor object"):
        assert phrase in doc, phrase


def test_same_constructor_and_forward_signature_as_pml():
    import inspect
    ours, theirs = inspect.signature(SupConLoss.forward), inspect.signature(pml_losses.SupConLoss.forward)
    assert list(ours.parameters) == list(theirs.parameters)
    assert inspect.signature(SupConLoss).parameters["temperature"].default == \
        inspect.signature(pml_losses.SupConLoss).parameters["temperature"].default
