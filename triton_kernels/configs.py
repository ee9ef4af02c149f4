"""Block configurations of the row-statistics kernels, chosen by a small heuristic (no autotuning).

A configuration is (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages); SINGLE_D = (D <= BLOCK_D).
The shipped GPU configurations are listed in ``SHIPPED`` and every one of them is compiled for
sm_80 and sm_90 (bf16, fp16, fp32) by ``tests/test_triton_codegen.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class BlockConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int

    def single_d(self, D: int) -> bool:
        return D <= self.BLOCK_D


# name -> config; the 16-bit/fp32 ones are the GPU fast path, "fp64" is correctness-first
SHIPPED = {
    "d16": BlockConfig(64, 64, 16, 4, 2),      # D <= 16
    "d32": BlockConfig(64, 64, 32, 4, 2),      # D <= 32
    "d64": BlockConfig(64, 64, 64, 4, 2),      # D <= 64
    "d128": BlockConfig(64, 64, 128, 8, 2),    # D <= 128 (the usual projection-head width)
    "dlarge": BlockConfig(64, 64, 64, 4, 2),   # D > 128: D swept in 64-wide chunks
    "fp64": BlockConfig(32, 32, 32, 4, 1),     # float64 inputs, any D (chunked when D > 32)
}

#: configuration used under the Triton interpreter (CPU tensors): big tiles = few Python-level steps
INTERPRET = BlockConfig(64, 64, 64, 1, 1)


def pick_config(M: int, N: int, D: int, dtype: torch.dtype, interpret: bool = False) -> BlockConfig:
    """Heuristic block configuration from the problem size and dtype."""
    if interpret:
        return INTERPRET
    if dtype == torch.float64:
        return SHIPPED["fp64"]
    if D <= 16:
        return SHIPPED["d16"]
    if D <= 32:
        return SHIPPED["d32"]
    if D <= 64:
        return SHIPPED["d64"]
    if D <= 128:
        return SHIPPED["d128"]
    return SHIPPED["dlarge"]
