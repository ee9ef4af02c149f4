"""What a backend provides: the engine contract of ``ltcl_fused.engine.contract`` for one device kind.

A backend is an object with a ``name``, ``ops`` (the engine operations it implements) and
``unavailable_reason(device)``; the dispatcher in ``ltcl_fused.backends`` picks one per call.
"""
from __future__ import annotations

from typing import Optional

import torch


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (no Triton, no GPU, no compiler): one line saying why."""


class Engine:
    #: backend name as the user writes it
    name: str = "?"
    #: engine operations implemented: "rowstats" (softmax family); later "mining", "ssl"
    ops: frozenset = frozenset()
    #: which issue/feature provides the missing ops (for NotImplementedError messages)
    planned: str = ""
    #: operations with a symmetric path (``symmetric=True`` when the columns ARE the anchors); default none
    symmetric_ops: frozenset = frozenset()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on tensors of ``device``, else a one-line reason."""
        raise NotImplementedError

    def dtype_reason(self, op: str, dtype: torch.dtype) -> Optional[str]:
        """None when this backend runs ``op`` on ``dtype`` inputs here, else a one-line reason (a feature gated on
        a library version, e.g. Triton's fp64 tl.dot): the dispatcher then treats it as unavailable."""
        return None

    # --- the "rowstats" operation (see ltcl_fused/engine/contract.py) ---
    # ``symmetric=True`` is passed only to engines listing "rowstats" in ``symmetric_ops``: C is A (an alias
    # view), c_lab equals a_lab, self_offset == 0; the backward then returns (dX, None). The "ssl" operation's
    # ssl_forward / ssl_backward get it likewise ("ssl" in ``symmetric_ops``; C is A, self_offset == 0, no
    # Bayesian weights).
    def rowstats_forward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                         symmetric: bool = False):
        raise NotImplementedError

    def rowstats_backward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                          lse, top, lrest, cpos, cposf, cneg, r, rt, symmetric: bool = False):
        raise NotImplementedError
