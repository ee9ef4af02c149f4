"""ltcl_fused: fused, memory-efficient contrastive losses for class-imbalanced, long-tailed data.

The public API is fixed by SPEC.md; ``ltcl_fused.reference`` holds the dense oracle implementations.
"""
from . import reference  # noqa: F401
from .backends import BACKENDS, BackendUnavailable  # noqa: F401
from .losses import acl, afcl, bcl, fcl, supcon  # noqa: F401
from .losses.ssl import bayesian_cl, dcl, hcl, mttv  # noqa: F401
from .losses.rescom import hard_pair_mining, rescom  # noqa: F401
from .losses.balanced_softmax import siamese_balanced_softmax  # noqa: F401
from .reference import ClassBalancedQueue, effective_number_weights  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "supcon", "afcl", "fcl", "acl", "bcl", "hard_pair_mining", "rescom", "ClassBalancedQueue",
    "siamese_balanced_softmax", "effective_number_weights", "dcl", "hcl", "bayesian_cl", "mttv",
    "reference", "BACKENDS", "BackendUnavailable",
]
