"""ltcl_fused.nn: every module equals its functional loss exactly (values and gradients, torch.equal), checks
its settings at construction with the functional's own messages, shows them in repr, and ResComLoss's queue
is module state (state_dict round trip, .to(device), enqueue policy)."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
import ltcl_fused.nn as lnn

B, D, C = 12, 6, 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _feats(shape, dtype, seed=0, norm=True):
    x = torch.randn(*shape, generator=_gen(seed), dtype=dtype)
    return F.normalize(x, dim=-1) if norm else x


def _labels(n, seed=1, classes=C):
    y = torch.randint(0, classes, (n,), generator=_gen(seed))
    y[0] = classes - 1  # a singleton-ish class, anchors without positives
    return y


def _inputs(kind, dtype):
    """Tensor arguments of one loss kind (leaf tensors that require grad where the loss is differentiable)."""
    if kind == "supervised":
        return [_feats((B, 2, D), dtype).requires_grad_(), _labels(B)], {}
    if kind == "supervised_ref":
        return ([_feats((B, 2, D), dtype).requires_grad_(), _labels(B)],
                dict(ref_features=_feats((5, D), dtype, 3).requires_grad_(), ref_labels=_labels(5, 4)))
    if kind == "simclr":
        return [_feats((B, 2, D), dtype).requires_grad_()], {}
    if kind == "bcl":
        return [_feats((B, 2, D), dtype).requires_grad_(), torch.arange(B) % C,
                _feats((C, D), dtype, 5).requires_grad_()], {}
    if kind == "two_view":
        return [_feats((B, D), dtype, 6).requires_grad_(), _feats((B, D), dtype, 7).requires_grad_()], {}
    if kind == "mttv":
        return [_feats((2 * B, D), dtype, 8, norm=False).requires_grad_()], {}
    raise KeyError(kind)


# (module class, functional, kwargs, input kind)
CASES = [
    (lnn.SupConLoss, lf.supcon, dict(temperature=0.1), "supervised"),
    (lnn.SupConLoss, lf.supcon, dict(temperature=0.3, base_temperature=0.07, contrast_mode="one",
                                     normalize=True, reduction="sum"), "supervised"),
    (lnn.SupConLoss, lf.supcon, dict(temperature=0.2, reduction="none"), "supervised_ref"),
    (lnn.SupConLoss, lf.supcon, dict(temperature=0.5), "simclr"),
    (lnn.AFCLLoss, lf.afcl, dict(gamma=2.0, eta=5.0, temperature=0.1), "supervised"),
    (lnn.AFCLLoss, lf.afcl, dict(gamma=0.5, eta=1.0, normalize_by="pairs", reduction="none"), "supervised_ref"),
    (lnn.FCLLoss, lf.fcl, dict(gamma=1.0, temperature=0.2), "supervised"),
    (lnn.ACLLoss, lf.acl, dict(eta=10.0, temperature=0.1, contrast_mode="one"), "supervised"),
    (lnn.BCLLoss, lf.bcl, dict(temperature=0.1), "bcl"),
    (lnn.BCLLoss, lf.bcl, dict(temperature=0.3, normalize=True, reduction="none"), "bcl"),
    (lnn.DCLLoss, lf.dcl, dict(temperature=0.5, tau_plus=0.1), "two_view"),
    (lnn.DCLLoss, lf.dcl, dict(temperature=0.2, debiased=False, reduction="none"), "two_view"),
    (lnn.HCLLoss, lf.hcl, dict(temperature=0.5, tau_plus=0.2, beta=2.0), "two_view"),
    (lnn.BayesianCLLoss, lf.bayesian_cl, dict(alpha=0.7, beta=0.6, tau_plus=0.1, temperature=0.5), "two_view"),
    (lnn.MTTVLoss, lf.mttv, dict(lower=0.05, upper=0.95, temperature=0.3), "mttv"),
    (lnn.MTTVLoss, lf.mttv, dict(lower=0.1, temperature=0.5, filter="low", official_self_term=True,
                                 reduction="none"), "mttv"),
]


def _value_and_grads(fn, args, kwargs):
    out = fn(*args, **kwargs)
    leaves = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)  # not a plain sum
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    return out.detach(), grads


def _fresh(args, kwargs):
    clone = lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"{CASES[i][0].__name__}-{i}")
def test_module_equals_functional(case, dtype, backend):
    cls, fn, kw, kind = CASES[case]
    args, tkw = _inputs(kind, dtype)
    mod = cls(backend=backend, **kw)
    a1, k1 = _fresh(args, tkw)
    a2, k2 = _fresh(args, tkw)
    v_mod, g_mod = _value_and_grads(mod, a1, k1)
    v_fn, g_fn = _value_and_grads(lambda *a, **k: fn(*a, backend=backend, **kw, **k), a2, k2)
    assert v_mod.dtype == v_fn.dtype and torch.equal(v_mod, v_fn)
    assert len(g_mod) == len(g_fn) and len(g_mod) >= 1
    for gm, gf in zip(g_mod, g_fn):
        assert (gm is None) == (gf is None)
        assert gm is None or torch.equal(gm, gf)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in g_mod)  # the comparison is not vacuous


# --- ResCom: the module owns the queue --------------------------------------------------------------------------


def _filled(loss, dtype, seed=20, rows=30):
    loss.queue.enqueue(_feats((rows, D), dtype, seed), _labels(rows, seed + 1))
    return loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(k_pos=1, k_neg=5, temperature=0.2),
                                dict(k_pos=2, k_neg=3, temperature=0.5, reduction="none", backend="torch"),
                                dict(k_pos=1, k_neg=4, temperature=0.1, class_weights=torch.tensor([1., 2., .5, 3.]),
                                     reduction="sum")])
def test_rescom_module_equals_functional(kw, dtype):
    loss = _filled(lnn.ResComLoss(C, 5, D, queue_dtype=dtype, **kw), dtype)
    x, y = _feats((B, 2, D), dtype).requires_grad_(), _labels(B)
    keys, key_labels = loss.queue.keys()
    fkw = {k: v for k, v in kw.items()}
    fkw.setdefault("allow_fewer", True)
    x2 = x.detach().clone().requires_grad_()
    v_fn = lf.rescom(x2, y, keys.clone(), key_labels.clone(), **fkw)
    v_mod = loss(x, y)
    assert torch.equal(v_mod, v_fn)
    w = torch.linspace(0.5, 1.5, v_fn.numel(), dtype=v_fn.dtype).reshape(v_fn.shape)
    (g_mod,) = torch.autograd.grad((v_mod * w).sum(), [x])
    (g_fn,) = torch.autograd.grad((v_fn * w).sum(), [x2])
    assert torch.equal(g_mod, g_fn) and bool(g_mod.abs().sum() > 0)


def test_rescom_enqueues_view0_after_the_loss_in_training_only():
    loss = lnn.ResComLoss(C, 3, D, k_pos=1, k_neg=2, queue_dtype=torch.float64)
    ref = lf.ClassBalancedQueue(C, 3, D, dtype=torch.float64)
    x, y = _feats((B, 2, D), torch.float64), _labels(B)
    first = loss(x, y)  # empty queue: batch columns only (allow_fewer=True by default)
    assert torch.equal(first, lf.rescom(x, y, *ref.keys(), k_pos=1, k_neg=2, allow_fewer=True))
    ref.enqueue(x[:, 0], y)
    for a, b in zip(loss.queue.keys(), ref.keys()):
        assert torch.equal(a, b)
    loss.eval()
    loss(_feats((B, 2, D), torch.float64, 9), _labels(B, 9))
    for a, b in zip(loss.queue.keys(), ref.keys()):  # eval mode: unchanged
        assert torch.equal(a, b)
    loss.train()
    loss.update_queue = False
    loss(_feats((B, 2, D), torch.float64, 9), _labels(B, 9))
    for a, b in zip(loss.queue.keys(), ref.keys()):
        assert torch.equal(a, b)
    x2, y2 = _feats((2 * B, D), torch.float64, 10), _labels(2 * B, 10)  # [N, D]: every row is enqueued
    loss.update_queue = True
    loss(x2, torch.cat([y2[:B], y2[B:]]))
    ref.enqueue(x2, y2)
    for a, b in zip(loss.queue.keys(), ref.keys()):
        assert torch.equal(a, b)


def test_rescom_state_dict_round_trip_and_device_move():
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    a = _filled(lnn.ResComLoss(C, 4, D, k_pos=1, k_neg=3, class_weights=w), torch.float32)
    sd = a.state_dict()
    assert {"queue.features", "queue.labels", "queue.ptr", "queue.filled", "class_weights"} <= set(sd)
    b = lnn.ResComLoss(C, 4, D, k_pos=1, k_neg=3, class_weights=torch.ones(C))
    b.load_state_dict(sd)
    for t, u in zip(a.queue.keys(), b.queue.keys()):
        assert torch.equal(t, u)
    assert torch.equal(b.class_weights, w)
    c = lnn.ResComLoss(C, 4, D, k_pos=1, k_neg=3)  # built without class weights: they load all the same
    c.load_state_dict(sd)
    assert torch.equal(c.class_weights, w)
    a.eval(), b.eval()
    x, y = _feats((B, 2, D), torch.float32), _labels(B)
    assert torch.equal(a(x, y), b(x, y))
    m = b.to(torch.device("meta"))  # no GPU here: the meta device shows that every buffer moves
    assert {t.device.type for t in m.buffers()} == {"meta"}
    with pytest.raises(ValueError, match=r"queue is on meta .*loss_fn\.to\(device\)"):
        m(x, y)


def test_rescom_queue_is_cast_to_the_features_dtype():
    loss = _filled(lnn.ResComLoss(C, 4, D, k_pos=1, k_neg=3), torch.float32)  # float32 queue
    loss.eval()
    x, y = _feats((B, 2, D), torch.float64), _labels(B)
    keys, kl = loss.queue.keys()
    assert torch.equal(loss(x, y), lf.rescom(x, y, keys.double(), kl, k_pos=1, k_neg=3, allow_fewer=True))


# --- settings: checked at construction with the functional's messages ------------------------------------------


BAD = [
    (lnn.SupConLoss, lf.supcon, "supervised", dict(temperature=0.0)),
    (lnn.SupConLoss, lf.supcon, "supervised", dict(base_temperature=-1.0)),
    (lnn.SupConLoss, lf.supcon, "supervised", dict(contrast_mode="both")),
    (lnn.SupConLoss, lf.supcon, "supervised", dict(reduction="avg")),
    (lnn.SupConLoss, lf.supcon, "supervised", dict(backend="gpu")),
    (lnn.AFCLLoss, lf.afcl, "supervised", dict(gamma=-1.0)),
    (lnn.AFCLLoss, lf.afcl, "supervised", dict(eta=float("nan"))),
    (lnn.AFCLLoss, lf.afcl, "supervised", dict(normalize_by="rows")),
    (lnn.FCLLoss, lf.fcl, "supervised", dict(gamma=-2.0)),
    (lnn.ACLLoss, lf.acl, "supervised", dict(eta=-2.0)),
    (lnn.BCLLoss, lf.bcl, "bcl", dict(temperature=-0.1)),
    (lnn.DCLLoss, lf.dcl, "two_view", dict(tau_plus=1.0)),
    (lnn.DCLLoss, lf.dcl, "two_view", dict(debiased="yes")),
    (lnn.HCLLoss, lf.hcl, "two_view", dict(beta=-1.0)),
    (lnn.BayesianCLLoss, lf.bayesian_cl, "two_view", dict(alpha=0.2)),
    (lnn.BayesianCLLoss, lf.bayesian_cl, "two_view", dict(beta=1.5)),
    (lnn.MTTVLoss, lf.mttv, "mttv", dict(lower=0.8, upper=0.2)),
    (lnn.MTTVLoss, lf.mttv, "mttv", dict(filter="high")),
    (lnn.MTTVLoss, lf.mttv, "mttv", dict(official_self_term=1)),
]


def _error(call):
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    return type(e.value), str(e.value)


@pytest.mark.parametrize("case", range(len(BAD)), ids=lambda i: f"{BAD[i][0].__name__}-{list(BAD[i][3])[0]}")
def test_bad_setting_raises_at_construction_like_the_functional(case):
    cls, fn, kind, kw = BAD[case]
    args, tkw = _inputs(kind, torch.float64)
    assert _error(lambda: cls(**kw)) == _error(lambda: fn(*args, **tkw, **kw))


@pytest.mark.parametrize("kw", [dict(k_pos=-1), dict(k_neg=1.5), dict(temperature=0.0), dict(reduction="x"),
                                dict(class_weights=torch.ones(C - 1))])
def test_rescom_bad_setting_raises_at_construction_like_the_functional(kw):
    x, y = _feats((B, 2, D), torch.float32), torch.arange(B) % C
    q, ql = _feats((8, D), torch.float32, 3), torch.arange(8) % C
    fkw = dict(kw)
    assert _error(lambda: lnn.ResComLoss(C, 3, D, **kw)) == _error(
        lambda: lf.rescom(x, y, q, ql, allow_fewer=True, **fkw))


@pytest.mark.parametrize("kw", [dict(mode="tree"), dict(grad_sync="avg"), dict(backend="reference")])
def test_distributed_settings_checked_at_construction(kw):
    with pytest.raises(ValueError, match=r"ltcl_fused\.distributed\.supcon: `(mode|grad_sync|backend)`"):
        lnn.SupConLoss(distributed=True, **kw)


def test_distributed_modules_call_the_distributed_losses(monkeypatch):
    import ltcl_fused.distributed as lfd
    calls = []
    for name in ("supcon", "afcl", "bcl", "rescom"):
        monkeypatch.setattr(lfd, name, lambda *a, _n=name, **k: calls.append((_n, a, k)) or torch.zeros(()))
    group = object()
    x, y = _feats((B, 2, D), torch.float32), _labels(B)
    lnn.SupConLoss(temperature=0.2, distributed=True, mode="ring", group=group, grad_sync="sum")(x, y)
    lnn.AFCLLoss(gamma=1.0, distributed=True, group=group)(x, y)
    lnn.BCLLoss(distributed=True, group=group)(x, y, _feats((C, D), torch.float32))
    lnn.ResComLoss(C, 2, D, k_pos=1, k_neg=2, distributed=True, group=group, update_queue=False)(x, y)
    assert [c[0] for c in calls] == ["supcon", "afcl", "bcl", "rescom"]
    n, a, k = calls[0]
    assert a[0] is x and a[1] is y
    assert k["temperature"] == 0.2 and k["mode"] == "ring" and k["group"] is group and k["grad_sync"] == "sum"
    assert all(c[2]["group"] is group and c[2]["mode"] in ("gather", "ring") for c in calls)
    assert calls[1][2]["gamma"] == 1.0 and calls[3][2]["k_neg"] == 2


# --- defaults, repr --------------------------------------------------------------------------------------------


MODULE_FN = [(lnn.SupConLoss, lf.supcon), (lnn.AFCLLoss, lf.afcl), (lnn.FCLLoss, lf.fcl), (lnn.ACLLoss, lf.acl),
             (lnn.BCLLoss, lf.bcl), (lnn.ResComLoss, lf.rescom), (lnn.DCLLoss, lf.dcl), (lnn.HCLLoss, lf.hcl),
             (lnn.BayesianCLLoss, lf.bayesian_cl), (lnn.MTTVLoss, lf.mttv)]
DOCUMENTED_DIFFERENT_DEFAULTS = {("ResComLoss", "allow_fewer")}  # the queue starts empty
TENSOR_KWARGS = {"ref_features", "ref_labels"}  # arguments of forward, not settings


def _kw_defaults(f):
    return {p.name: p.default for p in inspect.signature(f).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}


@pytest.mark.parametrize("cls,fn", MODULE_FN, ids=lambda v: getattr(v, "__name__", ""))
def test_constructor_defaults_are_the_functional_defaults(cls, fn):
    mod = _kw_defaults(cls.__init__)
    if fn in (lf.fcl, lf.acl):  # fcl/acl forward the rest to afcl with **kw
        fun = {**_kw_defaults(lf.afcl), **_kw_defaults(fn)}
        fun.pop("eta" if fn is lf.fcl else "gamma")
    else:
        fun = _kw_defaults(fn)
    for name, default in fun.items():
        if name in TENSOR_KWARGS:
            assert name in inspect.signature(cls.forward).parameters
            continue
        assert name in mod, f"{cls.__name__} lacks the setting {name!r}"
        if (cls.__name__, name) not in DOCUMENTED_DIFFERENT_DEFAULTS:
            assert mod[name] == default, (cls.__name__, name)


def test_extra_repr_shows_the_settings():
    r = repr(lnn.AFCLLoss(gamma=2.0, eta=5.0, temperature=0.1))
    assert r.startswith("AFCLLoss(") and "gamma=2.0" in r and "eta=5.0" in r and "temperature=0.1" in r
    assert "backend='auto'" in r and "normalize_by='batch'" in r
    r = repr(lnn.ResComLoss(10, 4, 8, k_neg=30, class_weights=torch.ones(10)))
    assert "num_classes=10" in r and "size_per_class=4" in r and "k_neg=30" in r and "class_weights=[10]" in r
    assert "mode='ring'" in repr(lnn.SupConLoss(distributed=True, mode="ring"))


def test_settings_stay_plain_attributes():
    loss = lnn.SupConLoss(temperature=0.5)
    x, y = _feats((B, 2, D), torch.float64), _labels(B)
    loss.temperature = 0.1
    assert torch.equal(loss(x, y), lf.supcon(x, y, temperature=0.1))
