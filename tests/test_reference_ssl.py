"""Tests of the dense reference: SimCLR/DCL/HCL/Bayesian CL (SPEC.md section 5) and MTTV (section 6).

Expected values are closed forms derived by hand (see comments) or independent loops; never the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ltcl_fused import reference as R

E = math.e
DT = torch.float64
S3 = math.sqrt(3.0)


def t(x, dtype=DT):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-10):
    a = torch.as_tensor(a, dtype=DT)
    b = torch.as_tensor(b, dtype=DT)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=False), (a, b)


def omega(u, alpha, beta, tau_plus):
    """ω(u) written out from SPEC.md section 5 with Python floats."""
    tm = 1 - tau_plus
    a = (1 - 2 * alpha) * (tm - tau_plus) + 1e-3
    b = 2 * (alpha * tm + (1 - alpha) * tau_plus)
    x = (-b + math.sqrt(b * b + 4 * a * u)) / (2 * a)
    f1, f2 = 2 * (1 - x), 2 * x
    tn = alpha * f1 + (1 - alpha) * f2
    fn = (1 - alpha) * f1 + alpha * f2
    htn = (alpha * (1 - beta) * f1 + (1 - alpha) * beta * f2) / (alpha * (1 - beta) + (1 - alpha) * beta + 1e-3)
    return htn / (tm * tn + tau_plus * fn)


# Setup A, t=1: z1 = [(1,0),(0,1)], z2 = [(1,0),(0,-1)]; anchors a0..a3 = [z1; z2]; pairs 0<->2, 1<->3.
# a0: s+ = 1, negatives a1, a3: s = 0, 0      a1: s+ = -1, negatives a0, a2: 0, 0
# a2: like a0 (s+ = 1, negs 0, 0)             a3: like a1 (s+ = -1, negs 0, 0)       M = 2
A1 = t([[1.0, 0.0], [0.0, 1.0]])
A2 = t([[1.0, 0.0], [0.0, -1.0]])
# Setup B, t=1: z1 = [(1,0),(0,1)], z2 = [(0,1),(-1,0)]; every s+ = 0 (orthogonal pairs)
# a0=(1,0): negatives a1 (0), a3 (-1)       a1=(0,1): negatives a0 (0), a2 (1)
# a2=(0,1): negatives a1 (1), a3 (0)        a3=(-1,0): negatives a0 (-1), a2 (0)
B1 = t([[1.0, 0.0], [0.0, 1.0]])
B2 = t([[0.0, 1.0], [-1.0, 0.0]])


def test_simclr_hand():
    # ℓ = -log(e+ / (e+ + Σ e_neg)): a0: log(e + 2) - 1 ; a1: log(e^-1 + 2) + 1
    la, lb = math.log(E + 2) - 1, math.log(E ** -1 + 2) + 1
    close(R.dcl(A1, A2, temperature=1.0, debiased=False, reduction="none"), [la, lb, la, lb])
    close(R.dcl(A1, A2, temperature=1.0, debiased=False), (la + lb) / 2)
    close(R.dcl(A1, A2, temperature=1.0, debiased=False, reduction="sum"), 2 * (la + lb))


def test_dcl_hand():
    # τ+=0.1, M=2: Ng = max((Σneg - 0.1·2·e+)/0.9, 2e^-1)
    # a0: (2 - 0.2e)/0.9 ≈ 1.618 > 0.736 -> ℓ = log(e + (2-0.2e)/0.9) - 1
    # a1: (2 - 0.2e^-1)/0.9 ≈ 2.14     -> ℓ = log(e^-1 + (2-0.2e^-1)/0.9) + 1
    la = math.log(E + (2 - 0.2 * E) / 0.9) - 1
    lb = math.log(E ** -1 + (2 - 0.2 * E ** -1) / 0.9) + 1
    close(R.dcl(A1, A2, temperature=1.0, tau_plus=0.1, reduction="none"), [la, lb, la, lb])
    # τ+=0.5 hits the floor on a0: (2 - e)/0.5 < 0 -> Ng = 2e^-1 ; a1: (2 - e^-1)/0.5
    la = math.log(E + 2 * E ** -1) - 1
    lb = math.log(E ** -1 + 2 * (2 - E ** -1)) + 1
    close(R.dcl(A1, A2, temperature=1.0, tau_plus=0.5, reduction="none"), [la, lb, la, lb])
    # t=0.5: s doubles, floor 2e^-2. a0: e+ = e², Ng = (2 - 0.2e²)/0.9 ≈ 0.58 > 0.27
    la = math.log(E ** 2 + (2 - 0.2 * E ** 2) / 0.9) - 2
    lb = math.log(E ** -2 + (2 - 0.2 * E ** -2) / 0.9) + 2
    close(R.dcl(A1, A2, temperature=0.5, tau_plus=0.1), (la + lb) / 2)


def test_hcl_hand():
    # setup B, β=1, τ+=0.1, t=1, e+ = 1: reweighted = M Σe²/Σe = 2(x1² + x2²)/(x1 + x2)
    # Ng = max((rw - 0.1·2·1)/0.9, 2e^-1), ℓ = log(1 + Ng)
    def row(x1, x2, beta=1.0):
        rw = 2 * (x1 ** (1 + beta) + x2 ** (1 + beta)) / (x1 ** beta + x2 ** beta)
        return math.log(1 + max((rw - 0.2) / 0.9, 2 * E ** -1))

    la, lb = row(1.0, E ** -1), row(1.0, E)   # a0/a3 see {1, e^-1}; a1/a2 see {1, e}
    close(R.hcl(B1, B2, temperature=1.0, tau_plus=0.1, beta=1.0, reduction="none"), [la, lb, lb, la])
    # β = 0: plain mean weights -> HCL equals DCL
    close(R.hcl(B1, B2, temperature=1.0, tau_plus=0.1, beta=0.0, reduction="none"),
          R.dcl(B1, B2, temperature=1.0, tau_plus=0.1, reduction="none"))
    la, lb = row(1.0, E ** -1, 0.5), row(1.0, E, 0.5)
    close(R.hcl(B1, B2, temperature=1.0, tau_plus=0.1, beta=0.5), (la + lb) / 2)


def test_bayesian_hand_ties_count():
    # setup A: every row has two tied negatives (s = 0): u = #{k: e_k <= e_j}/M = 2/2 = 1 for both
    # (strict counting would give 0, argsort ranks 1/2 and 1). Ng = 2 ω(1) · e^0.
    w1 = omega(1.0, 0.5, 1.0, 0.1)
    la = math.log(E + 2 * w1) - 1
    lb = math.log(E ** -1 + 2 * w1) + 1
    close(R.bayesian_cl(A1, A2, temperature=1.0, reduction="none"), [la, lb, la, lb])


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (0.7, 0.8), (1.0, 0.5)])
def test_bayesian_hand_distinct(alpha, beta):
    # setup B: a0 negatives a1 (e^0) and a3 (e^-1): u = 1 and 1/2 -> Ng0 = ω(1)·1 + ω(½)·e^-1
    #          a1 negatives a0 (e^0) and a2 (e^1):  u = 1/2 and 1 -> Ng1 = ω(½)·1 + ω(1)·e
    w1, wh = omega(1.0, alpha, beta, 0.1), omega(0.5, alpha, beta, 0.1)
    la = math.log(1 + w1 + wh * E ** -1)
    lb = math.log(1 + wh + w1 * E)
    close(R.bayesian_cl(B1, B2, alpha=alpha, beta=beta, tau_plus=0.1, temperature=1.0, reduction="none"),
          [la, lb, lb, la])


def test_bayesian_weights_helper_matches_spec():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=DT)
    got = R.bayesian_weights(u, alpha=0.6, beta=0.9, tau_plus=0.2)
    close(got, [omega(float(v), 0.6, 0.9, 0.2) for v in u])


# -------------------------------------------------------------------------------------------------------
# loops over random inputs
# -------------------------------------------------------------------------------------------------------
def loop_ssl(z1, z2, t_, kind, tau_plus=0.1, beta=1.0, alpha=0.5):
    z = z1.tolist() + z2.tolist()
    B = len(z1)
    n = 2 * B
    M = n - 2
    out = []
    for i in range(n):
        ip = (i + B) % n
        e = lambda j: math.exp(sum(a * b for a, b in zip(z[i], z[j])) / t_)  # noqa: E731
        ep = e(ip)
        negs = [e(j) for j in range(n) if j not in (i, ip)]
        if kind == "simclr":
            ng = sum(negs)
        elif kind == "dcl":
            ng = max((sum(negs) - tau_plus * M * ep) / (1 - tau_plus), M * math.exp(-1 / t_))
        elif kind == "hcl":
            rw = M * sum(x ** (1 + beta) for x in negs) / sum(x ** beta for x in negs)
            ng = max((rw - tau_plus * M * ep) / (1 - tau_plus), M * math.exp(-1 / t_))
        else:
            ng = sum(omega(sum(1 for y in negs if y <= x) / M, alpha, beta, tau_plus) * x for x in negs)
        out.append(-math.log(ep / (ep + ng)))
    return out


@pytest.mark.parametrize("kind", ["simclr", "dcl", "hcl", "bayes"])
def test_ssl_vs_loops(kind):
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(4, 5, generator=g, dtype=DT), dim=1)
    z2 = F.normalize(torch.randn(4, 5, generator=g, dtype=DT), dim=1)
    if kind == "simclr":
        got = R.dcl(z1, z2, temperature=0.5, debiased=False, reduction="none")
        exp = loop_ssl(z1, z2, 0.5, "simclr")
    elif kind == "dcl":
        got = R.dcl(z1, z2, temperature=0.3, tau_plus=0.2, reduction="none")
        exp = loop_ssl(z1, z2, 0.3, "dcl", tau_plus=0.2)
    elif kind == "hcl":
        got = R.hcl(z1, z2, temperature=0.3, tau_plus=0.05, beta=1.5, reduction="none")
        exp = loop_ssl(z1, z2, 0.3, "hcl", tau_plus=0.05, beta=1.5)
    else:
        got = R.bayesian_cl(z1, z2, alpha=0.8, beta=0.7, tau_plus=0.1, temperature=0.5, reduction="none")
        exp = loop_ssl(z1, z2, 0.5, "bayes", tau_plus=0.1, beta=0.7, alpha=0.8)
    close(got, exp)


def test_ssl_large_logits_stay_finite():
    # unnormalised inputs with |s| ~ 400 would overflow exp() in a naive implementation
    g = torch.Generator().manual_seed(1)
    z1 = 20 * torch.randn(3, 4, generator=g, dtype=DT)
    z2 = z1 + torch.randn(3, 4, generator=g, dtype=DT)
    for fn in (lambda: R.dcl(z1, z2, temperature=0.1), lambda: R.dcl(z1, z2, debiased=False),
               lambda: R.hcl(z1, z2, temperature=0.1), lambda: R.bayesian_cl(z1, z2, temperature=0.1)):
        assert torch.isfinite(fn())


@pytest.mark.parametrize("name", ["simclr", "dcl", "hcl", "bayesian_cl"])
def test_ssl_gradcheck(name):
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    fns = {
        "simclr": lambda a, b: R.dcl(a, b, temperature=0.7, debiased=False),
        "dcl": lambda a, b: R.dcl(a, b, temperature=0.7, tau_plus=0.1, reduction="none"),
        "hcl": lambda a, b: R.hcl(a, b, temperature=0.7, tau_plus=0.1, beta=1.0),
        "bayesian_cl": lambda a, b: R.bayesian_cl(a, b, alpha=0.7, beta=0.8, temperature=0.7, reduction="sum"),
    }
    assert torch.autograd.gradcheck(fns[name], (z1, z2))


def test_ssl_single_pair_is_zero():
    # B = 1: no negatives (M = 0): Ng = 0 and ℓ = -log(e+/e+) = 0 with finite gradients
    z1 = torch.randn(1, 3, dtype=DT, requires_grad=True)
    z2 = torch.randn(1, 3, dtype=DT, requires_grad=True)
    for fn in (R.dcl, R.hcl, R.bayesian_cl):
        loss = fn(z1, z2)
        close(loss.detach(), 0.0)
        loss.backward()
        assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
        z1.grad = z2.grad = None


# -------------------------------------------------------------------------------------------------------
# MTTV
# -------------------------------------------------------------------------------------------------------
# rows 0<->1, 2<->3: e0=(1,0), e1=(1/2, √3/2), e2=(0,1), e3=(-1,0)
# cos: 01 = .5, 02 = 0, 03 = -1, 12 = √3/2 ≈ .866, 13 = -.5, 23 = 0 ; self = 1
# filter "both" (lower .1, upper .9) keeps 01, 12, 13 ; "low" keeps 01, 03, 12, 13 (and self)
MT = t([[1.0, 0.0], [0.5, S3 / 2], [0.0, 1.0], [-1.0, 0.0]])


def test_mttv_hand_both():
    # t=1: r0 = e^.5 / e^.5 = 1 ; r1 = e^.5 / (e^.5 + e^{√3/2} + e^-.5) ; pairs 2-3 dropped -> r2 = r3 = 0
    r1 = E ** 0.5 / (E ** 0.5 + E ** (S3 / 2) + E ** -0.5)
    close(R.mttv(MT, temperature=1.0, reduction="none"), [1.0, r1, 0.0, 0.0])
    close(R.mttv(MT, temperature=1.0), -math.log((1 + r1) / 4))
    close(R.mttv(MT, temperature=1.0, reduction="sum"), -math.log((1 + r1) / 4))  # sum == mean for MTTV
    # t=0.5: exponents double
    r1 = E ** 1.0 / (E ** 1.0 + E ** S3 + E ** -1.0)
    close(R.mttv(MT, temperature=0.5), -math.log((1 + r1) / 4))
    # scale invariance (cosine similarity inside)
    close(R.mttv(MT * t([[3.0], [0.5], [2.0], [7.0]]), temperature=0.5), -math.log((1 + r1) / 4))


def test_mttv_hand_low_and_official():
    # "low": r0 = e^.5 / (e^.5 + e^-1) (03 kept now) ; r1 unchanged ; r2 = r3 = 0
    r0 = E ** 0.5 / (E ** 0.5 + E ** -1)
    r1 = E ** 0.5 / (E ** 0.5 + E ** (S3 / 2) + E ** -0.5)
    close(R.mttv(MT, temperature=1.0, filter="low", reduction="none"), [r0, r1, 0.0, 0.0])
    close(R.mttv(MT, temperature=1.0, filter="low"), -math.log((r0 + r1) / 4))
    # official self term with "low": self (cos 1) is kept and then e^{1/t} subtracted -> same as default
    close(R.mttv(MT, temperature=1.0, filter="low", official_self_term=True, reduction="none"),
          [r0, r1, 0.0, 0.0], tol=1e-9)
    # official self term with "both": self already dropped, e^{1/t} is subtracted anyway (released-code quirk)
    q0 = E ** 0.5 / (E ** 0.5 - E)
    q1 = E ** 0.5 / (E ** 0.5 + E ** (S3 / 2) + E ** -0.5 - E)
    close(R.mttv(MT, temperature=1.0, official_self_term=True, reduction="none"), [q0, q1, 0.0, 0.0])


def loop_mttv(x, lower, upper, t_, filt, official):
    z = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in x.tolist()]
    n = len(z)
    r = []
    for i in range(n):
        def kept(j):
            c = abs(sum(a * b for a, b in zip(z[i], z[j])))
            return not (c < lower or (filt == "both" and c > upper))
        ex = lambda j: math.exp(sum(a * b for a, b in zip(z[i], z[j])) / t_)  # noqa: E731
        ip = i + 1 if i % 2 == 0 else i - 1
        if official:
            den = sum(ex(j) for j in range(n) if kept(j)) - math.exp(1 / t_)
        else:
            den = sum(ex(j) for j in range(n) if j != i and kept(j))
        r.append(ex(ip) / den if kept(ip) else 0.0)
    mean = sum(r) / n
    return r, (-math.log(mean) if mean > 0 else None)  # the official quirk can make the mean <= 0


@pytest.mark.parametrize("filt", ["both", "low"])
@pytest.mark.parametrize("official", [False, True])
def test_mttv_vs_loops(filt, official):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    r, L = loop_mttv(x, 0.2, 0.8, 0.3, filt, official)
    close(R.mttv(x, lower=0.2, upper=0.8, temperature=0.3, filter=filt, official_self_term=official,
                 reduction="none"), r, tol=1e-8)
    got = R.mttv(x, lower=0.2, upper=0.8, temperature=0.3, filter=filt, official_self_term=official)
    if L is not None:
        close(got, L, tol=1e-8)
    else:  # released-code quirk: a negative mean ratio, log of it is NaN (reproduced, not hidden)
        assert torch.isnan(got)


def test_mttv_gradcheck():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: R.mttv(a, lower=0.05, upper=0.95, temperature=0.5), (x,))
    assert torch.autograd.gradcheck(lambda a: R.mttv(a, filter="low", reduction="none"), (x,))


def test_mttv_all_dropped_and_odd_rows():
    # a single orthogonal pair: cos = 0 < lower -> r = [0, 0], L = +inf (not NaN), finite gradient of r
    x = t([[1.0, 0.0], [0.0, 1.0]]).requires_grad_()
    r = R.mttv(x, reduction="none")
    close(r.detach(), [0.0, 0.0])
    r.sum().backward()
    assert torch.isfinite(x.grad).all()
    L = R.mttv(x.detach())
    assert torch.isinf(L) and L > 0
    with pytest.raises(ValueError):
        R.mttv(torch.randn(3, 2, dtype=DT))
