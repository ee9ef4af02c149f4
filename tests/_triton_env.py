"""What the Triton test files share: the engine and the device its kernels run on here (or a module-level skip),
and the code-generation subprocess.

``engine_and_device()``: CPU tensors under the interpreter (CI; tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported), CUDA tensors when run on a GPU machine with TRITON_INTERPRET=0.
``run_compile_script(script, *argv)``: runs ``script`` with this Python in a subprocess without TRITON_INTERPRET
(the interpreter does not compile kernels), the repository first on PYTHONPATH, and returns the JSON the
script prints after ``@@JSON@@``; a failed run fails the test with its stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _hang import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def engine_and_device():
    from ltcl_fused.backends import get_engine
    eng = get_engine("triton")
    dev = torch.device("cpu") if eng.unavailable_reason(torch.device("cpu")) is None else torch.device("cuda")
    if eng.unavailable_reason(dev) is not None:  # pragma: no cover
        pytest.skip(f"triton engine unavailable: {eng.unavailable_reason(dev)}", allow_module_level=True)
    return eng, dev


def run_compile_script(script: str, *argv: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, unless the caller's environment says
    p = subprocess.run([sys.executable, "-c", script, *argv], cwd=str(ROOT), env=env, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.split("@@JSON@@", 1)[1])
