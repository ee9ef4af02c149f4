"""Host-side policy of the Triton kernels: supported versions, version-gated features, the fp32 ``tl.dot``
precision, the device guard of a launch and the encoding of float parameters (docs/triton.md).

Imported before any kernel module (``backends/triton_engine.py`` checks the versions first, so a Triton
too old to even define the kernels is reported in one line); it needs only ``triton`` and ``torch``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import struct
from typing import Optional, Tuple

import torch

#: oldest Triton / torch the kernels support (torch 2.6 is the first with torch.library.triton_op)
MIN_TRITON = (3, 3)
MIN_TORCH = (2, 6)
#: feature -> (Triton version it needs, what it is in words); the interpreter checks the same (tl.dot's fp64
#: check is shared, tl.topk does not exist before 3.4)
FEATURES = {
    "fp64": ((3, 5), "float64 (fp64 tl.dot)"),
    "native_sort": ((3, 4), "the mining kernel's native sort (tl.topk / tl.bitonic_merge)"),
}
#: the interpreter of Triton < 3.7 fails with numpy >= 2.4 ("only 0-dimensional arrays can be converted")
INTERPRETER_NUMPY = ((3, 7), (2, 4))

#: LTCL_TRITON_TF32 values -> fp32 tl.dot input_precision (unset or "": follow torch, see fp32_precision)
_OVERRIDE = {"1": "tf32", "true": "tf32", "yes": "tf32", "tf32": "tf32", "0": "ieee", "false": "ieee",
             "no": "ieee", "ieee": "ieee", "tf32x3": "tf32x3"}
#: torch.get_float32_matmul_precision() -> input_precision ("high" asks for about fp32 accuracy from tensor
#: cores: tf32x3 = three TF32 products, ~fp32 error; plain TF32 would put 2^-11 relative error into logits
#: that 1/τ then multiplies)
_TORCH_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}

#: XOR mask of the fp64 parameter bit patterns (rowstats.PARAM_XOR, the kernel side of kernel_param)
PARAM_XOR = 0x7FFC000000000000


def parse_version(v: str) -> Tuple[int, ...]:
    """'3.3.1' -> (3, 3, 1); '3.4.0+git1234' or '2.6.0a0' -> (3, 4, 0) / (2, 6, 0)."""
    return tuple(int(m) for m in re.findall(r"\d+", v.split("+")[0])[:3])


def _fmt(v: Tuple[int, ...]) -> str:
    return ".".join(map(str, v))


@functools.lru_cache(maxsize=None)
def triton_version() -> Tuple[int, ...]:
    import triton
    return parse_version(triton.__version__)


def torch_version() -> Tuple[int, ...]:
    return parse_version(torch.__version__)


def version_reason(triton_v: Optional[Tuple[int, ...]] = None,
                   torch_v: Optional[Tuple[int, ...]] = None) -> Optional[str]:
    """None when this Triton and torch can run the kernels, else one line saying why not."""
    triton_v = triton_version() if triton_v is None else triton_v
    torch_v = torch_version() if torch_v is None else torch_v
    if triton_v[:2] < MIN_TRITON:
        return f"Triton {_fmt(triton_v)} found; ltcl_fused's Triton kernels need ≥ {_fmt(MIN_TRITON)}"
    if torch_v[:2] < MIN_TORCH:
        return f"torch {_fmt(torch_v)} found; ltcl_fused's Triton kernels need torch ≥ {_fmt(MIN_TORCH)}"
    return None


def interpreter_reason(triton_v: Optional[Tuple[int, ...]] = None,
                       numpy_v: Optional[Tuple[int, ...]] = None) -> Optional[str]:
    """None when the Triton interpreter runs with this numpy, else one line (INTERPRETER_NUMPY)."""
    triton_v = triton_version() if triton_v is None else triton_v
    if numpy_v is None:
        import numpy
        numpy_v = parse_version(numpy.__version__)
    fixed_in, bad_numpy = INTERPRETER_NUMPY
    if triton_v[:2] < fixed_in and numpy_v[:2] >= bad_numpy:
        return (f"the interpreter of Triton {_fmt(triton_v)} needs numpy < {_fmt(bad_numpy)} "
                f"(numpy {_fmt(numpy_v)} found)")
    return None


def feature_reason(feature: str, triton_v: Optional[Tuple[int, ...]] = None) -> Optional[str]:
    """None when ``feature`` (a key of FEATURES) works with this Triton, else one line naming the version it needs."""
    need, what = FEATURES[feature]
    triton_v = triton_version() if triton_v is None else triton_v
    if triton_v[:2] >= need:
        return None
    return f"{what} needs Triton ≥ {_fmt(need)}; Triton {_fmt(triton_v)} found"


def dtype_reason(dtype: torch.dtype, triton_v: Optional[Tuple[int, ...]] = None) -> Optional[str]:
    """The feature gate of an input dtype (float64 needs fp64 tl.dot), or None."""
    return feature_reason("fp64", triton_v) if dtype == torch.float64 else None


def fp32_precision() -> str:
    """``input_precision`` of fp32 ``tl.dot``: ``LTCL_TRITON_TF32`` if set (1/tf32, 0/ieee, tf32x3), else from
    ``torch.get_float32_matmul_precision()`` as torch's own matmul: highest -> ieee, high -> tf32x3,
    medium -> tf32. Read in eager code (a constant of a torch.compile'd graph)."""
    env = os.environ.get("LTCL_TRITON_TF32", "").strip().lower()
    if env:
        if env not in _OVERRIDE:
            raise ValueError(f"LTCL_TRITON_TF32 must be one of {', '.join(sorted(set(_OVERRIDE)))} "
                             f"(or unset to follow torch.get_float32_matmul_precision()); got {env!r}")
        return _OVERRIDE[env]
    return _TORCH_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


# what torch.compiler.assume_constant_result does (dynamo cannot trace get_float32_matmul_precision)
fp32_precision._dynamo_marked_constant = True


def dot_precision(dtype: torch.dtype, fp32: str) -> str:
    """The PREC constexpr of a kernel: ``fp32`` for float32 inputs, "ieee" for the others (16-bit inputs use
    tensor cores whatever the precision; fp64 has no other mode)."""
    return fp32 if dtype == torch.float32 else "ieee"


def device_guard(device: torch.device):
    """Makes ``device`` the current CUDA device for a launch (Triton launches on the current device, so tensors on
    cuda:1 while cuda:0 is current would otherwise run on the wrong one); a no-op off CUDA (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kernel_param(x: float, acc: torch.dtype):
    """A float parameter as a kernel argument (no device tensor, no host-to-device copy: CUDA-graph capturable).

    fp32 kernels: the Python float (Triton passes it as fp32, rounded to nearest as a float32 tensor would be).
    fp64 kernels: Triton has no fp64 scalar argument, so the float's IEEE-754 bits XOR PARAM_XOR as an int64,
    which ``rowstats._param`` turns back into the exact double. Without the XOR 0.0 (bits 0) would be typed i32
    and every other value i64: two compiled signatures. With it only rare NaN payloads (0x7FFC0000_0…) and
    negative subnormals near −1e-308 land in the i32 range (they still decode exactly), never ±0, ±inf, the
    canonical NaN or 1 (which Triton would specialise into a constant).
    """
    x = float(x)
    if acc == torch.float64:
        return struct.unpack("<q", struct.pack("<d", x))[0] ^ PARAM_XOR
    return x
