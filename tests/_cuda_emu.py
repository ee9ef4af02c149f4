"""The CUDA kernels of csrc/cuda on the CPU: builds them with the emulator of csrc/cuda_emu and provides an
engine that runs ``backend="cuda"`` on CPU tensors through them.

The .cu files are compiled by the host compiler, unchanged except that every ``kernel<<<grid, block, smem,
stream>>>(args)`` is rewritten to ``::ltcl_emu::launch(dim3(grid), dim3(block), [&] { kernel(args); })`` (same
line numbers: errors point at the .cu file). csrc/cuda/binding_cuda.cpp is compiled with -DLTCL_CUDA_EMU: the
same argument checks, dtype handling and launcher calls, on CPU tensors, registered as
``torch.ops.ltcl_fused_cuda_emu.*``. What the emulator does and does not model: csrc/cuda_emu/cuda_runtime.h.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

import pytest
import torch

from ltcl_fused import ext
from ltcl_fused.backends.cpp_engine import CUDAEngine

_SELFTEST = "selftest_kernels.cu"  # csrc/cuda_emu: kernels that test the emulator itself
_KERNEL_FILES = ("rowstats_cuda.cu", "mining_cuda.cu", "ssl_cuda.cu", _SELFTEST)
_loaded: Optional[bool] = None
_reason: Optional[str] = None


def _split_top(text: str) -> List[str]:
    """``text`` split at its top-level commas (outside (), [] and {}; a launch configuration has no template
    argument list with a comma)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def rewrite_launches(src: str) -> str:
    """Every ``K<<<g, b, smem, stream>>>(args)`` of ``src`` as an emulator launch; newlines are kept."""
    out, pos = [], 0
    while True:
        at = src.find("<<<", pos)
        if at < 0:
            out.append(src[pos:])
            return "".join(out)
        start = max(src.rfind(c, 0, at) for c in ";{}\n") + 1  # the kernel expression starts its statement
        kernel = src[start:at].strip()
        if not re.fullmatch(r"[A-Za-z_][\w:]*(<[^;]*>)?", kernel):
            raise ValueError(f"cannot parse the kernel of the launch at offset {at}: {kernel!r}")
        end_cfg = src.index(">>>", at)
        cfg = _split_top(src[at + 3:end_cfg])
        if len(cfg) != 4:
            raise ValueError(f"launch at offset {at}: <<<grid, block, smem, stream>>> expected, got {cfg}")
        open_p = end_cfg + 3
        if src[open_p] != "(":
            raise ValueError(f"launch at offset {at}: '(' expected after >>>")
        depth, close_p = 0, open_p
        for close_p in range(open_p, len(src)):
            depth += {"(": 1, ")": -1}.get(src[close_p], 0)
            if depth == 0:
                break
        args = src[open_p + 1:close_p]
        indent = src[start:at][:len(src[start:at]) - len(src[start:at].lstrip())]
        out.append(src[pos:start])
        out.append(f"{indent}::ltcl_emu::launch(dim3({cfg[0].strip()}), dim3({cfg[1].strip()}), "
                   f"[&] {{ {kernel}({args}); }})")
        pos = close_p + 1


def _write_if_changed(path: str, text: str) -> None:
    if os.path.isfile(path):
        with open(path) as fh:
            if fh.read() == text:
                return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _build() -> None:
    from torch.utils import cpp_extension
    root = ext.csrc_dir()
    build = os.path.join(cpp_extension._get_build_directory("ltcl_fused_cuda_emu_src", False))
    os.makedirs(build, exist_ok=True)
    sources = [os.path.join(root, "cuda_emu", "emu_runtime.cpp"), os.path.join(root, "cuda", "binding_cuda.cpp")]
    for f in _KERNEL_FILES:
        path = os.path.join(root, "cuda_emu" if f == _SELFTEST else "cuda", f)
        with open(path) as fh:
            text = f'#line 1 "{path}"\n' + rewrite_launches(fh.read())
        dst = os.path.join(build, f.replace(".cu", "_emu.cpp"))
        _write_if_changed(dst, text)
        sources.append(dst)
    cpp_extension.load(
        name="ltcl_fused_cuda_emu", sources=sources,
        extra_cflags=["-O2", "-DLTCL_CUDA_EMU", "-Wno-unknown-pragmas"],
        extra_include_paths=[os.path.join(root, "cuda_emu"), os.path.join(root, "cuda"), root],
        is_python_module=False, verbose=os.environ.get("LTCL_EXT_VERBOSE") == "1")


def unavailable_reason() -> Optional[str]:
    """None once the emulator's extension is loaded, else why it cannot be (one line)."""
    global _loaded, _reason
    if _loaded is None:
        try:
            _reason = ext.unavailable_reason()  # the same toolchain; and the engine's Python side needs ext
            if _reason is None:
                _build()
        except Exception as e:  # noqa: BLE001 - any build failure becomes the one-line reason
            _reason = f"the CUDA emulator did not build: {str(e).strip().splitlines()[-1] if str(e) else e!r}"
        _loaded = _reason is None
    return _reason


class CUDAEmuEngine(CUDAEngine):
    """A CUDAEngine whose ops are the emulator's: ``backend="cuda"`` on CPU tensors."""
    device_type = "cpu"
    _ops = torch.ops.ltcl_fused_cuda_emu

    def unavailable_reason(self, device) -> Optional[str]:
        if torch.device(device).type != "cpu":
            return "the CUDA emulator runs on CPU tensors"
        return unavailable_reason()


def engine() -> CUDAEmuEngine:
    """The emulated CUDA engine, or the test fails (never skips) when the emulator does not build here."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"the CUDA emulator does not build here: {reason}")
    return CUDAEmuEngine()
