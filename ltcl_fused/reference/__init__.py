"""Dense, readable pure-PyTorch reference implementations of every loss in SPEC.md (the test oracle).

Each function is written straight from SPEC.md's formulas with dense N×N similarity matrices, boolean
masks and ``torch.logsumexp``: O(N²) memory, meant for correctness, not speed. Nothing outside this
subpackage is imported, so the reference stays independent of the fused engine code.

Conventions (SPEC.md "Notation"): ``[B, V, D]`` features are flattened view-major and labels tiled V times;
the self column is removed from every set; every loss takes ``reduction`` in {"mean", "sum", "none"}
("none": per-anchor values in the flattened anchor order; for ``mttv``, the per-row ratios r_i).
"""
from .afcl import acl, afcl, fcl
from .bcl import bcl
from .mttv import mttv
from .rescom import (ClassBalancedQueue, effective_number_weights, hard_pair_mining, rescom,
                     siamese_balanced_softmax)
from .ssl import bayesian_cl, bayesian_weights, dcl, hcl
from .supcon import supcon

__all__ = [
    "supcon", "afcl", "fcl", "acl", "bcl", "hard_pair_mining", "rescom", "effective_number_weights",
    "siamese_balanced_softmax", "ClassBalancedQueue", "dcl", "hcl", "bayesian_cl", "bayesian_weights", "mttv",
]
