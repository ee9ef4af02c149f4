"""Tests of the dense reference: ResCom pieces (SPEC.md section 4).

Expected values are closed forms derived by hand (see comments) or independent loops; never the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ltcl_fused import reference as R

E = math.e
DT = torch.float64


def t(x, dtype=DT):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-10):
    a = torch.as_tensor(a, dtype=DT)
    b = torch.as_tensor(b, dtype=DT)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a, b)


# Example: b=1, views v0=(1,0), v1=(0,1), label 0 (labels [0, 0]); τ=1; queue K=2 per class:
#   slot 0 (c0) (1,0); slot 1 (c0) (0.6,0.8); slot 2 (c1) (-1,0); slot 3 (c1) (0.8,0.6)
# anchor v0: own-class sims slot0 1, slot1 0.6 -> hard positive slot 1 (0.6)
#            other-class sims slot2 -1, slot3 0.8 -> hard negative slot 3 (0.8)
#            row [v1: 0 | 0.6 | 0.8], P = {v1, slot1}: L0 = log(1 + e^.6 + e^.8), ℓ0 = -½[(0-L0)+(0.6-L0)] = L0 - 0.3
# anchor v1: own-class sims slot0 0, slot1 0.8 -> slot 0 (0); other: slot2 0, slot3 0.6 -> slot 3 (0.6)
#            row [v0: 0 | 0 | 0.6], P = {v0, slot0}: L1 = log(2 + e^.6), ℓ1 = L1
QUEUE = t([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [0.8, 0.6]])
QUEUE_Y = torch.tensor([0, 0, 1, 1])
FEATS = t([[1.0, 0.0], [0.0, 1.0]])
L0 = math.log(1 + E ** 0.6 + E ** 0.8) - 0.3
L1 = math.log(2 + E ** 0.6)


def test_mining_hand():
    pos, neg = R.hard_pair_mining(FEATS, torch.tensor([0, 0]), QUEUE, QUEUE_Y, k_pos=1, k_neg=1)
    assert pos.dtype == torch.int64 and neg.dtype == torch.int64
    assert pos.tolist() == [[1], [0]]
    assert neg.tolist() == [[3], [3]]
    pos, neg = R.hard_pair_mining(FEATS, torch.tensor([0, 1]), QUEUE, QUEUE_Y, k_pos=2, k_neg=2)
    # anchor 0 (class 0): positives ordered smallest first {slot1 0.6, slot0 1}; negatives largest first
    assert pos[0].tolist() == [1, 0] and neg[0].tolist() == [3, 2]
    # anchor 1 (class 1): same-class sims slot2 0, slot3 0.6; other-class slot0 0, slot1 0.8
    assert pos[1].tolist() == [2, 3] and neg[1].tolist() == [1, 0]
    pos, neg = R.hard_pair_mining(FEATS, torch.tensor([0, 1]), QUEUE, QUEUE_Y, k_pos=0, k_neg=0)
    assert pos.shape == (2, 0) and neg.shape == (2, 0)


def test_mining_raises_on_impossible_k():
    with pytest.raises(ValueError, match="k_pos"):
        R.hard_pair_mining(FEATS, torch.tensor([0, 0]), QUEUE, QUEUE_Y, k_pos=3, k_neg=1)
    with pytest.raises(ValueError, match="k_neg"):
        R.hard_pair_mining(FEATS, torch.tensor([0, 0]), QUEUE, QUEUE_Y, k_pos=1, k_neg=3)
    with pytest.raises(ValueError, match="k_pos"):  # class 2 has no key at all
        R.hard_pair_mining(FEATS, torch.tensor([0, 2]), QUEUE, QUEUE_Y, k_pos=1, k_neg=1)


def test_mining_vs_sort_random():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(9, 5, generator=g, dtype=DT), dim=1)
    ay = torch.randint(0, 4, (9,), generator=g)
    k = F.normalize(torch.randn(4 * 6, 5, generator=g, dtype=DT), dim=1)
    ky = torch.arange(4).repeat_interleave(6)
    pos, neg = R.hard_pair_mining(a, ay, k, ky, k_pos=3, k_neg=7)
    for i in range(9):
        sims = [(float(a[i] @ k[j]), j) for j in range(len(ky))]
        same = sorted(s for s, j in sims if ky[j] == ay[i])
        other = sorted((s for s, j in sims if ky[j] != ay[i]), reverse=True)
        got_pos = [float(a[i] @ k[j]) for j in pos[i]]
        got_neg = [float(a[i] @ k[j]) for j in neg[i]]
        assert sorted(got_pos) == pytest.approx(same[:3])
        assert sorted(got_neg, reverse=True) == pytest.approx(other[:7])
        assert all(ky[j] == ay[i] for j in pos[i]) and all(ky[j] != ay[i] for j in neg[i])


def test_rescom_hand():
    y = torch.tensor([0, 0])
    close(R.rescom(FEATS, y, QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=1.0, reduction="none"), [L0, L1])
    close(R.rescom(FEATS, y, QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=1.0), (L0 + L1) / 2)
    close(R.rescom(FEATS, y, QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=1.0, reduction="sum"), L0 + L1)
    # [b, 2, D] with labels [b] is the same batch (view-major flattening)
    close(R.rescom(FEATS[None], torch.tensor([0]), QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=1.0,
                   reduction="none"), [L0, L1])
    # temperature 0.5: every logit doubles. anchor 0 row [0 | 1.2 | 1.6]; anchor 1 row [0 | 0 | 1.2]
    l0 = math.log(1 + E ** 1.2 + E ** 1.6) - 0.6
    l1 = math.log(2 + E ** 1.2)
    close(R.rescom(FEATS, y, QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=0.5, reduction="none"), [l0, l1])


def test_rescom_class_weights_plain_mean():
    y = torch.tensor([0, 0])
    w = t([3.0, 1.0])
    # mean = (1/2b) Σ w_y ℓ = 3 (L0 + L1) / 2, NOT divided by Σ w
    close(R.rescom(FEATS, y, QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=1.0, class_weights=w),
          3 * (L0 + L1) / 2)
    close(R.rescom(FEATS, y, QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=1.0, class_weights=w,
                   reduction="none"), [3 * L0, 3 * L1])
    # two classes in the batch: v0 class 0, v1 class 1 (mined again with the other labels)
    # anchor 0 (class 0): pos slot1 (0.6), neg slot3 (0.8); batch column v1 is now a negative (s=0)
    #   P = {slot1}: ℓ0 = L0' - 0.6 with L0' = log(1 + e^.6 + e^.8)
    # anchor 1 (class 1): same-class keys slot2 (0), slot3 (0.6) -> slot2 (0); other: slot0 0, slot1 0.8 -> slot1
    #   row [v0: 0 | 0 | 0.8], P = {slot2}: ℓ1 = log(2 + e^.8) - 0
    l0 = math.log(1 + E ** 0.6 + E ** 0.8) - 0.6
    l1 = math.log(2 + E ** 0.8)
    got = R.rescom(FEATS, torch.tensor([0, 1]), QUEUE, QUEUE_Y, k_pos=1, k_neg=1, temperature=1.0,
                   class_weights=w, reduction="none")
    close(got, [3 * l0, 1 * l1])


def loop_rescom(f, y, q, pos_idx, neg_idx, tau, w):
    rows = f.tolist()
    keys = q.tolist()
    out = []
    for i in range(len(rows)):
        entries = []  # (logit, is_positive)
        for j in range(len(rows)):
            if j != i:
                entries.append((sum(a * b for a, b in zip(rows[i], rows[j])) / tau, int(y[j]) == int(y[i])))
        for j in pos_idx[i].tolist():
            entries.append((sum(a * b for a, b in zip(rows[i], keys[j])) / tau, True))
        for j in neg_idx[i].tolist():
            entries.append((sum(a * b for a, b in zip(rows[i], keys[j])) / tau, False))
        lse = math.log(sum(math.exp(v) for v, _ in entries))
        P = [v for v, p in entries if p]
        li = -sum(v - lse for v in P) / len(P) if P else 0.0
        out.append(float(w[int(y[i])]) * li)
    return out


def test_rescom_vs_loops():
    g = torch.Generator().manual_seed(1)
    b, C, K = 5, 3, 4
    f = F.normalize(torch.randn(b, 2, 6, generator=g, dtype=DT), dim=-1)
    y = torch.tensor([0, 2, 2, 1, 0])
    q = F.normalize(torch.randn(C * K, 6, generator=g, dtype=DT), dim=-1)
    qy = torch.arange(C).repeat_interleave(K)
    w = t([0.5, 2.0, 1.5])
    flat = torch.cat([f[:, 0], f[:, 1]])
    flat_y = y.repeat(2)
    pos, neg = R.hard_pair_mining(flat, flat_y, q, qy, k_pos=2, k_neg=5)
    exp = loop_rescom(flat, flat_y, q, pos, neg, 0.2, w)
    got = R.rescom(f, y, q, qy, k_pos=2, k_neg=5, temperature=0.2, class_weights=w, reduction="none")
    close(got, exp)
    close(R.rescom(flat, flat_y, q, qy, k_pos=2, k_neg=5, temperature=0.2, class_weights=w), sum(exp) / (2 * b))


def test_rescom_gradcheck_and_queue_detached():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(3, 2, 4, generator=g, dtype=DT, requires_grad=True)
    y = torch.tensor([0, 1, 1])
    q = F.normalize(torch.randn(6, 4, generator=g, dtype=DT), dim=-1).requires_grad_()
    qy = torch.tensor([0, 0, 0, 1, 1, 1])
    w = t([2.0, 0.5])
    assert torch.autograd.gradcheck(
        lambda a: R.rescom(a, y, q, qy, k_pos=2, k_neg=2, temperature=0.5, class_weights=w), (f,))
    loss = R.rescom(f, y, q, qy, k_pos=1, k_neg=3, temperature=0.5)
    loss.backward()
    assert q.grad is None  # keys are detached
    assert torch.isfinite(f.grad).all()


def test_rescom_no_positive_anywhere_is_zero():
    # k_pos = 0 and a batch where every label is distinct: P(i) empty -> 0, finite gradient
    f = torch.randn(3, 4, dtype=DT, requires_grad=True)
    q = F.normalize(torch.randn(6, 4, dtype=DT), dim=-1)
    qy = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = R.rescom(f, torch.tensor([0, 1, 2]), q, qy, k_pos=0, k_neg=2, reduction="none")
    close(loss.detach(), [0.0, 0.0, 0.0])
    loss.sum().backward()
    assert torch.isfinite(f.grad).all()


# --------------------------------------------------------------------------------------------------------
# effective-number weights, Siamese Balanced Softmax
# --------------------------------------------------------------------------------------------------------
def test_effective_number_weights_hand():
    # β=0.5, n=[1,2]: E = [(1-.5)/.5, (1-.25)/.5] = [1, 1.5], mean 1.25 -> w = [1.25, 1.25/1.5]
    close(R.effective_number_weights([1, 2], 0.5), [1.25, 1.25 / 1.5], tol=1e-6)
    # β=0: all ones
    close(R.effective_number_weights(torch.tensor([5, 1, 100]), 0.0), [1.0, 1.0, 1.0])
    # β=1 limit: E = n -> n=[1,3]: mean 2 -> [2, 2/3]
    close(R.effective_number_weights([1, 3], 1.0), [2.0, 2.0 / 3.0], tol=1e-6)
    # β -> 1 (ResCom's 0.999999): close to the β=1 limit E = n: n=[10, 500]: mean 255 -> [25.5, 0.51]
    close(R.effective_number_weights([10, 500], 0.999999), [25.5, 0.51], tol=1e-3)
    # β=0.9, n=[1, 2, 3]: E = [1, 1.9, 2.71], mean 5.61/3
    m = (1 + 1.9 + 2.71) / 3
    close(R.effective_number_weights([1, 2, 3], 0.9), [m / 1, m / 1.9, m / 2.71], tol=1e-6)


def test_effective_number_weights_zero_count_and_errors():
    # a class without samples gets weight 0 and is left out of mean(E): same as the others without it
    close(R.effective_number_weights([1, 0, 2], 0.5), [1.25, 0.0, 1.25 / 1.5], tol=1e-6)
    close(R.effective_number_weights([0, 4], 0.0), [0.0, 1.0])
    with pytest.raises(ValueError):
        R.effective_number_weights([1, 2], 1.5)
    with pytest.raises(ValueError):
        R.effective_number_weights([1, 2], -0.1)


def test_siamese_balanced_softmax_hand():
    counts = [1, 3]
    p0, p1 = 0.25 + 1e-9, 0.75 + 1e-9
    # logits [0, 0] + log(π + 1e-9): CE for label 0 = -log(p0/(p0+p1)), for label 1 = -log(p1/(p0+p1))
    ce0, ce1 = -math.log(p0 / (p0 + p1)), -math.log(p1 / (p0 + p1))
    logits = t([[0.0, 0.0], [0.0, 0.0]])
    close(R.siamese_balanced_softmax(logits, torch.tensor([0, 1]), counts, reduction="none"), [ce0, ce1])
    close(R.siamese_balanced_softmax(logits, torch.tensor([0, 1]), counts), (ce0 + ce1) / 2)
    # logits [log 3, 0] for label 0: adjusted = [log(3 p0), log p1] -> -log(3p0 / (3p0 + p1))
    close(R.siamese_balanced_softmax(t([[math.log(3.0), 0.0]]), torch.tensor([0]), counts),
          -math.log(3 * p0 / (3 * p0 + p1)))


def test_siamese_balanced_softmax_views():
    counts = torch.tensor([1, 3])
    p0, p1 = 0.25 + 1e-9, 0.75 + 1e-9
    ce0, ce1 = -math.log(p0 / (p0 + p1)), -math.log(p1 / (p0 + p1))
    v = t([[0.0, 0.0]])
    # two views, one shared label tensor: mean over all 2 rows
    close(R.siamese_balanced_softmax([v, v], torch.tensor([1]), counts), ce1)
    # per-view labels
    close(R.siamese_balanced_softmax((v, v), [torch.tensor([0]), torch.tensor([1])], counts), (ce0 + ce1) / 2)
    close(R.siamese_balanced_softmax([v, v], [torch.tensor([0]), torch.tensor([1])], counts, reduction="sum"),
          ce0 + ce1)
    lg = torch.randn(4, 3, dtype=DT, requires_grad=True)
    yy = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda z: R.siamese_balanced_softmax(z, yy, [5, 2, 1]), (lg,))


# --------------------------------------------------------------------------------------------------------
# Class-balanced queue
# --------------------------------------------------------------------------------------------------------
def test_queue_ring_buffer_and_keys():
    q = R.ClassBalancedQueue(2, 3, 2)
    assert q.features.shape == (6, 2) and q.labels.tolist() == [0, 0, 0, 1, 1, 1]
    k, ky = q.keys()
    assert k.shape == (0, 2) and ky.numel() == 0
    f = t([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], torch.float32)
    q.enqueue(f, torch.tensor([0, 1, 0]))
    assert q.ptr.tolist() == [2, 1] and q.filled.tolist() == [2, 1]
    k, ky = q.keys()
    assert ky.tolist() == [0, 0, 1]
    assert k[:, 0].tolist() == [1.0, 3.0, 2.0]
    # 4 more rows of class 0 (K=3): writes at slots 2, 0, 1, 2 -> the last three remain: b, c, d
    g = t([[10.0, 0], [11.0, 0], [12.0, 0], [13.0, 0]], torch.float32)
    q.enqueue(g, torch.tensor([0, 0, 0, 0]))
    assert q.features[:3, 0].tolist() == [11.0, 12.0, 13.0]
    assert q.ptr.tolist() == [0, 1] and q.filled.tolist() == [3, 1]
    k, ky = q.keys()
    assert ky.tolist() == [0, 0, 0, 1] and k[:, 0].tolist() == [11.0, 12.0, 13.0, 2.0]
    # next class-0 row overwrites slot 0 (the oldest)
    q.enqueue(t([[20.0, 0]], torch.float32), torch.tensor([0]))
    assert q.features[:3, 0].tolist() == [20.0, 12.0, 13.0] and q.ptr.tolist() == [1, 1]


def test_queue_overflow_from_nonzero_pointer():
    q = R.ClassBalancedQueue(1, 2, 1)
    q.enqueue(t([[1.0]], torch.float32), torch.tensor([0]))              # slot 0, ptr 1
    q.enqueue(t([[2.0], [3.0], [4.0], [5.0], [6.0]], torch.float32), torch.tensor([0] * 5))
    # writes: 2->slot1, 3->slot0, 4->slot1, 5->slot0, 6->slot1 ; ptr = (1+5)%2 = 0
    assert q.features[:, 0].tolist() == [5.0, 6.0] and q.ptr.tolist() == [0] and q.filled.tolist() == [2]


def test_queue_detached_and_state_dict_roundtrip():
    q = R.ClassBalancedQueue(3, 2, 4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=DT, requires_grad=True)
    q.enqueue(x * 2, torch.tensor([2, 0, 2, 2, 1]))
    assert not q.features.requires_grad
    sd = q.state_dict()
    assert set(sd) == {"features", "labels", "ptr", "filled"}
    q2 = R.ClassBalancedQueue(3, 2, 4, dtype=torch.float64)
    q2.load_state_dict(sd)
    for name in ("features", "labels", "ptr", "filled"):
        assert torch.equal(getattr(q, name), getattr(q2, name))
    y = torch.randn(3, 4, dtype=DT)
    q.enqueue(y, torch.tensor([0, 0, 1]))
    q2.enqueue(y, torch.tensor([0, 0, 1]))
    assert torch.equal(q.features, q2.features) and torch.equal(q.ptr, q2.ptr)
    assert q.filled.tolist() == [2, 2, 2]


def test_queue_gather_hook_is_used():
    class Doubling(R.ClassBalancedQueue):
        def _gather(self, features, labels):   # e.g. an all-gather across ranks
            return torch.cat([features, features + 100]), torch.cat([labels, labels])

    q = Doubling(1, 4, 1)
    q.enqueue(t([[1.0]], torch.float32), torch.tensor([0]))
    assert q.keys()[0][:, 0].tolist() == [1.0, 101.0]
