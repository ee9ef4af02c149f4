"""Environment report for bug reports: ``python -m ltcl_fused.env`` (paste its output into the issue).

Prints the versions of Python, torch, Triton, CUDA and the compilers (g++, nvcc, ninja), the CPU and its
vector ISA, the GPUs, and every backend with "available" or the one-line reason it cannot run, for CPU
tensors and for CUDA tensors (the dispatcher's own ``unavailable_reason``). Asking about the ``cpu`` backend
builds the C++ extension if it is not built yet (about a minute, once); ``--no-build`` skips that.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["collect", "format_report", "cpu_vector_isa", "main"]

BACKEND_ORDER = ("triton", "cuda", "cpu", "torch", "reference")


def _first_line(cmd: Sequence[str], pattern: Optional[str] = None) -> str:
    """The first output line of ``cmd`` (or its first line matching ``pattern``), or why there is none."""
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        p = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed to run ({type(e).__name__})"
    lines = [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    if pattern:
        lines = [ln for ln in lines if re.search(pattern, ln)] or lines
    return (lines[0] if lines else f"no output (exit {p.returncode})") + f"  [{exe}]"


def cpu_vector_isa(cpuinfo_text: Optional[str] = None, machine: Optional[str] = None) -> str:
    """The widest vector ISA the CPU reports: AVX-512 (with its extensions), AVX2, AVX, SSE4.2, NEON/ASIMD, SVE."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    flags = set()
    for line in cpuinfo_text.splitlines():
        key, _, val = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags |= set(val.split())
    machine = (machine or platform.machine()).lower()
    if not flags:
        return "unknown (no /proc/cpuinfo flags)" if machine not in ("arm64", "aarch64") else "NEON (aarch64)"
    if "avx512f" in flags:
        ext = [e for e in ("avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                           "amx_tile") if e in flags]
        return "AVX-512 (" + " ".join(["avx512f"] + ext) + ")"
    if "avx2" in flags:
        return "AVX2" + (" + FMA" if "fma" in flags else "")
    if "avx" in flags:
        return "AVX"
    if "sve" in flags:
        return "SVE + NEON" if ("asimd" in flags or "neon" in flags) else "SVE"
    if "asimd" in flags or "neon" in flags:
        return "NEON (asimd)"
    if "sse4_2" in flags:
        return "SSE4.2"
    return "none of AVX/AVX2/AVX-512/NEON reported"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _torch_info() -> List[Tuple[str, str]]:
    import torch
    rows = [("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
                      f"HIP: {getattr(torch.version, 'hip', None) or 'no'})")]
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception as e:  # noqa: BLE001 - older torch
        cap = f"unknown ({type(e).__name__})"
    rows.append(("torch CPU capability", cap))
    rows.append(("torch threads", f"{torch.get_num_threads()} intra-op, {os.cpu_count()} CPUs visible"))
    return rows


def _gpus() -> List[str]:
    import torch
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        smi = _first_line(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else "nvidia-smi not found"
        return [f"none ({why}; nvidia-smi: {smi})"]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    return out


def _triton_version() -> str:
    try:
        import triton
        return f"{triton.__version__}" + (" (TRITON_INTERPRET=1: interpreter)" if os.environ.get(
            "TRITON_INTERPRET") == "1" else "")
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return f"not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _cuda_home() -> str:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001
        CUDA_HOME = None
    return CUDA_HOME or "not found (set CUDA_HOME)"


def _would_build(name: str, dev) -> bool:
    """Whether asking engine ``name`` about ``dev`` would build the C++ extension (not built yet here)."""
    import torch

    from . import ext
    if name not in ("cpu", "cuda") or ext._loaded is not None or ext._failure is not None:
        return False
    if name == "cpu":
        return dev.type == "cpu"
    return dev.type == "cuda" and torch.version.cuda is not None


def backend_status(build: bool = True) -> Dict[str, Dict[str, str]]:
    """{backend: {"CPU tensors": status, "CUDA tensors": status}}: "available" or the one-line reason."""
    import torch

    from . import backends
    from .backends import BackendUnavailable

    out: Dict[str, Dict[str, str]] = {}
    for name in BACKEND_ORDER:
        out[name] = {}
        for label, dev in (("CPU tensors", torch.device("cpu")), ("CUDA tensors", torch.device("cuda"))):
            if name == "reference":
                out[name][label] = "available (dense O(N²) oracle)"
                continue
            if not build and _would_build(name, dev):
                out[name][label] = "not checked (--no-build; the C++ extension builds on first use)"
                continue
            try:
                reason = backends.get_engine(name).unavailable_reason(dev)
            except BackendUnavailable as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001 - report, never crash the report
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            out[name][label] = "available" if reason is None else reason
    return out


def _auto_choice(status: Dict[str, Dict[str, str]]) -> Dict[str, str]:
    from . import backends
    import torch
    res = {}
    for label, dev in (("CPU tensors", torch.device("cpu")), ("CUDA tensors", torch.device("cuda"))):
        pick = next((n for n in backends.auto_order(dev) if status[n][label] == "available"
                     or status[n][label].startswith("not checked")), None)
        if pick and status[pick][label].startswith("not checked"):
            pick += " once the C++ extension builds, else torch"
        res[label] = pick or "none"
    return res


def collect(build: bool = True) -> Dict[str, object]:
    """Everything the report prints, as a dict (sections -> rows of (name, value))."""
    try:
        from ._version import __version__ as lf_version
    except Exception:  # noqa: BLE001
        lf_version = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    cxx = os.environ.get("CXX", "c++")
    cxx_exe = shlex.split(cxx)[0] if cxx.strip() else "c++"
    software = [("ltcl_fused", f"{lf_version}  [{here}]"),
                ("Python", f"{platform.python_version()} ({sys.executable})"),
                ("platform", platform.platform())]
    software += _torch_info()
    software += [("Triton", _triton_version()),
                 ("CUDA_HOME", _cuda_home()),
                 ("nvcc", _first_line(["nvcc", "--version"], r"release")),
                 (f"C++ compiler (CXX={cxx})" if "CXX" in os.environ else "C++ compiler (c++)",
                  _first_line([cxx_exe, "--version"])),
                 ("g++", _first_line(["g++", "--version"])),
                 ("ninja", _first_line(["ninja", "--version"]))]
    for mod in ("numpy", "pytorch_metric_learning"):
        try:
            m = __import__(mod)
            software.append((mod, getattr(m, "__version__", "?")))
        except Exception:  # noqa: BLE001
            software.append((mod, "not installed"))
    hardware = [("CPU", f"{_cpu_model()} ({platform.machine()})"),
                ("CPU vector ISA", cpu_vector_isa()),
                ("GPU", "; ".join(_gpus()))]
    env = [(k, os.environ[k]) for k in sorted(os.environ) if k.startswith(("LTCL_", "TRITON_", "TORCH_CUDA_ARCH",
                                                                           "TORCH_EXTENSIONS_DIR", "CUDA_VISIBLE"))]
    status = backend_status(build)
    import torch
    return {"software": software, "hardware": hardware, "environment": env, "backends": status,
            "auto": _auto_choice(status), "cuda_device": torch.cuda.is_available()}


def format_report(info: Dict[str, object]) -> str:
    lines = ["ltcl_fused environment report (python -m ltcl_fused.env)", ""]
    for title in ("software", "hardware", "environment"):
        rows = info[title]
        lines.append(f"{title}:")
        if not rows:
            lines.append("  (none set)")
        w = max([len(k) for k, _ in rows] + [1])
        lines += [f"  {k:<{w}}  {v}" for k, v in rows]
        lines.append("")
    lines.append("backends (available, or why not):")
    for label in ("CPU tensors", "CUDA tensors"):
        note = "" if label == "CPU tensors" or info.get("cuda_device") else "; no CUDA device on this machine"
        lines.append(f"  on {label} (backend='auto' picks: {info['auto'][label]}{note}):")
        for name in BACKEND_ORDER:
            lines.append(f"    {name:<9s} {info['backends'][name][label]}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ltcl_fused.env", description=__doc__.split("\n")[0])
    ap.add_argument("--no-build", action="store_true",
                    help="do not build the C++ extension to check the cpu/cuda backends")
    a = ap.parse_args(argv)
    print(format_report(collect(build=not a.no_build)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
