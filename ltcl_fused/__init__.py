"""ltcl_fused: fused, memory-efficient contrastive losses for class-imbalanced, long-tailed data.

The public API is fixed by SPEC.md; ``ltcl_fused.reference`` holds the dense oracle implementations.
``ltcl_fused.nn`` has the same losses as ``torch.nn.Module`` s; ``ltcl_fused.distributed`` (the losses over
``torch.distributed``) and ``ltcl_fused.integrations`` are imported on first access.
"""
import importlib as _importlib
from typing import Any as _Any, List as _List

from . import reference  # noqa: F401
from ._version import __version__  # noqa: F401
from .backends import BACKENDS, BackendUnavailable  # noqa: F401
from .losses import acl, afcl, bcl, fcl, supcon  # noqa: F401
from .losses.ssl import bayesian_cl, dcl, hcl, mttv  # noqa: F401
from .losses.rescom import hard_pair_mining, rescom  # noqa: F401
from .losses.balanced_softmax import siamese_balanced_softmax  # noqa: F401
from .reference import ClassBalancedQueue, effective_number_weights  # noqa: F401
from . import nn  # noqa: F401  (after the functional losses: the modules call them)

__all__ = [
    "supcon", "afcl", "fcl", "acl", "bcl", "hard_pair_mining", "rescom", "ClassBalancedQueue",
    "siamese_balanced_softmax", "effective_number_weights", "dcl", "hcl", "bayesian_cl", "mttv",
    "reference", "BACKENDS", "BackendUnavailable", "nn", "distributed", "integrations", "__version__",
]

# Submodules imported on first access (``import ltcl_fused as lf; lf.distributed.supcon(...)``), so that
# ``import ltcl_fused`` does not pay for them.
_LAZY = ("distributed", "integrations", "env", "ext", "demo")


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")  # also sets the attribute on the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> _List[str]:
    return sorted(set(globals()) | set(_LAZY))
