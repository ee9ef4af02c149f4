"""Block configurations of the row-statistics kernels, chosen by a small heuristic (no autotuning).

A ``BlockConfig`` is (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages); SINGLE_D = (D <= BLOCK_D)
(else D is swept in BLOCK_D chunks: e.g. the D <= 128 16-bit backward uses two 64-wide chunks, the
single-chunk 128-wide variant spills on sm_80). On sm_90 the owned block is 64 rows so that every
16-bit ``tl.dot`` is a wgmma (M >= 64).
Forward: BLOCK_M anchor rows per program, column tiles of BLOCK_N. Backward: BLOCK_M is the block a
program owns (anchor rows for dA, columns for dC) and BLOCK_N the tile it sweeps over.
Every entry of ``SHIPPED`` is compiled for sm_80 and sm_90 with the dtypes it serves, and checked
for spills, shared memory and tensor-core use, by ``tests/test_triton_codegen.py``.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch


class BlockConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int

    def single_d(self, D: int) -> bool:
        return D <= self.BLOCK_D


class KernelConfig(NamedTuple):
    fwd: BlockConfig
    bwd: BlockConfig
    dtypes: Tuple[str, ...]  # input dtypes this configuration is shipped for
    max_d: int               # used for D <= max_d (0: any D, D swept in BLOCK_D chunks)


SHIPPED = {
    # 16-bit inputs: tensor-core tiles (mma.sync on sm_80, wgmma on sm_90)
    "h_d64": KernelConfig(BlockConfig(64, 64, 64, 8, 2), BlockConfig(64, 32, 64, 8, 2), ("bf16", "fp16"), 64),
    "h_d128": KernelConfig(BlockConfig(64, 64, 128, 8, 2), BlockConfig(64, 32, 64, 8, 2), ("bf16", "fp16"), 128),
    "h_large": KernelConfig(BlockConfig(64, 32, 64, 8, 2), BlockConfig(64, 32, 64, 8, 2), ("bf16", "fp16"), 0),
    # fp32 inputs (ieee fp32 dot by default, TF32 opt-in): smaller tiles
    "f_d32": KernelConfig(BlockConfig(32, 32, 32, 4, 2), BlockConfig(32, 32, 32, 8, 2), ("fp32",), 32),
    "f_large": KernelConfig(BlockConfig(32, 32, 32, 8, 1), BlockConfig(32, 16, 32, 4, 1), ("fp32",), 0),
    # fp64 inputs: correctness first (fp64 mma m8n8k4 on sm_80+)
    "d_any": KernelConfig(BlockConfig(32, 32, 32, 4, 1), BlockConfig(32, 16, 32, 4, 1), ("fp64",), 0),
}

#: configuration used under the Triton interpreter (CPU tensors): big tiles = few Python-level steps
INTERPRET = KernelConfig(BlockConfig(64, 64, 64, 1, 1), BlockConfig(64, 64, 64, 1, 1), ("any",), 0)

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def pick_config(M: int, N: int, D: int, dtype: torch.dtype, interpret: bool = False) -> KernelConfig:
    """Heuristic: the smallest shipped D class that holds D in one chunk, else the chunked one."""
    if interpret:
        return INTERPRET
    dt = _DT[dtype]
    cands = [c for c in SHIPPED.values() if dt in c.dtypes]
    single = sorted((c for c in cands if c.max_d and D <= c.max_d), key=lambda c: c.max_d)
    if single:
        return single[0]
    return next(c for c in cands if c.max_d == 0)
