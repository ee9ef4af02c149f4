"""Input checks shared by every public loss: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_features(fn: str, name: str, x, *, ranks: Sequence[int] = (2, 3)) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: `{name}` must be a floating tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.dim() not in ranks:
        want = " or ".join({2: "[N, D]", 3: "[B, V, D]"}.get(r, f"{r}-D") for r in ranks)
        raise ValueError(f"{fn}: `{name}` must be {want}, got shape {_shape(x)}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: `{name}` is empty (shape {_shape(x)}); need at least one sample and D >= 1")


def check_finite(fn: str, name: str, x: Optional[torch.Tensor], enabled: bool, chunk_elems: int = 1 << 22) -> None:
    """NaN/Inf check in chunks of rows, so its temporaries stay small whatever the size of ``x``."""
    if not enabled or x is None:
        return
    flat = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
    rows = max(1, chunk_elems // max(1, flat.shape[1]))
    for r0 in range(0, flat.shape[0], rows):
        if not bool(torch.isfinite(flat[r0:r0 + rows]).all()):
            raise ValueError(f"{fn}: `{name}` contains NaN or Inf (pass check_finite=False to skip this O(N·D) check)")


def check_labels(fn: str, name: str, labels, n: int, device: torch.device, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: `{name}` must be an integer tensor (class ids), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{fn}: `{name}` must have shape [{n}] ({what}), got {_shape(labels)}")
    if labels.device != device:
        raise ValueError(f"{fn}: `{name}` is on {labels.device} but the features are on {device}")


def check_same(fn: str, name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str = "features") -> None:
    if x.device != ref.device:
        raise ValueError(f"{fn}: `{name}` is on {x.device} but `{ref_name}` is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{fn}: `{name}` has dtype {x.dtype} but `{ref_name}` has {ref.dtype}; use one dtype")
    if x.shape[-1] != ref.shape[-1]:
        raise ValueError(f"{fn}: `{name}` has feature dimension {x.shape[-1]} but `{ref_name}` has {ref.shape[-1]}")


def check_positive(fn: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError(f"{fn}: `{name}` must be a finite number > 0, got {v!r}")
    return float(v)


def check_nonnegative(fn: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) < 0:
        raise ValueError(f"{fn}: `{name}` must be a finite number >= 0, got {v!r}")
    return float(v)


def check_range(fn: str, name: str, v, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
    if ok:
        f = float(v)
        ok = (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
    if not ok:
        interval = ("(" if lo_open else "[") + f"{lo}, {hi}" + (")" if hi_open else "]")
        raise ValueError(f"{fn}: `{name}` must be a number in {interval}, got {v!r}")
    return float(v)


def check_choice(fn: str, name: str, v, choices: Sequence[str]) -> None:
    if v not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {', '.join(repr(c) for c in choices)}; got {v!r}")


def check_int(fn: str, name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise ValueError(f"{fn}: `{name}` must be an integer >= {lo}, got {v!r}")
    return int(v)
