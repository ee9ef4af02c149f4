"""Every public loss as ``call(features [B, 2, D], **kw)`` on one small fixed problem, for the tests that run the
same property over all losses and backends (host reads, double backward, torch.compile, the reference's
validation and output dtype). ``kw`` is passed through (backend, check_finite, ...)."""
import pytest
import torch
import torch.nn.functional as F

import ltcl_fused as lf
from ltcl_fused import backends

B, D, C = 6, 8, 3
FUSED = ("torch", "cpu", "triton")


def problem(dtype=torch.float64, seed=0):
    """Features [B, 2, D] (unit rows) and the fixed extra inputs of every loss, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, 2, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    extra = dict(
        y=torch.arange(B) % C,
        P=torch.randn(C, D, generator=g, dtype=torch.float64).to(dtype),
        R=F.normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=-1).to(dtype),
        Q=F.normalize(torch.randn(12, D, generator=g, dtype=torch.float64), dim=-1).to(dtype),
        ql=torch.arange(12) % C,
        w=torch.tensor([1.0, 2.0, 0.5]),
    )
    return x, extra


def cases(extra):
    y = extra["y"]
    return {
        "supcon": lambda f, **kw: lf.supcon(f, y, temperature=0.5, ref_features=extra["R"],
                                            ref_labels=torch.arange(4) % C, **kw),
        "afcl": lambda f, **kw: lf.afcl(f, y, gamma=1.0, eta=1.0, temperature=0.5, **kw),
        "fcl": lambda f, **kw: lf.fcl(f, y, temperature=0.5, **kw),
        "acl": lambda f, **kw: lf.acl(f, y, temperature=0.5, **kw),
        "bcl": lambda f, **kw: lf.bcl(f, y, extra["P"], temperature=0.5, **kw),
        "rescom": lambda f, **kw: lf.rescom(f, y, extra["Q"], extra["ql"], k_pos=2, k_neg=3,
                                            class_weights=extra["w"], **kw),
        "dcl": lambda f, **kw: lf.dcl(f[:, 0], f[:, 1], **kw),
        "hcl": lambda f, **kw: lf.hcl(f[:, 0], f[:, 1], **kw),
        "bayesian_cl": lambda f, **kw: lf.bayesian_cl(f[:, 0], f[:, 1], **kw),
        "mttv": lambda f, **kw: lf.mttv(f.reshape(2 * B, D), **kw),
    }


LOSSES = sorted(cases(problem()[1]))


def require(backend):
    """Skip unless ``backend`` runs on CPU tensors here (cpu: the C++ extension; triton: the interpreter)."""
    if backend == "reference":
        return
    reason = backends.get_engine(backend).unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
