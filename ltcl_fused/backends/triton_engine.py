"""backend="triton": fused Triton kernels of the row-statistics engine (never forms the N×N matrix).

The kernels live in ``ltcl_fused.triton_kernels`` (source folder ``triton_kernels/`` at the
repository root, mapped into the package by setup.py). From a source checkout that was not
installed, that folder is loaded under the same module name.

Needs Triton >= 3.3 and torch >= 2.6; float64 needs Triton >= 3.5 (``dtype_reason``, so ``auto`` falls
back). fp32 ``tl.dot`` follows ``torch.get_float32_matmul_precision()`` (highest -> ieee, high -> tf32x3,
medium -> tf32; ``LTCL_TRITON_TF32`` overrides), see docs/triton.md and ``triton_kernels/support.py``.
On CPU tensors the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
triton is imported): that is how the tests run them.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from ..engine.contract import acc_dtype
from .base import Engine

_KERNELS = "ltcl_fused.triton_kernels"


def _load_kernels(module: str = "ops"):
    """``ltcl_fused.triton_kernels.<module>`` (installed package, or the source folder of a checkout)."""
    try:
        return importlib.import_module(f"{_KERNELS}.{module}")
    except ModuleNotFoundError as e:
        if e.name != _KERNELS:
            raise
    src = Path(__file__).resolve().parents[2] / "triton_kernels"
    if not (src / "__init__.py").exists():
        raise ModuleNotFoundError(f"{_KERNELS} is not installed and {src} does not exist")
    spec = importlib.util.spec_from_file_location(_KERNELS, src / "__init__.py",
                                                  submodule_search_locations=[str(src)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(_KERNELS, None)
        raise
    return importlib.import_module(f"{_KERNELS}.{module}")


class TritonEngine(Engine):
    name = "triton"
    ops = frozenset({"rowstats", "ssl"})
    #: ops whose backward has a symmetric form (C is A, same labels, self_offset = 0: one dX kernel, no dC;
    #: "ssl": without Bayesian weights)
    symmetric_ops = frozenset({"rowstats", "ssl"})

    def __init__(self):
        self._ops = None
        self._ssl_ops = None
        self._support = None
        self._reason = None

    def _kernels(self):
        if self._ops is None and self._reason is None:
            try:
                import triton  # noqa: F401
            except Exception as e:  # ImportError, or a broken install
                self._reason = f"Triton is not importable ({type(e).__name__}: {e})"
                return None
            try:
                support = _load_kernels("support")
                # versions first: a Triton too old for the kernels may fail to even define them
                self._reason = support.version_reason()
                if self._reason is None:
                    ops = _load_kernels("ops")
                    self._reason = support.interpreter_reason() if ops.interpreted() else None
                    self._support, self._ops = support, (ops if self._reason is None else None)
                    if self._ops is not None:  # imported now, not on the first ssl call: torch.compile cannot trace an import
                        self._ssl_ops = importlib.import_module(_KERNELS + ".ssl_ops")
            except Exception as e:
                self._reason = f"the Triton kernels failed to load ({type(e).__name__}: {e})"
        return self._ops

    def unavailable_reason(self, device):
        device = torch.device(device)
        ops = self._kernels()
        if ops is None:
            return self._reason
        if ops.interpreted():
            if device.type in ("cpu", "cuda"):
                return None
            return f"the Triton interpreter runs on CPU tensors, got {device.type} tensors"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available to torch"
            return None
        if device.type == "cpu":
            return ("Triton kernels need CUDA tensors; CPU tensors run only under the Triton interpreter "
                    "(set TRITON_INTERPRET=1 before importing triton); use backend='cpu' or 'torch'")
        return f"Triton kernels need CUDA tensors, got {device.type} tensors"

    def dtype_reason(self, op, dtype):
        """None when this Triton compiles ``op`` for ``dtype`` here, else one line: float64 needs Triton >= 3.5,
        hard-pair mining on a GPU Triton >= 3.4 (its native sort; the interpreter runs a network of its own)."""
        ops = self._kernels()
        if ops is None:
            return self._reason
        reason = self._support.dtype_reason(dtype)
        if reason is None and op == "mining" and not ops.interpreted():
            reason = self._support.feature_reason("native_sort")
        return reason

    def _check_dtype(self, op, dtype):
        reason = self.dtype_reason(op, dtype)
        if reason is not None:
            from .base import BackendUnavailable
            raise BackendUnavailable(f"backend 'triton' is unavailable: {reason}")

    def _precision(self):
        return self._support.fp32_precision()

    # --- the "rowstats" operation (see ltcl_fused/engine/contract.py) ---
    @staticmethod
    def _prep(A, C, a_lab, c_lab, bias_same, bias_other):
        acc = acc_dtype(A.dtype)
        A = A.contiguous()
        C = C.contiguous()
        a_lab = a_lab.to(torch.int64).contiguous()
        c_lab = c_lab.to(torch.int64).contiguous()
        if (bias_same is None) != (bias_other is None):
            raise ValueError("triton engine: bias_same and bias_other must be given together")
        if bias_same is not None:
            bias_same = bias_same.to(acc).contiguous()
            bias_other = bias_other.to(acc).contiguous()
        return A, C, a_lab, c_lab, bias_same, bias_other

    def rowstats_forward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                         symmetric=False):
        # ``symmetric`` changes nothing here: the forward sweeps every column (only the backward is symmetric)
        if self._kernels() is None:
            self._fail()
        self._check_dtype("rowstats", A.dtype)
        A, C, a_lab, c_lab, bias_same, bias_other = self._prep(A, C, a_lab, c_lab, bias_same, bias_other)
        return torch.ops.ltcl_fused.triton_rowstats_fwd(
            A, C, a_lab, c_lab, bias_same, bias_other, float(inv_tau), float(gamma), int(self_offset),
            bool(focal), self._precision())

    def rowstats_backward(self, A, C, a_lab, c_lab, self_offset, inv_tau, bias_same, bias_other, gamma, focal,
                          lse, top, lrest, cpos, cposf, cneg, r, rt, symmetric=False):
        """(dA, dC); ``symmetric`` (the caller's promise: C is A, c_lab is a_lab, self_offset == 0): (dA + dC, None)
        from one row-parallel kernel (``rowstats_bwd_sym_kernel``)."""
        if self._kernels() is None:
            self._fail()
        self._check_dtype("rowstats", A.dtype)
        A, C, a_lab, c_lab, bias_same, bias_other = self._prep(A, C, a_lab, c_lab, bias_same, bias_other)
        acc = acc_dtype(A.dtype)
        lse, lrest, cpos, cposf, cneg, r, rt = (t.to(acc).contiguous() for t in (lse, lrest, cpos, cposf, cneg, r, rt))
        top = top.to(torch.int64).contiguous()
        if symmetric:
            if int(self_offset) != 0 or A.shape != C.shape:
                raise ValueError("triton engine: the symmetric backward needs C = A and self_offset = 0")
            dX = torch.ops.ltcl_fused.triton_rowstats_bwd_sym(
                A, a_lab, bias_same, bias_other, lse, top, lrest, cpos, cposf, cneg, r, rt, float(inv_tau),
                float(gamma), bool(focal), self._precision())
            return dX, None
        return torch.ops.ltcl_fused.triton_rowstats_bwd(
            A, C, a_lab, c_lab, bias_same, bias_other, lse, top, lrest, cpos, cposf, cneg, r, rt, float(inv_tau),
            float(gamma), int(self_offset), bool(focal), self._precision())

    # --- the "ssl" operation (see ltcl_fused/engine/ssl_contract.py; kernels in triton_kernels/ssl_rowstats.py) ---
    def _ssl(self):
        if self._kernels() is None:
            self._fail()
        if self._ssl_ops is None:
            self._ssl_ops = importlib.import_module(_KERNELS + ".ssl_ops")
        return self._ssl_ops

    def _ssl_args(self, A, C, partner, self_offset, inv_tau, cfg, ssl_ops):
        self._check_dtype("ssl", A.dtype)
        return (A.contiguous(), C.contiguous(), partner.to(torch.int64).contiguous(), int(self_offset),
                float(inv_tau), [float(c) for c in cfg.scales], bool(cfg.exclude_partner), bool(cfg.include_self),
                ssl_ops.FILTERS[cfg.filter], float(cfg.lower), float(cfg.upper),
                [] if cfg.bayes is None else [float(x) for x in cfg.bayes], self._precision())

    def ssl_forward(self, A, C, partner, self_offset, inv_tau, cfg, symmetric=False):
        # ``symmetric`` changes nothing here: the forward sweeps every column (only the backward is symmetric)
        from ..engine.ssl_contract import SSLStats
        args = self._ssl_args(A, C, partner, self_offset, inv_tau, cfg, self._ssl())
        return SSLStats(*torch.ops.ltcl_fused.triton_ssl_fwd(*args))

    def ssl_backward(self, A, C, partner, self_offset, inv_tau, cfg, lse, coef, cpos, symmetric=False):
        """(dA, dC); ``symmetric`` (the caller's promise: C is A, self_offset == 0, no Bayesian weights):
        (dA + dC, None) from one row-parallel kernel per two scales (``ssl_bwd_sym_kernel``)."""
        if symmetric and (int(self_offset) != 0 or A.shape != C.shape or cfg.bayes is not None):
            raise ValueError("triton engine: the symmetric SSL backward needs C = A, self_offset = 0 and no Bayesian "
                             f"weights (got A {tuple(A.shape)}, C {tuple(C.shape)}, self_offset {int(self_offset)}, "
                             f"bayes {cfg.bayes})")
        args = self._ssl_args(A, C, partner, self_offset, inv_tau, cfg, self._ssl())
        acc = acc_dtype(A.dtype)
        lse, coef, cpos = (t.to(acc).contiguous() for t in (lse, coef, cpos))
        if symmetric:
            X, _C, partner, _so, inv_tau, *rest, _bayes, precision = args
            dX = torch.ops.ltcl_fused.triton_ssl_bwd_sym(X, partner, inv_tau, *rest, precision, lse, coef, cpos)
            return dX, None
        return torch.ops.ltcl_fused.triton_ssl_bwd(*args, lse, coef, cpos)

    def _fail(self):
        from .base import BackendUnavailable
        raise BackendUnavailable(f"backend 'triton' is unavailable: {self._reason}")
