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


def _finite_flag(x: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``x``'s device: every entry of ``x`` is finite. One reduction, no N·D temporary
    (``aminmax`` propagates NaN, and an Inf shows up as the min or the max)."""
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    return torch.isfinite(lo) & torch.isfinite(hi)


class ValueChecks:
    """The checks of one call that depend on tensor values, folded into at most one host read.

    Usage: register every value-dependent condition (``finite``, ``require``), then ``run()`` once before the
    kernels, and pass the loss through ``poison()`` at the end.

    ``check_finite=True``: eager, ``run()`` stacks the registered 0-dim flags and reads them back ONCE
    (``bool(flags.all())``; a failure may read more to word its message), then raises the error of the first
    failing check (``ValueError``/``TypeError``, naming the argument). Under ``torch.compile`` each check becomes
    a ``torch._assert_async`` with the same message (no graph break, no host read).
    ``check_finite=False``: nothing is read back and finiteness is not computed (a NaN input gives a NaN loss
    on every backend); the other conditions (label ranges, weights, mining candidates) cost an O(M)
    reduction on the device and, when one fails, ``poison`` turns the loss into NaN instead of raising.
    """

    def __init__(self, fn: str, check_finite: bool):
        if not isinstance(check_finite, bool):
            raise TypeError(f"{fn}: `check_finite` must be True or False, got {check_finite!r}")
        self.fn, self.enabled = fn, check_finite
        self._flags, self._errors, self._bad = [], [], None

    def finite(self, name: str, x: Optional[torch.Tensor]) -> None:
        """``x`` has no NaN/Inf (only with check_finite=True; an empty or absent tensor passes)."""
        if self.enabled and x is not None and x.numel():
            self._flags.append(_finite_flag(x))
            self._errors.append((ValueError, f"{self.fn}: `{name}` contains NaN or Inf (pass check_finite=False "
                                             f"to skip this O(N·D) check)", None))

    def require(self, ok: torch.Tensor, message: str, detail=None, exc=ValueError) -> None:
        """``ok`` (0-dim bool tensor) must be True, else ``exc(fn: message + detail())``; ``detail`` (optional,
        called only on failure, may read tensors) adds the offending values to the message."""
        self._flags.append(ok)
        self._errors.append((exc, f"{self.fn}: {message}", detail))

    def run(self) -> None:
        if not self._flags:
            return
        if not self.enabled:  # no read: remembered for poison()
            ok = self._flags[0] if len(self._flags) == 1 else torch.stack(self._flags).all()
            self._bad = ~ok
            return
        if torch.compiler.is_compiling():
            for ok, (_, msg, _) in zip(self._flags, self._errors):
                torch._assert_async(ok, msg)
            return
        flags = torch.stack(self._flags)
        if bool(flags.all()):  # the one host read of the call
            return
        first = flags.tolist().index(False)
        exc, msg, detail = self._errors[first]
        raise exc(msg + (detail() if detail is not None else ""))

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, or NaN everywhere when a check failed with check_finite=False (no host read)."""
        if self._bad is None:
            return loss
        return torch.where(self._bad, torch.full_like(loss, math.nan), loss)


def check_finite(fn: str, name: str, x: Optional[torch.Tensor], enabled: bool) -> None:
    """NaN/Inf check of one tensor (one host read; the losses fold theirs into one ``ValueChecks`` instead)."""
    chk = ValueChecks(fn, bool(enabled))
    chk.finite(name, x)
    chk.run()


def check_bool(fn: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{fn}: `{name}` must be True or False, got {v!r}")
    return v


def label_range(chk: ValueChecks, name: str, labels: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Register ``0 <= labels < n`` on ``chk`` and return the labels clamped into range (int64), so that no
    kernel ever indexes out of bounds even when the check only poisons the loss (check_finite=False)."""
    lab = labels.to(torch.int64)
    if lab.numel():
        lo, hi = torch.aminmax(lab)
        chk.require((lo >= 0) & (hi < n), f"`{name}` must lie in [0, {n}) ({what})",
                    lambda: f", got values in [{int(lab.min())}, {int(lab.max())}]")
    return lab.clamp(0, max(n - 1, 0))


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
