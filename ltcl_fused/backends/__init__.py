"""Backend dispatch: ``backend="auto" | "triton" | "cuda" | "cpu" | "torch" | "reference"``.

``auto`` tries, in order, triton then cuda then torch for CUDA tensors, and cpu then torch for
CPU tensors, skipping (with one warning per reason) any backend that cannot run or does not
implement the operation yet. A backend named explicitly is used or fails with one clear line:
never a silent fallback to something else.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional

import torch

from .base import BackendUnavailable, Engine

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "reference")
_MODULES = {"torch": "torch_chunked", "triton": "triton_engine", "cpu": "cpp_engine", "cuda": "cpp_engine"}
_ENGINE_ATTR = {"torch": "TorchChunkedEngine", "triton": "TritonEngine", "cpu": "CPUEngine", "cuda": "CUDAEngine"}
_cache: Dict[str, Engine] = {}
_warned = set()


def get_engine(name: str) -> Engine:
    if name not in _cache:
        mod = importlib.import_module(f".{_MODULES[name]}", __name__)
        _cache[name] = getattr(mod, _ENGINE_ATTR[name])()
    return _cache[name]


def check_backend_name(backend, fn: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{fn}: `backend` must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def auto_order(device: torch.device):
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")


def resolve(backend: str, device: torch.device, op: str, fn: str, dtype: Optional[torch.dtype] = None
            ) -> Optional[Engine]:
    """The engine that runs ``op`` for a call of ``fn`` on ``device`` (and inputs of ``dtype``, when given: an
    engine whose ``dtype_reason`` refuses it counts as unavailable); None means "reference"."""
    name = _resolve_name(backend, device.type, device.index, op, fn, dtype)
    return None if name is None else _cache[name]


def _resolve_name(backend: str, device_type: str, device_index, op: str, fn: str, dtype=None) -> Optional[str]:
    # Runs eagerly even under torch.compile (the choice is a constant of the compiled graph).
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return _resolve(backend, device, op, fn, dtype).name if backend != "reference" else None


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (~1 s) at import time;
# tests/test_dispatch.py checks that a loss still compiles with fullgraph=True.
_resolve_name._dynamo_marked_constant = True


def _reason(eng: Engine, device: torch.device, op: str, dtype) -> Optional[str]:
    reason = eng.unavailable_reason(device)
    gate = getattr(eng, "dtype_reason", None)  # Engine's default accepts every dtype (duck-typed engines too)
    if reason is None and dtype is not None and op in eng.ops and gate is not None:
        reason = gate(op, dtype)
    return reason


def _resolve(backend: str, device: torch.device, op: str, fn: str, dtype=None) -> Engine:
    check_backend_name(backend, fn)
    if backend != "auto":
        eng = get_engine(backend)
        reason = _reason(eng, device, op, dtype)
        if reason is not None:
            raise BackendUnavailable(f"{fn}: backend {backend!r} is unavailable: {reason}")
        if op not in eng.ops:
            raise NotImplementedError(
                f"{fn}: backend {backend!r} does not implement {op!r} yet"
                + (f" ({eng.planned})" if eng.planned else "") + "; use backend='torch' or 'auto'")
        return eng
    for name in auto_order(device):
        eng = get_engine(name)
        if op not in eng.ops:
            continue
        reason = _reason(eng, device, op, dtype)
        if reason is None:
            return eng
        if (name, reason) not in _warned:
            _warned.add((name, reason))
            warnings.warn(f"ltcl_fused: backend {name!r} unavailable ({reason}); falling back", RuntimeWarning,
                          stacklevel=3)
    raise BackendUnavailable(f"{fn}: no backend can run {op!r} on device {device}")  # torch always can
