"""Issue 13 item 9: ``backend="reference"`` goes through the same public checks and the same output-dtype rule as
every backend. For every loss, each bad input of its class is rejected by the reference exactly as by the
fused backends (same exception type, same message), ``check_finite`` is honoured, and the loss comes back
in float32 for fp16/bf16/fp32 inputs (float64 for float64) on every backend, reduction="none" included.
(The plain ``ltcl_fused.reference.<loss>`` functions stay raw dense oracles: no validation, input dtype.)"""
import pytest
import torch

import ltcl_fused as lf
from loss_cases import B, C, D, FUSED, LOSSES, cases, problem, require

X, EXTRA = problem(torch.float32)
Y, P, R, Q, QL = EXTRA["y"], EXTRA["P"], EXTRA["R"], EXTRA["Q"], EXTRA["ql"]
RL = torch.arange(4) % C
NAN_X = X.clone()
NAN_X[2, 1, 3] = float("nan")


def _label_variants(y):
    return {"float labels": y.float(), "bool labels": y.bool(), "2-D labels": y[:, None], "list labels": y.tolist(),
            "labels on meta": y.to("meta"), "too few labels": y[:-1]}


def _bad_calls(loss):
    """name -> call(backend) for the bad inputs of ``loss``'s class."""
    calls = {}
    if loss in ("supcon", "afcl", "fcl", "acl"):
        fn = getattr(lf, loss)
        for name, y in _label_variants(Y).items():
            calls[name] = lambda be, y=y: fn(X, y, backend=be)
        calls.update({
            "int features": lambda be: fn(X.long(), Y, backend=be),
            "NaN features": lambda be: fn(NAN_X, Y, backend=be),
            "ref_features fp64": lambda be: fn(X, Y, ref_features=R.double(), ref_labels=RL, backend=be),
            "ref_features wrong D": lambda be: fn(X, Y, ref_features=R[:, :-1], ref_labels=RL, backend=be),
            "ref_features 1-D": lambda be: fn(X, Y, ref_features=R[0], ref_labels=RL, backend=be),
            "ref_features NaN": lambda be: fn(X, Y, ref_features=R.clone().fill_(float("nan")), ref_labels=RL,
                                              backend=be),
            "ref_labels count": lambda be: fn(X, Y, ref_features=R, ref_labels=RL[:3], backend=be),
            "ref_labels missing": lambda be: fn(X, Y, ref_features=R, backend=be),
            "ref_labels without ref_features": lambda be: fn(X, Y, ref_labels=RL, backend=be),
            "ref_labels without labels": lambda be: fn(X, None, ref_features=R, ref_labels=RL, backend=be),
            "contrast_mode": lambda be: fn(X, Y, contrast_mode="two", backend=be),
            "check_finite not a bool": lambda be: fn(X, Y, check_finite="no", backend=be),
        })
    elif loss == "bcl":
        for name, y in _label_variants(Y).items():
            calls[name] = lambda be, y=y: lf.bcl(X, y, P, backend=be)
        calls.update({
            "label out of range": lambda be: lf.bcl(X, torch.where(Y == 0, C, Y), P, backend=be),
            "negative label": lambda be: lf.bcl(X, Y - 1, P, backend=be),
            "prototypes fp64": lambda be: lf.bcl(X, Y, P.double(), backend=be),
            "prototypes wrong D": lambda be: lf.bcl(X, Y, P[:, :-1], backend=be),
            "prototypes 3-D": lambda be: lf.bcl(X, Y, P[None], backend=be),
            "NaN prototypes": lambda be: lf.bcl(X, Y, P.clone().fill_(float("nan")), backend=be),
            "NaN features": lambda be: lf.bcl(NAN_X, Y, P, backend=be),
        })
    elif loss == "rescom":
        def rc(be, f=X, y=Y, q=Q, ql=QL, **kw):
            return lf.rescom(f, y, q, ql, k_pos=2, k_neg=3, backend=be, **kw)
        for name, y in _label_variants(Y).items():
            calls[name] = lambda be, y=y: rc(be, y=y)
        calls.update({
            "queue fp64": lambda be: rc(be, q=Q.double()),
            "queue wrong D": lambda be: rc(be, q=Q[:, :-1]),
            "queue 1-D": lambda be: rc(be, q=Q[0]),
            "queue_labels count": lambda be: rc(be, ql=QL[:-1]),
            "queue_labels float": lambda be: rc(be, ql=QL.float()),
            "NaN queue": lambda be: rc(be, q=Q.clone().fill_(float("nan"))),
            "NaN features": lambda be: rc(be, f=NAN_X),
            "negative class_weights": lambda be: rc(be, class_weights=-torch.ones(C)),
            "NaN class_weights": lambda be: rc(be, class_weights=torch.tensor([1.0, float("nan"), 1.0])),
            "short class_weights": lambda be: rc(be, class_weights=torch.ones(C - 1)),
            "2-D class_weights": lambda be: rc(be, class_weights=torch.ones(C, 1)),
            "k_neg above the candidates": lambda be: lf.rescom(X, Y, Q, QL, k_pos=1, k_neg=9, backend=be),
            "k_pos above the candidates": lambda be: lf.rescom(X, Y, Q, QL, k_pos=5, k_neg=1, backend=be),
        })
    elif loss in ("dcl", "hcl", "bayesian_cl"):
        fn = getattr(lf, loss)
        z1, z2 = X[:, 0], X[:, 1]
        calls.update({
            "z2 shorter": lambda be: fn(z1, z2[:-1], backend=be),
            "z2 fp64": lambda be: fn(z1, z2.double(), backend=be),
            "z1 1-D": lambda be: fn(z1[0], z2, backend=be),
            "NaN z1": lambda be: fn(NAN_X[:, 1], z2, backend=be),
            "NaN z2": lambda be: fn(z1, NAN_X[:, 1], backend=be),
            "tau_plus": lambda be: fn(z1, z2, tau_plus=1.0, backend=be),
            "check_finite not a bool": lambda be: fn(z1, z2, check_finite=1, backend=be),
        })
    else:  # mttv
        E = X.reshape(2 * B, D)
        calls.update({
            "odd rows": lambda be: lf.mttv(E[:-1], backend=be),
            "3-D embeddings": lambda be: lf.mttv(X, backend=be),
            "int embeddings": lambda be: lf.mttv(E.long(), backend=be),
            "NaN embeddings": lambda be: lf.mttv(NAN_X.reshape(2 * B, D), backend=be),
            "lower > upper": lambda be: lf.mttv(E, lower=0.8, upper=0.5, backend=be),
            "check_finite not a bool": lambda be: lf.mttv(E, check_finite=None, backend=be),
        })
    return calls


def _error(call, backend):
    with pytest.raises((TypeError, ValueError)) as ei:
        call(backend)
    return type(ei.value), str(ei.value)


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_rejects_exactly_what_the_fused_backends_reject(loss):
    calls = _bad_calls(loss)
    assert len(calls) >= 6
    for name, call in calls.items():
        expected = _error(call, "torch")
        assert f"ltcl_fused.{loss}:" in expected[1], (name, expected)
        for backend in ("reference",) + tuple(b for b in FUSED[1:] if _runs(b)):
            assert _error(call, backend) == expected, (name, backend)


def _runs(backend):
    from ltcl_fused import backends
    return backends.get_engine(backend).unavailable_reason(torch.device("cpu")) is None


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_every_loss_returns_float32_or_float64_on_every_backend(backend, dtype):
    require(backend)
    x, extra = problem(dtype)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for loss, call in cases(extra).items():
        for reduction in ("mean", "none"):
            f = x.clone().requires_grad_()
            out = call(f, backend=backend, reduction=reduction)
            assert out.dtype == want, (loss, reduction, out.dtype)
            out.sum().backward()
            assert f.grad.dtype == dtype, loss
