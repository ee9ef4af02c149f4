"""Tests of the dense reference: SupCon, AFCL (CL/FCL/ACL), BCL (SPEC.md sections 1-3).

Expected values are either closed forms derived by hand (in the comments) or computed by independent
Python loops over anchors/columns written from SPEC.md; nothing expected comes from the code under test.
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


# --------------------------------------------------------------------------------------------------------
# independent loop implementations (plain Python floats, written from SPEC.md)
# --------------------------------------------------------------------------------------------------------
def flat_rows(x):
    """[B, V, D] -> list of rows, view-major; [N, D] -> rows."""
    if x.dim() == 2:
        return [list(map(float, r)) for r in x.tolist()], x.shape[0], 1
    B, V = x.shape[0], x.shape[1]
    return [list(map(float, x[b, v].tolist())) for v in range(V) for b in range(B)], B, V


def dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return [v / n for v in a]


def contrast_problem(x, labels, contrast_mode="all", ref=None, ref_labels=None, normalize=False):
    """Anchors, columns, self index per anchor and a positive predicate, built with loops."""
    rows, B, V = flat_rows(x)
    if normalize:
        rows = [unit(r) for r in rows]
    sample = [k % B for k in range(V * B)]
    lab = None if labels is None else [int(labels[k % B]) for k in range(V * B)]
    cols = list(rows)
    col_lab = None if lab is None else list(lab)
    col_sample = list(sample)
    if ref is not None:
        ref_rows = [list(map(float, r)) for r in ref.tolist()]
        if normalize:
            ref_rows = [unit(r) for r in ref_rows]
        cols += ref_rows
        col_sample += [None] * len(ref_rows)
        if lab is not None:
            col_lab += [int(v) for v in ref_labels.tolist()]
    n_anchor = V * B if contrast_mode == "all" else B
    anchors = rows[:n_anchor]

    def is_pos(i, j):
        if lab is None:
            return col_sample[j] is not None and col_sample[j] == sample[i]
        return col_lab[j] == lab[i]

    return anchors, cols, list(range(n_anchor)), is_pos


def loop_supcon(x, labels, tau, tau_base=None, **kw):
    tau_base = tau if tau_base is None else tau_base
    anchors, cols, self_idx, is_pos = contrast_problem(x, labels, **kw)
    out = []
    for i, a in enumerate(anchors):
        A = [j for j in range(len(cols)) if j != self_idx[i]]
        s = {j: dot(a, cols[j]) / tau for j in A}
        lse = math.log(sum(math.exp(s[j]) for j in A)) if A else float("-inf")
        P = [j for j in A if is_pos(i, j)]
        out.append(-(tau / tau_base) * sum(s[j] - lse for j in P) / len(P) if P else 0.0)
    return out


def loop_afcl(x, labels, tau, gamma, eta, normalize_by="batch", **kw):
    anchors, cols, self_idx, is_pos = contrast_problem(x, labels, **kw)
    n = len(cols)
    out = []
    for i, a in enumerate(anchors):
        A = [j for j in range(n) if j != self_idx[i]]
        s = {j: dot(a, cols[j]) / tau for j in A}
        Z = sum(math.exp(s[j]) for j in A)
        p = {j: math.exp(s[j]) / Z for j in A}
        P = [j for j in A if is_pos(i, j)]
        Nn = [j for j in A if not is_pos(i, j)]
        tp = -sum((1 - p[j]) ** gamma * math.log(p[j]) for j in P)
        tn = -sum(math.log(1 - p[j]) for j in Nn)
        if normalize_by == "batch":
            tp, tn = tp / n, tn / n
        else:
            tp = tp / len(P) if P else 0.0
            tn = tn / len(Nn) if Nn else 0.0
        out.append(tp + eta * tn)
    return out


def loop_bcl(x, labels, protos, tau):
    rows, B, V = flat_rows(x)
    lab = [int(labels[k % B]) for k in range(V * B)]
    C = protos.shape[0]
    cols = rows + [list(map(float, r)) for r in protos.tolist()]
    col_lab = lab + list(range(C))
    cnt = [sum(1 for c in col_lab if c == k) for k in range(C)]
    out = []
    for i in range(V * B):
        A = [j for j in range(len(cols)) if j != i]
        s = {j: dot(rows[i], cols[j]) / tau for j in A}
        D = sum(math.exp(s[j]) / (cnt[col_lab[j]] - (1 if col_lab[j] == lab[i] else 0)) for j in A)
        P = [j for j in A if col_lab[j] == lab[i]]
        out.append(-sum(s[j] - math.log(D) for j in P) / len(P))
    return out


# --------------------------------------------------------------------------------------------------------
# SupCon
# --------------------------------------------------------------------------------------------------------
# Example 1: f0=(1,0), f1=(0,1), f2=(-1,0), labels [0,0,1], τ=1.
# s = [[1,0,-1],[0,1,0],[-1,0,1]] (diagonal unused).
# anchor 0: A={1,2}: s=0,-1; P={1}: ℓ0 = -(0 - log(1+e^-1)) = log(1+e^-1)
# anchor 1: A={0,2}: s=0,0;  P={0}: ℓ1 = log 2
# anchor 2: no positive -> 0 (still counted in the mean)
EX1 = t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
EX1_LABELS = torch.tensor([0, 0, 1])


def test_supcon_hand_labels():
    l0, l1 = math.log(1 + E ** -1), math.log(2)
    close(R.supcon(EX1, EX1_LABELS, temperature=1.0, reduction="none"), [l0, l1, 0.0])
    close(R.supcon(EX1, EX1_LABELS, temperature=1.0), (l0 + l1) / 3)
    close(R.supcon(EX1, EX1_LABELS, temperature=1.0, reduction="sum"), l0 + l1)


def test_supcon_hand_temperature_and_base_temperature():
    # τ=0.5 doubles s: anchor 0: s=0,-2 -> log(1+e^-2); anchor 1: log 2; times τ/τ_base = 0.5
    got = R.supcon(EX1, EX1_LABELS, temperature=0.5, base_temperature=1.0, reduction="none")
    close(got, [0.5 * math.log(1 + E ** -2), 0.5 * math.log(2), 0.0])
    # base_temperature=None means τ_base = τ: no scaling
    got = R.supcon(EX1, EX1_LABELS, temperature=0.5, reduction="none")
    close(got, [math.log(1 + E ** -2), math.log(2), 0.0])


# Example 2 (SimCLR, B=2, V=2): sample 0 views (1,0),(0,1); sample 1 views (0,1),(0,1). View-major flat:
# f0=(1,0) [s0v0], f1=(0,1) [s1v0], f2=(0,1) [s0v1], f3=(0,1) [s1v1]; positives 0<->2, 1<->3; τ=1.
# anchor 0: cols f1,f2,f3 s=0,0,0; pos f2 -> log 3
# anchor 1: cols f0,f2,f3 s=0,1,1; pos f3 (1) -> -(1 - log(1+2e)) = log(1+2e) - 1
# anchor 2: cols f0,f1,f3 s=0,1,1; pos f0 (0) -> log(1+2e)
# anchor 3: cols f0,f1,f2 s=0,1,1; pos f1 (1) -> log(1+2e) - 1
EX2 = t([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])


def test_supcon_hand_simclr_and_contrast_mode_one():
    a = math.log(1 + 2 * E)
    expected_all = [math.log(3), a - 1, a, a - 1]
    close(R.supcon(EX2, None, temperature=1.0, reduction="none"), expected_all)
    close(R.supcon(EX2, None, temperature=1.0), sum(expected_all) / 4)
    # "one": anchors are view 0 only (f0, f1); columns are still all four views
    close(R.supcon(EX2, None, temperature=1.0, contrast_mode="one", reduction="none"), expected_all[:2])
    close(R.supcon(EX2, None, temperature=1.0, contrast_mode="one"), sum(expected_all[:2]) / 2)
    # labels equal to the sample index give the same thing as SimCLR
    close(R.supcon(EX2, torch.tensor([5, 7]), temperature=1.0, reduction="none"), expected_all)


def test_supcon_hand_ref_features():
    # f0=(1,0) y0, f1=(0,1) y1, ref r=(1,0) y0, τ=1.
    # anchor 0: cols f1 (0), r (1, positive) -> log(1+e) - 1 ; anchor 1: no positive -> 0
    f = t([[1.0, 0.0], [0.0, 1.0]])
    got = R.supcon(f, torch.tensor([0, 1]), temperature=1.0, ref_features=t([[1.0, 0.0]]),
                   ref_labels=torch.tensor([0]), reduction="none")
    close(got, [math.log(1 + E) - 1, 0.0])
    # SimCLR with a ref column (negative to everyone): one sample, views (1,0),(0,1); ref (-1,0)
    # anchor f0: pos f1 (0), neg r (-1) -> log(1+e^-1); anchor f1: pos f0 (0), neg r (0) -> log 2
    got = R.supcon(t([[[1.0, 0.0], [0.0, 1.0]]]), None, temperature=1.0, ref_features=t([[-1.0, 0.0]]),
                   reduction="none")
    close(got, [math.log(1 + E ** -1), math.log(2)])


def test_supcon_normalize_flag():
    # scaling the rows does not matter with normalize=True
    x = torch.randn(5, 2, 4, dtype=DT)
    y = torch.tensor([0, 1, 0, 2, 1])
    a = R.supcon(3.0 * x, y, temperature=0.3, normalize=True, reduction="none")
    b = R.supcon(F.normalize(x, dim=-1), y, temperature=0.3, reduction="none")
    close(a, b)


def test_supcon_matches_pytorch_metric_learning():
    from pytorch_metric_learning.losses import SupConLoss
    from pytorch_metric_learning.reducers import DoNothingReducer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 7, generator=g, dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 3, 4, 0, 0, 2, 5, 1, 1, 6, 2, 2, 0, 7, 3, 3, 1, 0, 8])  # some singletons
    tau = 0.1
    pml = SupConLoss(temperature=tau, reducer=DoNothingReducer())(x, y)["loss"]["losses"]
    ours = R.supcon(F.normalize(x, dim=-1), y, temperature=tau, reduction="none")
    close(ours, pml.to(DT), tol=1e-8)
    # pml's default reducer averages over anchors with a non-zero loss; ours over all anchors
    pml_mean = SupConLoss(temperature=tau)(x, y)
    nonzero = int((pml != 0).sum())
    close(R.supcon(x, y, temperature=tau, normalize=True) * len(y) / nonzero, pml_mean.to(DT), tol=1e-8)


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("simclr", [False, True])
def test_supcon_vs_loops(mode, simclr):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, generator=g, dtype=DT)
    y = None if simclr else torch.tensor([0, 1, 0, 2, 1])
    ref = torch.randn(4, 4, generator=g, dtype=DT)
    ref_y = torch.tensor([2, 0, 3, 1])
    got = R.supcon(x, y, temperature=0.5, base_temperature=0.7, contrast_mode=mode, normalize=True,
                   ref_features=ref, ref_labels=None if simclr else ref_y, reduction="none")
    exp = loop_supcon(x, y, 0.5, 0.7, contrast_mode=mode, ref=ref, ref_labels=ref_y, normalize=True)
    close(got, exp)


# --------------------------------------------------------------------------------------------------------
# AFCL / CL / FCL / ACL, on example 1 (τ=1, N=3 columns)
# anchor 0: Z0=1+e^-1, p01=1/Z0 (pos), p02=e^-1/Z0 (neg)
# anchor 1: p10=1/2 (pos), p12=1/2 (neg)
# anchor 2: Z2=1+e^-1, p20=e^-1/Z2, p21=1/Z2 (both neg, no positive)
# --------------------------------------------------------------------------------------------------------
Z = 1 + E ** -1


def test_afcl_hand_cl():
    # γ=η=0: T⁺0 = (1/3) log Z0, T⁺1 = (1/3) log 2, T⁺2 = 0
    exp = [math.log(Z) / 3, math.log(2) / 3, 0.0]
    close(R.afcl(EX1, EX1_LABELS, temperature=1.0, reduction="none"), exp)
    close(R.afcl(EX1, EX1_LABELS, temperature=1.0), sum(exp) / 3)


def test_afcl_hand_focal():
    # γ=2: T⁺0 = -(1/3)(1-p01)² log p01 = (1/3)(e^-1/Z)² log Z ; T⁺1 = (1/3)(1/2)² log 2
    exp = [(E ** -1 / Z) ** 2 * math.log(Z) / 3, 0.25 * math.log(2) / 3, 0.0]
    close(R.afcl(EX1, EX1_LABELS, gamma=2.0, temperature=1.0, reduction="none"), exp)
    close(R.fcl(EX1, EX1_LABELS, gamma=2.0, temperature=1.0, reduction="none"), exp)
    # fcl's default γ is 1
    exp1 = [(E ** -1 / Z) * math.log(Z) / 3, 0.5 * math.log(2) / 3, 0.0]
    close(R.fcl(EX1, EX1_LABELS, temperature=1.0, reduction="none"), exp1)


def test_afcl_hand_asymmetric_batch_and_pairs():
    # T⁻0 = -(1/3) log(1-p02) = (1/3) log Z ; T⁻1 = -(1/3) log(1/2) = (1/3) log 2
    # T⁻2 = -(1/3)[log(1-p20) + log(1-p21)] = -(1/3)[log(1/Z) + log(e^-1/Z)] = (1/3)(2 log Z + 1)
    lz, l2 = math.log(Z), math.log(2)
    tp = [lz / 3, l2 / 3, 0.0]
    tn = [lz / 3, l2 / 3, (2 * lz + 1) / 3]
    eta = 2.5
    close(R.afcl(EX1, EX1_LABELS, eta=eta, temperature=1.0, reduction="none"),
          [a + eta * b for a, b in zip(tp, tn)])
    close(R.acl(EX1, EX1_LABELS, eta=eta, temperature=1.0, reduction="none"),
          [a + eta * b for a, b in zip(tp, tn)])
    # pairs: T⁺ / |P| (anchor 2: empty -> 0), T⁻ / |N|
    tp_pairs = [lz, l2, 0.0]
    tn_pairs = [lz, l2, (2 * lz + 1) / 2]
    close(R.afcl(EX1, EX1_LABELS, eta=eta, temperature=1.0, normalize_by="pairs", reduction="none"),
          [a + eta * b for a, b in zip(tp_pairs, tn_pairs)])
    # γ and η together, pairs
    g = 1.5
    tp_g = [(E ** -1 / Z) ** g * lz, 0.5 ** g * l2, 0.0]
    close(R.afcl(EX1, EX1_LABELS, gamma=g, eta=eta, temperature=1.0, normalize_by="pairs", reduction="sum"),
          sum(a + eta * b for a, b in zip(tp_g, tn_pairs)))


def test_cl_pairs_equals_supcon():
    # γ=η=0 with normalize_by="pairs" is exactly SupCon (τ_base = τ)
    x = torch.randn(6, 2, 5, dtype=DT)
    y = torch.tensor([0, 1, 1, 2, 0, 3])
    close(R.afcl(x, y, temperature=0.4, normalize_by="pairs", reduction="none"),
          R.supcon(x, y, temperature=0.4, reduction="none"))


@pytest.mark.parametrize("gamma,eta,norm", [(0.0, 0.0, "batch"), (2.0, 0.0, "batch"), (0.0, 3.0, "pairs"),
                                            (0.7, 1.5, "batch"), (3.0, 2.0, "pairs")])
def test_afcl_vs_loops_5_samples(gamma, eta, norm):
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(5, 3, generator=g, dtype=DT), dim=-1)
    y = torch.tensor([0, 1, 0, 0, 2])
    got = R.afcl(x, y, gamma=gamma, eta=eta, temperature=0.5, normalize_by=norm, reduction="none")
    close(got, loop_afcl(x, y, 0.5, gamma, eta, norm))


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("simclr", [False, True])
def test_afcl_vs_loops_views_and_ref(mode, simclr):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, generator=g, dtype=DT)
    y = None if simclr else torch.tensor([1, 0, 1])
    ref = torch.randn(3, 4, generator=g, dtype=DT)
    ref_y = torch.tensor([0, 2, 1])
    got = R.afcl(x, y, gamma=1.0, eta=0.5, temperature=0.6, contrast_mode=mode, normalize=True,
                 ref_features=ref, ref_labels=None if simclr else ref_y, reduction="none")
    exp = loop_afcl(x, y, 0.6, 1.0, 0.5, "batch", contrast_mode=mode, ref=ref, ref_labels=ref_y,
                    normalize=True)
    close(got, exp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_afcl_log1mp_stays_finite_when_p_rounds_to_one(dtype):
    # f0=(1,0), f1=(1,0), f2=(-1,0), three classes, τ=0.05: anchor 0 sees s=20 (f1) and -20 (f2).
    # p01 = 1/(1+e^-40) rounds to 1 in fp32 and fp64, yet log(1-p01) = -40 - log1p(e^-40) exactly.
    # T⁻0 = -(1/3)[log(1-p01) + log(1-p02)] = (1/3)(40 + 2 log1p(e^-40))
    x = t([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype)
    got = R.afcl(x, torch.tensor([0, 1, 2]), eta=1.0, temperature=0.05, reduction="none")
    assert torch.isfinite(got).all()
    assert abs(float(got[0]) - (40 + 2 * math.log1p(E ** -40)) / 3) < 1e-5 * 40


def test_afcl_degenerate_single_column_rows():
    # two samples, different classes: each anchor's only column is a negative, p ≡ 1, log(1-p) = -inf
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    loss = R.afcl(x, torch.tensor([0, 1]), eta=1.0, reduction="none")
    assert torch.isinf(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    # η = 0: no T⁻ term at all, so 0 (not 0·inf = NaN)
    close(R.afcl(x.detach(), torch.tensor([0, 1])), 0.0)
    # same class: the single column is a positive with p = 1: T⁺ = -(1-1)^γ log 1 = 0
    x.grad = None
    loss = R.afcl(x, torch.tensor([0, 0]), gamma=0.5, eta=1.0)
    loss.backward()
    close(loss.detach(), 0.0)
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------------------
# BCL
# --------------------------------------------------------------------------------------------------------
def test_bcl_hand():
    # f0=(1,0), f1=(0,1), both class 0; prototypes p0=(1,0), p1=(-1,0); τ=1.
    # cnt_0 = 2 views + 1 = 3, cnt_1 = 0 + 1 = 1.
    # anchor f0: f1 (class 0, s=0, weight 1/(3-1)), p0 (class 0, s=1, 1/2), p1 (class 1, s=-1, 1/1)
    #   D0 = 1/2 + e/2 + e^-1; P = {f1, p0}: ℓ0 = -(1/2)[(0 - log D0) + (1 - log D0)] = log D0 - 1/2
    # anchor f1: f0 (s=0, 1/2), p0 (s=0, 1/2), p1 (s=0, 1): D1 = 2; P = {f0, p0}, both s=0: ℓ1 = log 2
    f = t([[1.0, 0.0], [0.0, 1.0]])
    protos = t([[1.0, 0.0], [-1.0, 0.0]])
    exp = [math.log(0.5 + E / 2 + E ** -1) - 0.5, math.log(2)]
    close(R.bcl(f, torch.tensor([0, 0]), protos, temperature=1.0, reduction="none"), exp)
    close(R.bcl(f, torch.tensor([0, 0]), protos, temperature=1.0), sum(exp) / 2)
    close(R.bcl(f, torch.tensor([0, 0]), protos, temperature=1.0, reduction="sum"), sum(exp))
    # the same two rows given as one sample with two views [1, 2, D] (labels [1] tiled)
    close(R.bcl(f[None], torch.tensor([0]), protos, temperature=1.0, reduction="none"), exp)


def test_bcl_vs_loops():
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(5, 2, 3, generator=g, dtype=DT), dim=-1)
    y = torch.tensor([0, 2, 0, 0, 3])      # class 1 absent from the batch (prototype only)
    protos = F.normalize(torch.randn(4, 3, generator=g, dtype=DT), dim=-1)
    close(R.bcl(x, y, protos, temperature=0.3, reduction="none"), loop_bcl(x, y, protos, 0.3))
    # normalize=True normalises features and prototypes inside
    close(R.bcl(2 * x, y, 5 * protos, temperature=0.3, normalize=True, reduction="none"),
          loop_bcl(x, y, protos, 0.3))


def test_bcl_single_sample_finite():
    x = torch.randn(1, 3, dtype=DT, requires_grad=True)
    p = torch.randn(2, 3, dtype=DT, requires_grad=True)
    loss = R.bcl(x, torch.tensor([1]), p, temperature=0.5)
    # one anchor, columns = 2 prototypes (cnt = [1, 2]); P = {p1}; D = e^{s0}/1 + e^{s1}/(2-1)
    s = (x @ p.T / 0.5).detach()[0]
    close(loss.detach(), -(s[1] - torch.log(torch.exp(s[0]) + torch.exp(s[1]))))
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(p.grad).all()


# --------------------------------------------------------------------------------------------------------
# gradients (fp64 gradcheck), edge cases
# --------------------------------------------------------------------------------------------------------
def test_gradcheck_supcon():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, generator=g, dtype=DT, requires_grad=True)
    ref = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    y, ry = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 0])
    assert torch.autograd.gradcheck(
        lambda a, r: R.supcon(a, y, temperature=0.5, base_temperature=0.8, ref_features=r, ref_labels=ry),
        (x, ref))
    assert torch.autograd.gradcheck(
        lambda a, r: R.supcon(a, None, temperature=0.3, normalize=True, contrast_mode="one", ref_features=r,
                              reduction="sum"), (x, ref))


@pytest.mark.parametrize("gamma,eta,norm", [(0.0, 0.0, "batch"), (2.0, 1.0, "batch"), (0.5, 3.0, "pairs")])
def test_gradcheck_afcl(gamma, eta, norm):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, generator=g, dtype=DT, requires_grad=True)
    ref = torch.randn(2, 4, generator=g, dtype=DT, requires_grad=True)
    y, ry = torch.tensor([0, 1, 0]), torch.tensor([1, 0])
    assert torch.autograd.gradcheck(
        lambda a, r: R.afcl(a, y, gamma=gamma, eta=eta, temperature=0.5, normalize_by=norm, normalize=True,
                            ref_features=r, ref_labels=ry, reduction="none"), (x, ref))


def test_gradcheck_bcl():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 4, generator=g, dtype=DT, requires_grad=True)
    p = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    y = torch.tensor([0, 2, 0])
    assert torch.autograd.gradcheck(lambda a, q: R.bcl(a, y, q, temperature=0.5, normalize=True), (x, p))
    assert torch.autograd.gradcheck(lambda a, q: R.bcl(a, y, q, temperature=0.5, reduction="none"), (x, p))


@pytest.mark.parametrize("loss", ["supcon", "afcl"])
def test_single_sample_is_zero_with_finite_grad(loss):
    x = torch.randn(1, 5, dtype=DT, requires_grad=True)
    fn = getattr(R, loss)
    kw = {"gamma": 1.0, "eta": 2.0} if loss == "afcl" else {}
    for y in (torch.tensor([3]), None):
        out = fn(x, y, **kw)
        close(out.detach(), 0.0)
        out.backward()
        assert torch.isfinite(x.grad).all()
        close(x.grad, torch.zeros_like(x))
        x.grad = None
        close(fn(x, y, reduction="none", **kw).detach(), [0.0])


def test_anchors_without_positives_count_in_mean_and_have_finite_grad():
    # 7 samples (a prime), classes 0,0,1,2,3,3,4: anchors 2, 3, 6 have no positive -> exactly 0
    x = torch.randn(7, 3, dtype=DT, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 3, 3, 4])
    per = R.supcon(x, y, temperature=0.5, reduction="none")
    assert per.shape == (7,)
    close(per[[2, 3, 6]].detach(), [0.0, 0.0, 0.0])
    assert (per[[0, 1, 4, 5]] > 0).all()
    mean = R.supcon(x, y, temperature=0.5)
    close(mean.detach(), per.detach().sum() / 7)
    mean.backward()
    assert torch.isfinite(x.grad).all()
    per_afcl = R.afcl(x, y, gamma=2.0, eta=1.0, normalize_by="pairs", reduction="none")
    assert torch.isfinite(per_afcl).all()


def test_one_class_only():
    # every pair positive: N(i) empty. AFCL's T⁻ is 0, SupCon equals its loop.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 2, 3, generator=g, dtype=DT)
    y = torch.zeros(4, dtype=torch.long)
    close(R.supcon(x, y, temperature=0.5, reduction="none"), loop_supcon(x, y, 0.5))
    close(R.afcl(x, y, eta=5.0, temperature=0.5, reduction="none"),
          R.afcl(x, y, eta=0.0, temperature=0.5, reduction="none"))
    close(R.afcl(x, y, eta=5.0, temperature=0.5, normalize_by="pairs", reduction="none"),
          R.supcon(x, y, temperature=0.5, reduction="none"))
    # BCL with a single class and a single prototype
    p = torch.randn(1, 3, generator=g, dtype=DT)
    close(R.bcl(x, y, p, temperature=0.5, reduction="none"), loop_bcl(x, y, p, 0.5))


def test_bad_reduction_raises():
    with pytest.raises(ValueError):
        R.supcon(EX1, EX1_LABELS, reduction="avg")
