"""The engine and the device the Triton kernels run on here (or a module-level skip): CPU tensors under the
interpreter (CI; tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported), CUDA tensors when run on a
GPU machine with TRITON_INTERPRET=0. (The code-generation subprocess: tests/_codegen.py.)
"""
from __future__ import annotations

import pytest
import torch


def engine_and_device():
    from ltcl_fused.backends import get_engine
    eng = get_engine("triton")
    dev = torch.device("cpu") if eng.unavailable_reason(torch.device("cpu")) is None else torch.device("cuda")
    if eng.unavailable_reason(dev) is not None:  # pragma: no cover
        pytest.skip(f"triton engine unavailable: {eng.unavailable_reason(dev)}", allow_module_level=True)
    return eng, dev
