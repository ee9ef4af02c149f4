"""backend="cpu" / "cuda": the C++/CUDA extension (``csrc/``, built on first use by ``ltcl_fused.ext``).

Both engines call the registered ops ``torch.ops.ltcl_fused.rowstats_fwd`` / ``rowstats_bwd`` (the
self-supervised family: ``ssl_fwd`` / ``ssl_bwd``; hard-pair mining: ``topk_mining``, whose CPU kernel is
reached through ``losses/rescom.py``'s table and whose CUDA kernel through ``CUDAEngine.mine``); the
dispatcher picks the CPU or CUDA kernel from the tensors' device. ``unavailable_reason`` builds the
extension the first time it is asked (about a minute) and reports a failed build in one line.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .base import Engine


def _ext():
    from .. import ext
    return ext


_FILTERS = {None: 0, "both": 1, "low": 2}


def _ssl_args(self_offset, inv_tau, cfg):
    """The SSLConfig as the scalar arguments of the ssl_fwd / ssl_bwd schemas."""
    return (int(self_offset), float(inv_tau), [float(c) for c in cfg.scales], bool(cfg.exclude_partner),
            bool(cfg.include_self), _FILTERS[cfg.filter], float(cfg.lower), float(cfg.upper),
            [] if cfg.bayes is None else [float(v) for v in cfg.bayes])


_SYMMETRIC_OPS = frozenset({"rowstats", "ssl"})


class CPUEngine(Engine):
    name = "cpu"
    ops = frozenset({"rowstats", "ssl", "ssl_ranked"})
    #: operations with a symmetric path (C is A: one GEMM per pair of row blocks, csrc/cpu/strip_common.h)
    symmetric_ops = _SYMMETRIC_OPS
    device_type = "cpu"
    #: the namespace of the registered ops (the tests' CUDA emulator has its own: tests/_cuda_emu.py)
    _ops = torch.ops.ltcl_fused

    def unavailable_reason(self, device) -> Optional[str]:
        device = torch.device(device)
        if device.type != self.device_type:
            return (f"backend {self.name!r} runs on {self.device_type} tensors, got {device.type} tensors"
                    + (" (use backend='cuda')" if device.type == "cuda" else ""))
        return _ext().unavailable_reason()

    def rowstats_forward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                         symmetric: bool = False):
        return self._ops.rowstats_fwd(A, C, a_lab, c_lab, bias_same, bias_other, int(self_offset), float(inv_tau),
                                      float(gamma), bool(focal), bool(symmetric))

    def rowstats_backward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                          lse, top, lrest, cpos, cposf, cneg, r, rt, symmetric: bool = False):
        """(dA, dC); ``symmetric=True`` (C is A): (dX, None), dX the gradient through both roles."""
        dA, dC = self._ops.rowstats_bwd(A, C, a_lab, c_lab, bias_same, bias_other, int(self_offset),
                                        float(inv_tau), float(gamma), bool(focal), lse, top, lrest, cpos, cposf,
                                        cneg, r, rt, bool(symmetric))
        return (dA, None) if symmetric else (dA, dC)

    # --- the "ssl" operation (ltcl_fused/engine/ssl_contract.py; csrc/cpu/ssl_cpu.cpp) ---
    def ssl_forward(self, A, C, partner, self_offset, inv_tau, cfg, rank_ref=None, symmetric: bool = False):
        from ..engine.ssl_contract import SSLStats
        args = _ssl_args(self_offset, inv_tau, cfg)
        if rank_ref is not None:  # column blocks: counts against the whole row's sorted set values
            return SSLStats(*self._ops.ssl_fwd_ranked(A, C, partner, *args, *rank_ref))
        return SSLStats(*self._ops.ssl_fwd(A, C, partner, *args, bool(symmetric)))

    def ssl_backward(self, A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos, rank_ref=None,
                     symmetric: bool = False):
        """(dA, dC); ``symmetric=True`` (C is A, self_offset 0, no bayes): (dX, None)."""
        args = _ssl_args(self_offset, inv_tau, cfg)
        if rank_ref is not None:
            return self._ops.ssl_bwd_ranked(A, C, partner, *args, *rank_ref, lse, coef, cpos)
        dA, dC = self._ops.ssl_bwd(A, C, partner, *args, lse, coef, cpos, bool(symmetric))
        return (dA, None) if symmetric else (dA, dC)

    def ssl_set_values(self, A, C, partner, self_offset, inv_tau, cfg):
        """Row-sorted set values of this column block and the set sizes (ssl_contract.py, column blocks)."""
        return self._ops.ssl_set_values(A, C, partner, int(self_offset), float(inv_tau), bool(cfg.exclude_partner),
                                        bool(cfg.include_self), _FILTERS[cfg.filter], float(cfg.lower),
                                        float(cfg.upper))


class CUDAEngine(CPUEngine):
    name = "cuda"
    device_type = "cuda"
    # mining: csrc/cuda/mining_cuda.cu; ssl and ssl_ranked: csrc/cuda/ssl_cuda.cu (DCL/HCL/MTTV and the Bayesian
    # weights: a CUB segmented radix sort rank pass, then the tiled weighting pass)
    ops = frozenset({"rowstats", "mining", "ssl", "ssl_ranked"})

    @property
    def symmetric_ops(self) -> frozenset:
        """The symmetric backward kernels (csrc/cuda: one (G + G^T) X kernel, 2 GEMM-equivalents instead of 4);
        ``LTCL_CUDA_SYMMETRIC=0`` takes the general dA + dC kernels instead. Both are verified the same way:
        executed by the CPU emulator of the tests (tests/test_cuda_emu.py) and compiled for sm_80/sm_90; neither
        has run on a GPU yet (``python -m ltcl_fused.gpu_check`` runs every "cuda" correctness case on both:
        gpu_check/correctness.py, SECOND_PATH)."""
        return frozenset() if os.environ.get("LTCL_CUDA_SYMMETRIC", "1") == "0" else _SYMMETRIC_OPS

    def mine(self, A, a_lab, K, k_lab, k_pos, k_neg):
        """Hard-pair mining (contract: ltcl_fused/backends/mining_torch.py) on the CUDA kernel."""
        return self._ops.topk_mining(A, a_lab.to(torch.int64), K, k_lab.to(torch.int64), int(k_pos), int(k_neg))

    def unavailable_reason(self, device) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {device.type} tensors (use backend='cpu')"
        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        reason = _ext().unavailable_reason()
        if reason is not None:
            return reason
        if not _ext().has_cuda_kernels():
            return "the C++ extension was built without its CUDA sources (LTCL_EXT_CPU_ONLY=1 or no CUDA_HOME)"
        return None
