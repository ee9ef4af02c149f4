"""Issue 13 items 5-8 and the value checks: the ResCom utilities validate their inputs with errors naming the
argument; value checks raise with check_finite=True and, with check_finite=False (no host read), make the
loss NaN instead of a silent wrong number; siamese_balanced_softmax computes its log-prior in fp32."""
import math

import pytest
import torch

import ltcl_fused as lf
from loss_cases import C, FUSED, problem, require

SBS = lf.siamese_balanced_softmax


def _raises(exc, argname, fn, *a, **kw):
    with pytest.raises(exc) as ei:
        fn(*a, **kw)
    assert f"`{argname}`" in str(ei.value), str(ei.value)
    return str(ei.value)


def _balanced_ce(logits, labels, counts):
    """CE(logits + log(n_c / Σn + 1e-9)) per row, in Python floats (an independent transcription of SPEC)."""
    tot = float(sum(counts))
    out = []
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        z = [v + math.log(n / tot + 1e-9) for v, n in zip(row, counts)]
        m = max(z)
        out.append(m + math.log(sum(math.exp(v - m) for v in z)) - z[y])
    return out


# --- item 5: fp16 logits and counts past 65504 ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_balanced_softmax_log_prior_in_fp32(dtype):
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    counts = [60000, 6000, 600]  # Σn = 66600 > 65504, the fp16 maximum; 600/66600 + 1e-9 needs fp32
    out = SBS(logits, y, torch.tensor(counts), reduction="none")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    truth = torch.tensor(_balanced_ce(logits, y, counts), dtype=torch.float64)
    torch.testing.assert_close(out.double(), truth, rtol=1e-6, atol=1e-6)  # the logits are exact in fp32
    torch.testing.assert_close(SBS(logits, y, counts).double(), truth.mean(), rtol=1e-6, atol=1e-6)


def test_balanced_softmax_zero_count_is_spec_log_of_1e9():
    logits = torch.tensor([[0.5, -0.25, 1.0], [0.0, 2.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    out = SBS(logits, y, [0, 4, 6], reduction="none")  # class 0 has no sample: log(0 + 1e-9), finite
    torch.testing.assert_close(out, torch.tensor(_balanced_ce(logits, y, [0, 4, 6]), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(out).all())


# --- item 6: siamese_balanced_softmax validation --------------------------------------------------------------
def test_balanced_softmax_label_widths():
    logits = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    want = SBS(logits, y, [3, 2, 1])
    for dt in (torch.int8, torch.int16, torch.int32, torch.uint8):
        torch.testing.assert_close(SBS(logits, y.to(dt), [3, 2, 1]), want, rtol=0, atol=0)


def test_balanced_softmax_rejects_bad_inputs():
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    n = [3, 2, 1]
    _raises(TypeError, "labels", SBS, logits, y.float(), n)
    _raises(TypeError, "labels", SBS, logits, y.bool(), n)
    _raises(TypeError, "labels", SBS, logits, y.tolist(), n)
    _raises(ValueError, "labels", SBS, logits, y[:5], n)
    _raises(ValueError, "labels", SBS, logits, y - 1, n)         # negative
    _raises(ValueError, "labels", SBS, logits, y + 1, n)         # 3 is out of range for C = 3
    _raises(ValueError, "class_counts", SBS, logits, y, [3, 2])  # wrong length
    _raises(ValueError, "class_counts", SBS, logits, y, [3, 2, 1, 1])
    _raises(ValueError, "class_counts", SBS, logits, y, [3, -2, 1])
    _raises(ValueError, "class_counts", SBS, logits, y, [3, float("nan"), 1])
    _raises(ValueError, "class_counts", SBS, logits, y, [3, float("inf"), 1])
    _raises(ValueError, "class_counts", SBS, logits, y, [0, 0, 0])
    _raises(ValueError, "class_counts", SBS, logits, y, torch.tensor([True, True, False]))
    _raises(TypeError, "logits", SBS, logits.long(), y, n)
    _raises(ValueError, "logits", SBS, logits[0], y, n)
    _raises(ValueError, "logits", SBS, logits[:0], y[:0], n)
    _raises(ValueError, "logits", SBS, [], y, n)
    _raises(ValueError, "logits[1]", SBS, [logits, torch.randn(6, 4)], y, n)
    _raises(TypeError, "logits[1]", SBS, [logits, logits.double()], y, n)
    _raises(ValueError, "labels", SBS, [logits, logits], [y], n)
    _raises(ValueError, "labels[1]", SBS, [logits, logits], [y, y[:4]], n)
    nan_logits = logits.clone()
    nan_logits[1, 1] = float("nan")
    _raises(ValueError, "logits", SBS, nan_logits, y, n)
    _raises(ValueError, "reduction", SBS, logits, y, n, reduction="avg")


def test_balanced_softmax_unchecked_bad_values_give_nan():
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.isnan(SBS(logits, y + 1, [3, 2, 1], check_finite=False))
    assert torch.isnan(SBS(logits, y, [3, -2, 1], check_finite=False))
    assert torch.isnan(SBS(logits, y, [3, 2, 1], check_finite=False, reduction="none")).sum() == 0


def test_balanced_softmax_views():
    v0, v1 = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    y0, y1 = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])
    truth = _balanced_ce(torch.cat([v0, v1]), torch.cat([y0, y1]), [5, 3, 1])
    torch.testing.assert_close(SBS([v0, v1], [y0, y1], [5, 3, 1], reduction="none"),
                               torch.tensor(truth, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    shared = _balanced_ce(torch.cat([v0, v1]), torch.cat([y0, y0]), [5, 3, 1])
    torch.testing.assert_close(SBS((v0, v1), y0, [5, 3, 1]), torch.tensor(shared, dtype=torch.float64).mean(),
                               rtol=1e-12, atol=1e-12)


# --- item 7: ClassBalancedQueue and effective_number_weights -----------------------------------------------
def test_queue_constructor_names_the_argument():
    _raises(ValueError, "dim", lf.ClassBalancedQueue, 3, 2, -1)
    _raises(ValueError, "dim", lf.ClassBalancedQueue, 3, 2, 0)
    _raises(ValueError, "num_classes", lf.ClassBalancedQueue, 0, 2, 4)
    _raises(ValueError, "size_per_class", lf.ClassBalancedQueue, 3, 2.5, 4)
    _raises(ValueError, "num_classes", lf.ClassBalancedQueue, True, 2, 4)
    _raises(TypeError, "dtype", lf.ClassBalancedQueue, 3, 2, 4, dtype=torch.int64)


def test_queue_enqueue_names_the_argument():
    q = lf.ClassBalancedQueue(3, 2, 4)
    f, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    _raises(ValueError, "features", q.enqueue, torch.randn(5, 3), y)       # wrong D
    _raises(ValueError, "features", q.enqueue, torch.randn(4), y[:1])      # 1-D
    _raises(TypeError, "features", q.enqueue, f.long(), y)
    _raises(ValueError, "labels", q.enqueue, f, y[:4])                    # count mismatch
    _raises(TypeError, "labels", q.enqueue, f, y.float())
    _raises(TypeError, "labels", q.enqueue, f, y.bool())
    _raises(ValueError, "labels", q.enqueue, f, y[:, None])
    _raises(ValueError, "labels", q.enqueue, f, y + 1)                    # 3 >= num_classes
    _raises(ValueError, "labels", q.enqueue, f, y - 1)
    assert q.filled.tolist() == [0, 0, 0] and not q.features.any()  # nothing was written


def _model_queue(C, K, D, batches):
    """The ring buffer of SPEC.md section 4 one row at a time, in plain Python (independent of enqueue)."""
    feats = [[[0.0] * D for _ in range(K)] for _ in range(C)]
    ptr, filled = [0] * C, [0] * C
    for f, y in batches:
        for row, c in zip(f.tolist(), y.tolist()):
            feats[c][ptr[c]] = row
            ptr[c] = (ptr[c] + 1) % K
            filled[c] = min(filled[c] + 1, K)
    return torch.tensor([r for blk in feats for r in blk], dtype=torch.float64), ptr, filled


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_enqueue_matches_a_row_by_row_ring_buffer(seed):
    g = torch.Generator().manual_seed(seed)
    C, K, D = 4, 3, 2
    q = lf.ClassBalancedQueue(C, K, D, dtype=torch.float64)
    batches = []
    for n in (1, 7, 0, 13, 2, 9):
        f = torch.randn(n, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (n,), generator=g)
        y[: n // 2] = int(y[0]) if n else 0  # long runs of one class: more than K rows of it in a batch
        q.enqueue(f, y)
        batches.append((f, y))
    feats, ptr, filled = _model_queue(C, K, D, batches)
    assert torch.equal(q.features, feats) and q.ptr.tolist() == ptr and q.filled.tolist() == filled


def test_effective_number_weights_rejects_bad_counts():
    W = lf.effective_number_weights
    _raises(ValueError, "class_counts", W, [1.0, float("nan"), 2.0], 0.9)
    _raises(ValueError, "class_counts", W, torch.tensor([1.0, float("inf")]), 0.9)
    _raises(ValueError, "class_counts", W, [1, -1], 0.9)
    _raises(ValueError, "class_counts", W, [], 0.9)
    _raises(ValueError, "class_counts", W, [[1, 2]], 0.9)
    _raises(ValueError, "beta", W, [1, 2], float("nan"))
    _raises(ValueError, "beta", W, [1, 2], "0.9")


# --- item 8 and the value checks of the losses -----------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_negative_class_weights_are_rejected(backend):
    require(backend)
    x, e = problem(torch.float64)
    kw = dict(k_pos=2, k_neg=3, backend=backend)
    msg = _raises(ValueError, "class_weights", lf.rescom, x, e["y"], e["Q"], e["ql"], class_weights=-torch.ones(C),
                  **kw)
    assert ">= 0" in msg
    _raises(ValueError, "class_weights", lf.rescom, x, e["y"], e["Q"], e["ql"],
            class_weights=torch.tensor([1.0, -1e-3, 1.0]), **kw)
    # zero is a weight (a class switched off), not an error
    w0 = torch.tensor([0.0, 1.0, 1.0])
    per_anchor = lf.rescom(x, e["y"], e["Q"], e["ql"], class_weights=w0, reduction="none", **kw)
    assert torch.equal(per_anchor[e["y"].repeat(2) == 0], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
def test_unchecked_value_failures_give_nan_not_a_number(backend):
    require(backend)
    x, e = problem(torch.float64)
    y, P, Q, ql = e["y"], e["P"], e["Q"], e["ql"]
    off = y.clone()
    off[0] = C
    unchecked = dict(backend=backend, check_finite=False)
    assert torch.isnan(lf.bcl(x, off, P, **unchecked))
    assert torch.isnan(lf.bcl(x, off, P, reduction="none", **unchecked)).all()
    assert torch.isnan(lf.rescom(x, y, Q, ql, k_pos=2, k_neg=3, class_weights=-torch.ones(C), **unchecked))
    assert torch.isnan(lf.rescom(x, off, Q, ql, k_pos=2, k_neg=3, class_weights=torch.ones(C), **unchecked))
    if backend != "reference":  # the dense reference cannot pad a missing candidate: it raises instead
        assert torch.isnan(lf.rescom(x, y, Q, ql, k_pos=5, k_neg=3, **unchecked))
        pos, _ = lf.hard_pair_mining(x[:, 0], y, Q, ql, k_pos=5, k_neg=3, **unchecked)
        assert (pos[:, 4] == -1).all()  # indices cannot be NaN: missing slots are -1, as with allow_fewer=True
    # and valid input is unaffected by the unchecked path
    torch.testing.assert_close(lf.bcl(x, y, P, **unchecked), lf.bcl(x, y, P, backend="reference"),
                               rtol=1e-10, atol=1e-12)
