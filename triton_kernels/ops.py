"""Host side of the row-statistics kernels, registered as torch.library custom ops.

``torch.ops.ltcl_fused.triton_rowstats_fwd`` / ``triton_rowstats_bwd`` are ``torch.library.triton_op``s
whose kernels are launched through ``torch.library.wrap_triton``, so ``torch.compile`` can trace
them (the autograd formula lives in ``ltcl_fused/engine/function.py``). Under the Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors) ``wrap_triton`` cannot take the interpreted
kernels: the same functions are then registered as opaque ``custom_op``s with fake implementations
(torch.compile and opcheck work on them; the kernels are called directly).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from . import support
from .configs import KernelConfig, pick_config
from .rowstats import (rowstats_bwd_da_kernel, rowstats_bwd_dc_kernel, rowstats_bwd_sym_kernel, rowstats_fwd_kernel,
                       rowstats_fwd_merge_kernel, rowstats_fwd_sum_kernel)

#: test hook: a KernelConfig that replaces the heuristic (e.g. to exercise the chunked-D path)
FORCE_CONFIG: Optional[KernelConfig] = None
#: test hook: the number of column ranges of a split forward sweep (None: ``split_plan``'s heuristic)
FORCE_SPLIT: Optional[int] = None
#: rows per program of the merge kernels of a split forward (row vectors only)
MERGE_BLOCK = 128
#: fp32 tl.dot precisions a caller may ask for (support.fp32_precision)
PRECISIONS = ("ieee", "tf32", "tf32x3")


def interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(rowstats_fwd_kernel, InterpretedFunction)


def _launcher(kernel):
    if interpreted():
        return kernel
    return torch.library.wrap_triton(kernel)


def launch(kernel, grid, device: torch.device, *args, **meta):
    """``kernel[grid](*args, **meta)`` with ``device`` current (support.device_guard), through wrap_triton on
    GPUs. An empty grid launches nothing (callers allocate their outputs so that nothing is left unwritten)."""
    if 0 in grid:
        return
    with support.device_guard(device):
        _launcher(kernel)[grid](*args, **meta)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(M: int, N: int, D: int, dtype: torch.dtype, family: str = "rowstats") -> KernelConfig:
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    return pick_config(M, N, D, dtype, interpreted(), family)


def _precision(dtype: torch.dtype, precision: str) -> str:
    """PREC constexpr of a launch: ``precision`` (one of PRECISIONS) for fp32 inputs, "ieee" otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"triton: fp32 precision must be one of {PRECISIONS}, got {precision!r}")
    return support.dot_precision(dtype, precision)


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter's bf16 tl.dot is wrong (numpy has no bf16): multiply the bf16 values in fp32 there
    return dtype == torch.bfloat16 and interpreted()


def _capability(device: torch.device) -> int:
    """Compute capability of a CUDA device as major·10 + minor (0 for CPU tensors and under the interpreter)."""
    if interpreted() or device.type != "cuda":
        return 0
    return _cc(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cc(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_plan(M: int, N: int, block_m: int, block_n: int, device: torch.device) -> Tuple[int, int]:
    """(n_split, n_per): the forward's column sweep split into n_split ranges of n_per columns (a multiple of
    block_n, none empty) when the row blocks alone cannot fill the GPU: fewer than one per SM. Then about two
    programs per SM, with at least 4 column tiles each; (1, N) otherwise, under the interpreter and on CPU
    (FORCE_SPLIT overrides). Depends on M, N, the blocks and the SM count only: deterministic on a device."""
    if M == 0 or N == 0:
        return 1, N
    tiles = triton.cdiv(N, block_n)
    if FORCE_SPLIT is not None:
        n = FORCE_SPLIT
    elif interpreted() or device.type != "cuda":
        return 1, N
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        row_blocks = triton.cdiv(M, block_m)
        if row_blocks >= sms:
            return 1, N
        n = min(triton.cdiv(2 * sms, row_blocks), tiles // 4)
    n = max(1, min(n, tiles))
    if n == 1:
        return 1, N
    n_per = triton.cdiv(tiles, n) * block_n
    return triton.cdiv(N, n_per), n_per


def _fwd_impl(A: Tensor, C: Tensor, a_lab: Tensor, c_lab: Tensor, bias_same: Optional[Tensor],
              bias_other: Optional[Tensor], inv_tau: float, gamma: float, self_offset: int, focal: bool,
              precision: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(lse, pos_sum, fpos, fneg, upos, uneg, top, lrest): the contract forward, [M] each."""
    M, D = A.shape
    N = C.shape[0]
    acc = _acc(A.dtype)
    lse = torch.empty(M, dtype=acc, device=A.device)
    pos = torch.empty(M, dtype=acc, device=A.device)
    lrest = torch.empty(M, dtype=acc, device=A.device)
    top = torch.empty(M, dtype=torch.int64, device=A.device)
    fpos, fneg, upos, uneg = (torch.zeros(M, dtype=acc, device=A.device) for _ in range(4))
    has_bias = bias_same is not None
    bs = bias_same if has_bias else lse
    bo = bias_other if has_bias else lse
    cfg = _config(M, N, D, A.dtype).fwd_config(_capability(A.device))
    args = (A, C, a_lab, c_lab, bs, bo, lse, pos, fpos, fneg, upos, uneg, top, lrest,
            M, N, D, A.stride(0), C.stride(0), self_offset, support.kernel_param(inv_tau, acc),
            support.kernel_param(gamma, acc))
    meta = dict(HAS_BIAS=has_bias, FOCAL=focal, GAMMA_ZERO=(gamma == 0.0),
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, SINGLE_D=cfg.single_d(D),
                PREC=_precision(A.dtype, precision), UPCAST=_upcast(A.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    row_blocks = triton.cdiv(M, cfg.BLOCK_M)
    n_split, n_per = split_plan(M, N, cfg.BLOCK_M, cfg.BLOCK_N, A.device)
    if n_split <= 1:
        launch(rowstats_fwd_kernel, (row_blocks,), A.device, *args, **meta)
        return lse, pos, fpos, fneg, upos, uneg, top, lrest
    # split sweep: partials per column range, merged in range order (deterministic); every entry is written
    ws = torch.empty(n_split, 4, M, dtype=acc, device=A.device)
    wtop = torch.empty(n_split, M, dtype=torch.int64, device=A.device)
    merge_grid = (triton.cdiv(M, MERGE_BLOCK),)
    launch(rowstats_fwd_kernel, (row_blocks, n_split), A.device, *args, WS=ws, WTOP=wtop, n_per=n_per, PASS=1,
           **meta)
    launch(rowstats_fwd_merge_kernel, merge_grid, A.device, ws, wtop, lse, pos, top, lrest, M, N, self_offset,
           n_split, BLOCK_M=MERGE_BLOCK)
    if focal:
        launch(rowstats_fwd_kernel, (row_blocks, n_split), A.device, *args, WS=ws, WTOP=wtop, n_per=n_per, PASS=2,
               **meta)
        launch(rowstats_fwd_sum_kernel, merge_grid, A.device, ws, lse, fpos, fneg, upos, uneg, M, n_split,
               BLOCK_M=MERGE_BLOCK)
    return lse, pos, fpos, fneg, upos, uneg, top, lrest


def _bwd_impl(A: Tensor, C: Tensor, a_lab: Tensor, c_lab: Tensor, bias_same: Optional[Tensor],
              bias_other: Optional[Tensor], lse: Tensor, top: Tensor, lrest: Tensor, cpos: Tensor,
              cposf: Tensor, cneg: Tensor, r: Tensor, rt: Tensor, inv_tau: float, gamma: float,
              self_offset: int, focal: bool, precision: str) -> Tuple[Tensor, Tensor]:
    """(dA [M, D], dC [N, D]) in the input dtype: the contract backward."""
    M, D = A.shape
    N = C.shape[0]
    if M == 0 or N == 0:  # an empty (e.g. distributed ring) block: no pair, exact zeros (no workspace read)
        return torch.zeros_like(A), torch.zeros_like(C)
    acc = _acc(A.dtype)
    # zero-initialised: the chunked-D kernels accumulate into them (read-modify-write of a program's own rows)
    dA = torch.zeros(M, D, dtype=acc, device=A.device)
    dC = torch.zeros(N, D, dtype=acc, device=A.device)
    has_bias = bias_same is not None
    bs = bias_same if has_bias else lse
    bo = bias_other if has_bias else lse
    cfg = _config(M, N, D, A.dtype).bwd
    common = dict(HAS_BIAS=has_bias, FOCAL=focal, GAMMA_ZERO=(gamma == 0.0), BLOCK_D=cfg.BLOCK_D,
                  SINGLE_D=cfg.single_d(D), PREC=_precision(A.dtype, precision), UPCAST=_upcast(A.dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (A, C, a_lab, c_lab, bs, bo, lse, top, lrest, cpos, cposf, cneg, r, rt)
    scalars = (self_offset, support.kernel_param(inv_tau, acc), support.kernel_param(gamma, acc))
    # dA: a program owns BLOCK_M anchor rows and sweeps column tiles of BLOCK_N
    launch(rowstats_bwd_da_kernel, (triton.cdiv(M, cfg.BLOCK_M),), A.device,
           *args, dA, M, N, D, A.stride(0), C.stride(0), *scalars,
           BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, **common)
    # dC: a program owns BLOCK_M columns (kernel's BLOCK_N) and sweeps row tiles of BLOCK_N (kernel's BLOCK_M)
    launch(rowstats_bwd_dc_kernel, (triton.cdiv(N, cfg.BLOCK_M),), A.device,
           *args, dC, M, N, D, A.stride(0), C.stride(0), *scalars,
           BLOCK_M=cfg.BLOCK_N, BLOCK_N=cfg.BLOCK_M, **common)
    return dA.to(A.dtype), dC.to(C.dtype)


def _bwd_sym_impl(X: Tensor, lab: Tensor, bias_same: Optional[Tensor], bias_other: Optional[Tensor], lse: Tensor,
                  top: Tensor, lrest: Tensor, cpos: Tensor, cposf: Tensor, cneg: Tensor, r: Tensor, rt: Tensor,
                  inv_tau: float, gamma: float, focal: bool, precision: str) -> Tensor:
    """dX [N, D] in the input dtype: the contract backward of A = C = X, a_lab = c_lab = lab, self_offset = 0,
    i.e. dA + dC, by one row-parallel kernel (``rowstats_bwd_sym_kernel``)."""
    N, D = X.shape
    if N == 0:
        return torch.zeros_like(X)
    acc = _acc(X.dtype)
    has_bias = bias_same is not None
    bs = bias_same if has_bias else lse
    bo = bias_other if has_bias else lse
    cfg = _config(N, N, D, X.dtype).sym_config()
    grid, slabs, n_per = sym_grid(N, D, cfg, acc, X.device)
    launch(rowstats_bwd_sym_kernel, grid, X.device,
           X, lab, bs, bo, lse, top, lrest, cpos, cposf, cneg, r, rt, slabs, N, D, X.stride(0),
           support.kernel_param(inv_tau, acc), support.kernel_param(gamma, acc), n_per,
           HAS_BIAS=has_bias, FOCAL=focal, GAMMA_ZERO=(gamma == 0.0), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
           BLOCK_D=cfg.BLOCK_D, SINGLE_D=cfg.single_d(D), PREC=_precision(X.dtype, precision),
           UPCAST=_upcast(X.dtype), SPLIT=grid[1] > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return sum_slabs(slabs).to(X.dtype)


def sym_grid(N: int, D: int, cfg, acc: torch.dtype, device: torch.device):
    """(grid, slabs, n_per) of a symmetric backward kernel: one program per BLOCK_M rows and, when that many row
    blocks cannot fill the GPU (``split_plan``), per column range too, each range into its own zero-initialised
    output slab [N, D] (slabs: [n_split, N, D] in the accumulation dtype; the chunked-D kernels accumulate
    into them)."""
    n_split, n_per = split_plan(N, N, cfg.BLOCK_M, cfg.BLOCK_N, device)
    slabs = torch.zeros(n_split, N, D, dtype=acc, device=device)
    return (triton.cdiv(N, cfg.BLOCK_M), n_split), slabs, n_per


def sum_slabs(slabs: Tensor) -> Tensor:
    """The [N, D] sum of a split backward's slabs in range order (a view of the only one when unsplit)."""
    out = slabs[0]
    for k in range(1, slabs.shape[0]):
        out = out + slabs[k]
    return out


def _bwd_sym_fake(X, lab, bias_same, bias_other, lse, top, lrest, cpos, cposf, cneg, r, rt, inv_tau, gamma, focal,
                  precision):
    return torch.empty_like(X)


def _fwd_fake(A, C, a_lab, c_lab, bias_same, bias_other, inv_tau, gamma, self_offset, focal, precision):
    M = A.shape[0]
    acc = _acc(A.dtype)
    outs = [A.new_empty(M, dtype=acc) for _ in range(6)]
    return (*outs, A.new_empty(M, dtype=torch.int64), A.new_empty(M, dtype=acc))


def _bwd_fake(A, C, a_lab, c_lab, bias_same, bias_other, lse, top, lrest, cpos, cposf, cneg, r, rt, inv_tau, gamma,
              self_offset, focal, precision):
    return torch.empty_like(A), torch.empty_like(C)


if interpreted():
    # The interpreter's kernels cannot be traced by wrap_triton: register opaque custom ops with fake
    # implementations instead, so torch.compile / opcheck still work on CPU tensors.
    triton_rowstats_fwd = torch.library.custom_op("ltcl_fused::triton_rowstats_fwd", _fwd_impl, mutates_args=())
    triton_rowstats_fwd.register_fake(_fwd_fake)
    triton_rowstats_bwd = torch.library.custom_op("ltcl_fused::triton_rowstats_bwd", _bwd_impl, mutates_args=())
    triton_rowstats_bwd.register_fake(_bwd_fake)
    triton_rowstats_bwd_sym = torch.library.custom_op("ltcl_fused::triton_rowstats_bwd_sym", _bwd_sym_impl,
                                                      mutates_args=())
    triton_rowstats_bwd_sym.register_fake(_bwd_sym_fake)
else:
    # GPU: triton_op + wrap_triton, which torch.compile traces into (the kernels become part of the graph).
    triton_rowstats_fwd = torch.library.triton_op("ltcl_fused::triton_rowstats_fwd", _fwd_impl, mutates_args=())
    triton_rowstats_bwd = torch.library.triton_op("ltcl_fused::triton_rowstats_bwd", _bwd_impl, mutates_args=())
    triton_rowstats_bwd_sym = torch.library.triton_op("ltcl_fused::triton_rowstats_bwd_sym", _bwd_sym_impl,
                                                      mutates_args=())
