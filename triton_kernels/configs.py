"""Block configurations of the row-statistics kernels, chosen by a small heuristic (no autotuning).

A ``BlockConfig`` is (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages); SINGLE_D = (D <= BLOCK_D)
(else D is swept in BLOCK_D chunks: e.g. the D <= 128 16-bit backward uses two 64-wide chunks, the
single-chunk 128-wide variant spills on sm_80). On sm_90 the owned block is 64 rows so that every
16-bit ``tl.dot`` is a wgmma (M >= 64); the forward of the 16-bit single-chunk classes uses 128 rows there
(``fwd90``, ``KernelConfig.fwd_config``).
Forward: BLOCK_M anchor rows per program, column tiles of BLOCK_N. Backward: BLOCK_M is the block a
program owns (anchor rows for dA, columns for dC) and BLOCK_N the tile it sweeps over.
Every entry of ``SHIPPED`` (as ``shipped()`` adapts it to the running Triton) is compiled for sm_80 and sm_90
with the dtypes it serves, and checked for spills, shared memory and tensor-core use, by
``tests/test_triton_codegen.py`` (newest Triton) and ``make test-triton-old`` (oldest, Triton 3.3).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

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
    sym: Optional[BlockConfig] = None  # the symmetric backward (rowstats_bwd_sym_kernel, and ssl_ops.sym_config's
    #                                    base of ssl_bwd_sym_kernel); None: as bwd
    fwd90: Optional[BlockConfig] = None  # the row-statistics forward on sm_90 (Hopper); None: as fwd

    def sym_config(self) -> BlockConfig:
        return self.bwd if self.sym is None else self.sym

    def fwd_config(self, cc: int = 0) -> BlockConfig:
        """The row-statistics forward's blocks on compute capability ``cc`` (major·10 + minor; 0: unknown)."""
        return self.fwd90 if self.fwd90 is not None and cc // 10 == 9 else self.fwd


SHIPPED = {
    # 16-bit inputs: tensor-core tiles (mma.sync on sm_80, wgmma on sm_90)
    # (sm_90 forward: 128 rows, two warpgroups of 64-row wgmma, C read once per 128 anchors; 128x64 spilled 64 B
    # in the focal pass on Triton 3.3.1, 128x32 is spill-free on 3.3.1 and 3.9.0; the symmetric backward holds two
    # G tiles: 64x16 where 64x32 spilled 16 B on sm_90 with chunked D, and 8 B on sm_80 with D <= 64 on its 2-D
    # grid, SPLIT)
    "h_d64": KernelConfig(BlockConfig(64, 64, 64, 8, 2), BlockConfig(64, 32, 64, 8, 2), ("bf16", "fp16"), 64,
                          BlockConfig(64, 16, 64, 8, 2), BlockConfig(128, 32, 64, 8, 2)),
    "h_d128": KernelConfig(BlockConfig(64, 64, 128, 8, 2), BlockConfig(64, 32, 64, 8, 2), ("bf16", "fp16"), 128,
                           BlockConfig(64, 16, 64, 8, 2), BlockConfig(128, 32, 128, 8, 2)),
    "h_large": KernelConfig(BlockConfig(64, 32, 64, 8, 2), BlockConfig(64, 32, 64, 8, 2), ("bf16", "fp16"), 0,
                            BlockConfig(64, 16, 64, 8, 2)),
    # fp32 inputs (ieee fp32 dot by default, TF32 opt-in): smaller tiles
    # (the symmetric backward: 32x16, spill-free with ieee, tf32 and tf32x3 where 32x32 spilled 8-24 B with TF32)
    "f_d32": KernelConfig(BlockConfig(32, 32, 32, 4, 2), BlockConfig(32, 32, 32, 8, 2), ("fp32",), 32,
                          BlockConfig(32, 16, 32, 8, 2)),
    "f_large": KernelConfig(BlockConfig(32, 32, 32, 8, 1), BlockConfig(32, 16, 32, 4, 1), ("fp32",), 0),
    # fp64 inputs: correctness first (fp64 mma m8n8k4 on sm_80+)
    # (the fp64 symmetric backward: 32x8, where 32x16 spilled 48-104 B in the focal variant on Triton 3.9)
    "d_any": KernelConfig(BlockConfig(32, 32, 32, 4, 1), BlockConfig(32, 16, 32, 4, 1), ("fp64",), 0,
                          BlockConfig(32, 8, 32, 4, 1)),
}

#: Older Triton allocates registers differently: with some SHIPPED shapes the codegen sweeps of Triton 3.3.1 and
#: 3.6.0 found 8-64 B stack frames (spills): the 16-bit row-statistics dA/dC kernels at the 255-register limit
#: with the 64x32 tile (3.3, 3.6), the fp32 forward of f_large with 4 or 8 warps and 32-wide D chunks and the
#: fp32 dC of f_d32 with 8 warps (3.3, once the forward carried the second maximum of the dominant column) and
#: the fp32 SSL dA of MTTV's "low" filter on sm_80 (3.6). Entries (below this Triton, kernel family, config name, replaced fields) adapt
#: SHIPPED for those versions (``shipped()``); names, dtypes and D classes stay. Swept: 3.3.1, 3.6.0, 3.9.0
#: (docs/triton.md).
LEGACY = (
    ((3, 7), "rowstats", "h_d64", dict(bwd=BlockConfig(64, 16, 64, 8, 2))),
    ((3, 7), "rowstats", "h_d128", dict(bwd=BlockConfig(64, 16, 64, 8, 2))),
    ((3, 7), "rowstats", "h_large", dict(bwd=BlockConfig(64, 16, 64, 8, 2))),
    # (and its symmetric backward's 2-D grid, SPLIT, used 8-16 B with 8 warps on 3.3.1: 4 warps there)
    ((3, 4), "rowstats", "f_d32", dict(bwd=BlockConfig(32, 32, 32, 4, 2), sym=BlockConfig(32, 16, 32, 4, 2))),
    ((3, 4), "rowstats", "f_large", dict(fwd=BlockConfig(32, 32, 16, 4, 1))),
    # (the SSL symmetric backward keeps the 32x16 tile: 32x32 used 8 B with one scale on sm_80, Triton 3.3.1)
    ((3, 7), "ssl", "f_large", dict(bwd=BlockConfig(32, 32, 32, 4, 1), sym=BlockConfig(32, 16, 32, 4, 1))),
)
FAMILIES = ("rowstats", "ssl")


def shipped(family: str = "rowstats", triton_v=None) -> dict:
    """SHIPPED as the kernels of ``family`` ("rowstats" or "ssl") use it with this Triton (or ``triton_v``)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if triton_v is None:
        from .support import triton_version
        triton_v = triton_version()
    out = dict(SHIPPED)
    for below, fam, name, fields in LEGACY:
        if fam == family and tuple(triton_v[:2]) < below:
            out[name] = out[name]._replace(**fields)
    return out


#: configuration used under the Triton interpreter (CPU tensors): big tiles = few Python-level steps
INTERPRET = KernelConfig(BlockConfig(64, 64, 64, 1, 1), BlockConfig(64, 64, 64, 1, 1), ("any",), 0)

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def pick_config(M: int, N: int, D: int, dtype: torch.dtype, interpret: bool = False,
                family: str = "rowstats") -> KernelConfig:
    """Heuristic: the smallest shipped D class that holds D in one chunk, else the chunked one."""
    if interpret:
        return INTERPRET
    dt = _DT[dtype]
    cands = [c for c in shipped(family).values() if dt in c.dtypes]
    single = sorted((c for c in cands if c.max_d and D <= c.max_d), key=lambda c: c.max_d)
    if single:
        return single[0]
    return next(c for c in cands if c.max_d == 0)
