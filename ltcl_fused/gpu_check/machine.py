"""The machine: versions, the GPU, the CUDA toolkit, and the environment of the CUDA extension build.

``probe`` runs in a worker process (the runner itself never initialises CUDA). ``build_env`` is what the
runner adds to the environment of the extension build and of every worker (the extension's name hashes
``TORCH_CUDA_ARCH_LIST``, so the workers must see the same value to find the build):
``TORCH_CUDA_ARCH_LIST`` = the local GPU's compute capability only (unless set), ``MAX_JOBS`` (ninja),
``CUDA_HOME`` = a toolkit whose nvcc matches torch's CUDA major version (torch refuses another major),
and the Python's own ``bin`` folder on ``PATH`` (where pip puts ``ninja``).
"""
from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Iterable, List, Optional, Tuple


def nvcc_version(nvcc: str) -> Optional[str]:
    """"12.8" from ``nvcc --version`` ("... release 12.8, V12.8.93"), None if it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_home_candidates() -> List[str]:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for base in sys.path:  # pip's nvidia-cuda-nvcc packages
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvcc"))) + \
            sorted(glob.glob(os.path.join(base, "nvidia", "cu*")))
    seen, out = set(), []
    for c in cands:
        if c and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def find_cuda_home(torch_cuda: Optional[str], candidates: Optional[Iterable[str]] = None
                   ) -> Tuple[Optional[str], Optional[str], str]:
    """(CUDA_HOME, its nvcc version, note): the first toolkit whose nvcc has torch's CUDA major version, else the
    first toolkit found (the build will then say why it fails), else (None, None, why)."""
    found = []
    for home in (cuda_home_candidates() if candidates is None else candidates):
        nvcc = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            ver = nvcc_version(nvcc)
            if ver:
                found.append((home, ver))
    if not found:
        return None, None, ("no CUDA toolkit (nvcc) found: looked at CUDA_HOME, PATH, /usr/local/cuda*, "
                            "pip's nvidia packages")
    major = (torch_cuda or "").split(".")[0]
    for home, ver in found:
        if ver.split(".")[0] == major:
            return home, ver, ""
    home, ver = found[0]
    return home, ver, f"nvcc {ver} at {home} does not match torch's CUDA {torch_cuda} (torch refuses another major)"


def build_env(capability: Optional[str], cuda_home: Optional[str], jobs: int, base: Optional[dict] = None) -> dict:
    """The variables added for the extension build and the workers (see the module docstring)."""
    base = os.environ if base is None else base
    env = {}
    if capability and not base.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = capability
    if not base.get("MAX_JOBS"):
        env["MAX_JOBS"] = str(max(1, jobs))
    if cuda_home and not base.get("CUDA_HOME"):
        env["CUDA_HOME"] = cuda_home
    path = [os.path.dirname(sys.executable)] + ([os.path.join(cuda_home, "bin")] if cuda_home else [])
    env["PATH"] = os.pathsep.join(path + [base.get("PATH", "")])
    return env


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor() or "cpu"


def probe(rt, case: dict) -> dict:
    """Versions, the device and which backends can be tried (without building the C++ extension)."""
    import numpy
    import torch

    import ltcl_fused
    from ltcl_fused.backends import get_engine
    info = dict(status="ok", reason="", python=platform.python_version(), torch=torch.__version__,
                torch_cuda=torch.version.cuda or "", numpy=numpy.__version__, ltcl_fused=ltcl_fused.__version__,
                git=git_commit(), platform=platform.platform(), cpu=cpu_model(), cpu_count=os.cpu_count(),
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                LTCL_TRITON_TF32=os.environ.get("LTCL_TRITON_TF32", ""),
                TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", ""), device=rt.name)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"not importable ({type(e).__name__})"
    if rt.name == "cuda":
        p = torch.cuda.get_device_properties(rt.device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                    sm_count=p.multi_processor_count, gpu_count=torch.cuda.device_count())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            info["driver"] = out[0] if out else ""
        except (OSError, subprocess.SubprocessError):
            info["driver"] = ""
    else:
        info.update(gpu="none (dry run: CPU tensors, Triton interpreter)", capability="")
    reasons = {}
    for b in ("triton", "torch"):
        reasons[b] = get_engine(b).unavailable_reason(rt.device)
    if rt.name != "cuda":
        reasons["cuda"] = get_engine("cuda").unavailable_reason(rt.device)  # a device check: builds nothing
    elif torch.version.cuda is None:
        reasons["cuda"] = "this torch build has no CUDA support"
    else:
        home, ver, note = find_cuda_home(torch.version.cuda)
        info.update(cuda_home=home or "", nvcc=ver or "", cuda_home_note=note)
        reasons["cuda"] = None if home else note
    info["backends"] = reasons
    return info
