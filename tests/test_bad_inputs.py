"""Every bad input gets a clear error that names the argument (never a silent wrong answer)."""
import re

import pytest
import torch

import ltcl_fused as lf

X = torch.randn(6, 4)
Y = torch.tensor([0, 1, 0, 1, 2, 2])


def _raises(exc, argname, fn, *a, **kw):
    with pytest.raises(exc) as ei:
        fn(*a, **kw)
    msg = str(ei.value)
    assert f"`{argname}`" in msg or argname in msg, msg
    return msg


SOFTMAX_LOSSES = [lf.supcon, lf.afcl, lf.fcl, lf.acl]


@pytest.mark.parametrize("loss", SOFTMAX_LOSSES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_features_rank_dtype_empty(loss, backend):
    _raises(ValueError, "features", loss, torch.randn(6), Y, backend=backend)
    _raises(ValueError, "features", loss, torch.randn(2, 3, 4, 5), Y, backend=backend)
    _raises(TypeError, "features", loss, torch.ones(6, 4, dtype=torch.int64), Y, backend=backend)
    _raises(TypeError, "features", loss, X.numpy(), Y, backend=backend)
    _raises(ValueError, "features", loss, torch.randn(0, 4), torch.zeros(0, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("loss", SOFTMAX_LOSSES)
def test_labels(loss):
    _raises(ValueError, "labels", loss, X, Y[:5], backend="torch")
    _raises(TypeError, "labels", loss, X, Y.float(), backend="torch")
    _raises(TypeError, "labels", loss, X, Y.bool(), backend="torch")
    _raises(ValueError, "labels", loss, X, Y[:, None], backend="torch")
    _raises(TypeError, "labels", loss, X, [0, 1, 0, 1, 2, 2], backend="torch")
    # [B, V, D]: one label per sample, not per view
    msg = _raises(ValueError, "labels", loss, torch.randn(3, 2, 4), torch.tensor([0, 1, 0, 1, 0, 1]), backend="torch")
    assert "[3]" in msg


@pytest.mark.parametrize("loss", SOFTMAX_LOSSES)
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), "0.1"])
def test_temperature(loss, bad):
    _raises(ValueError, "temperature", loss, X, Y, temperature=bad, backend="torch")


@pytest.mark.parametrize("name", ["gamma", "eta"])
@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_gamma_eta(name, bad):
    _raises(ValueError, name, lf.afcl, X, Y, backend="torch", **{name: bad})


def test_options():
    _raises(ValueError, "normalize_by", lf.afcl, X, Y, normalize_by="anchors", backend="torch")
    _raises(ValueError, "contrast_mode", lf.supcon, X, Y, contrast_mode="two", backend="torch")
    _raises(ValueError, "reduction", lf.supcon, X, Y, reduction="avg", backend="torch")
    _raises(ValueError, "base_temperature", lf.supcon, X, Y, base_temperature=0, backend="torch")


def test_backend_name_lists_valid_ones():
    msg = _raises(ValueError, "backend", lf.supcon, X, Y, backend="gpu")
    for b in lf.BACKENDS:
        assert repr(b) in msg


@pytest.mark.parametrize("loss", SOFTMAX_LOSSES)
def test_non_finite(loss):
    for v in (float("nan"), float("inf")):
        Z = X.clone()
        Z[2, 1] = v
        msg = _raises(ValueError, "features", loss, Z, Y, backend="torch")
        assert "check_finite=False" in msg
    # the check can be skipped (then the result is the caller's business, but no crash)
    Z = X.clone()
    Z[2, 1] = float("nan")
    loss(Z, Y, backend="torch", check_finite=False)


def test_ref_features():
    R = torch.randn(3, 4)
    RL = torch.tensor([0, 1, 5])
    _raises(ValueError, "ref_labels", lf.supcon, X, Y, ref_features=R, backend="torch")
    _raises(ValueError, "ref_labels", lf.supcon, X, Y, ref_features=R, ref_labels=RL[:2], backend="torch")
    _raises(ValueError, "ref_features", lf.supcon, X, Y, ref_features=torch.randn(3, 5), ref_labels=RL,
            backend="torch")
    _raises(TypeError, "ref_features", lf.supcon, X, Y, ref_features=R.double(), ref_labels=RL, backend="torch")
    _raises(ValueError, "ref_features", lf.supcon, X, Y, ref_features=torch.randn(3), ref_labels=RL,
            backend="torch")
    _raises(ValueError, "ref_labels", lf.supcon, X, None, ref_features=R, ref_labels=RL, backend="torch")
    _raises(ValueError, "ref_labels", lf.supcon, X, Y, ref_labels=RL, backend="torch")


def test_meta_device_mismatch():
    # a device mismatch between labels and features (meta tensors stand in for a second device here)
    msg = _raises(ValueError, "labels", lf.supcon, X, Y.to("meta"), backend="torch")
    assert "meta" in msg
    R = torch.randn(3, 4, device="meta")
    _raises(ValueError, "ref_features", lf.supcon, X, Y, ref_features=R, ref_labels=torch.tensor([0, 1, 2]),
            backend="torch")


def test_bcl_inputs():
    F3 = torch.randn(4, 2, 5)
    lab = torch.tensor([0, 1, 2, 1])
    P = torch.randn(3, 5)
    _raises(ValueError, "prototypes", lf.bcl, F3, lab, torch.randn(3, 4), backend="torch")
    _raises(ValueError, "prototypes", lf.bcl, F3, lab, torch.randn(3), backend="torch")
    _raises(TypeError, "prototypes", lf.bcl, F3, lab, P.double(), backend="torch")
    _raises(ValueError, "labels", lf.bcl, F3, torch.tensor([0, 1, 3, 1]), P, backend="torch")
    _raises(ValueError, "labels", lf.bcl, F3, torch.tensor([0, 1, -1, 1]), P, backend="torch")
    _raises(ValueError, "labels", lf.bcl, F3, lab[:3], P, backend="torch")
    Pn = P.clone()
    Pn[0, 0] = float("nan")
    _raises(ValueError, "prototypes", lf.bcl, F3, lab, Pn, backend="torch")


def test_mining_k_larger_than_candidates():
    A = torch.randn(4, 3)
    al = torch.tensor([0, 0, 1, 1])
    K = torch.randn(6, 3)
    kl = torch.tensor([0, 0, 0, 1, 1, 2])
    msg = _raises(ValueError, "k_pos", lf.hard_pair_mining, A, al, K, kl, k_pos=3, k_neg=1)
    assert re.search(r"\b2\b", msg)  # class 1 has only 2 keys
    _raises(ValueError, "k_neg", lf.hard_pair_mining, A, al, K, kl, k_pos=1, k_neg=4)
    _raises(ValueError, "k_pos", lf.hard_pair_mining, A, al, K, kl, k_pos=-1, k_neg=1)
    _raises(ValueError, "k_neg", lf.rescom, torch.randn(4, 3), al, K, kl, k_pos=1, k_neg=10)


def test_self_supervised_inputs():
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    for loss in (lf.dcl, lf.hcl, lf.bayesian_cl):
        _raises(ValueError, "z2", loss, z1, torch.randn(4, 3))
        _raises(ValueError, "z1", loss, torch.randn(5), z2)
        _raises(ValueError, "temperature", loss, z1, z2, temperature=0)
        _raises(ValueError, "tau_plus", loss, z1, z2, tau_plus=1.0)
    _raises(ValueError, "alpha", lf.bayesian_cl, z1, z2, alpha=0.2)
    _raises(ValueError, "beta", lf.bayesian_cl, z1, z2, beta=1.5)
    _raises(ValueError, "embeddings", lf.mttv, torch.randn(5, 3))
    _raises(ValueError, "filter", lf.mttv, torch.randn(6, 3), filter="high")
    _raises(ValueError, "lower", lf.mttv, torch.randn(6, 3), lower=0.95, upper=0.9)
