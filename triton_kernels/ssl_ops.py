"""Host side of the SSL kernels (``ssl_rowstats.py``), registered as torch.library custom ops.

``torch.ops.ltcl_fused.triton_ssl_fwd`` / ``triton_ssl_bwd`` implement the forward / backward of
``ltcl_fused/engine/ssl_contract.py`` (the autograd wrapper is ``ssl_row_stats`` there);
``triton_ssl_bwd_sym`` the backward of the symmetric case (A = C = X, self_offset = 0, no Bayesian weights):
dX = dA + dC from one row-parallel kernel, ``ssl_bwd_sym_kernel``. On GPUs they
are ``torch.library.triton_op``s launching the kernels through ``wrap_triton``; under the Triton
interpreter they are opaque ``custom_op``s with fake implementations (as in ``ops.py``).

The SSLConfig travels as plain arguments: ``scales`` (list of c_k), ``exclude_partner``,
``include_self``, ``filter_mode`` (0 none, 1 "both", 2 "low"), ``lower``, ``upper`` and ``bayes``
([] or [α, β, τ⁺]).

Unit weights (DCL, HCL, MTTV): one fused forward kernel and the recompute dA/dC kernels; the scales
are processed two at a time (any K works; K <= 2 is one launch).
Bayesian weights (exact ranks): the anchors are processed in row blocks of ``rows = budget // N``
(memory O(rows · N), never M × N): the STRIP variant of the forward kernel writes the block's
masked similarities, ``torch.sort`` sorts each row, and ``ssl_bayes_kernel`` finds every element's
exact rank by binary lifting and accumulates the weighted LSE (forward) or writes the block's G
strip (backward), which the dA/dC kernels then multiply (G_STRIP); the dC of the blocks is summed in
order (deterministic). With few row blocks the weighting pass runs on a 2-D grid (row blocks x column ranges,
``ops.split_plan``), its forward partials merged in range order (``_merge_bayes_parts``).
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
import triton
from torch import Tensor

from .configs import BlockConfig
from . import support
from .ops import _acc, _config, _precision, _upcast, interpreted, launch, split_plan, sum_slabs, sym_grid
from .ssl_rowstats import ssl_bayes_kernel, ssl_bwd_da_kernel, ssl_bwd_dc_kernel, ssl_bwd_sym_kernel, ssl_fwd_kernel

#: elements of one Bayesian row block's strip (rows = BAYES_BLOCK_ELEMENTS // N, at least one kernel
#: row tile). A block keeps about 5 strips alive: V, its sorted copy and sort indices (int64), G.
BAYES_BLOCK_ELEMENTS = int(os.environ.get("LTCL_TRITON_SSL_BLOCK_ELEMENTS", 1 << 22))
#: test hook: rows per Bayesian block (0: from BAYES_BLOCK_ELEMENTS)
FORCE_BAYES_ROWS = 0
#: block shape of the weighting pass (BLOCK_M rows per program, column tiles of BLOCK_N)
BAYES_CONFIG = BlockConfig(16, 64, 0, 4, 1)
BAYES_CONFIG_INTERPRET = BlockConfig(16, 64, 0, 1, 1)

FILTERS = {None: 0, "both": 1, "low": 2}


def bwd_config(bc: BlockConfig, g_strip: bool) -> BlockConfig:
    """Block shape of the SSL dA/dC kernels, derived from the row-statistics backward shape ``bc``:
    at most 4 warps on tiles of <= 32x32 (the 8-warp fp32 "f_d32" dC with the "low" filter and the self
    column kept used an 8-byte stack frame on sm_90), and in the G_STRIP variant (Bayesian path) column
    tiles of at least 32 (the 32x16 fp32 tile of "f_large" did the same). Checked by ssl_codegen."""
    if bc.BLOCK_M * bc.BLOCK_N <= 32 * 32:
        bc = bc._replace(num_warps=min(bc.num_warps, 4))
    if g_strip:
        bc = bc._replace(BLOCK_N=max(bc.BLOCK_N, 32))
    return bc


def sym_config(kc) -> BlockConfig:
    """Block shape of ``ssl_bwd_sym_kernel`` (two G tiles per S tile): the row-statistics symmetric backward's
    shape of the KernelConfig ``kc`` (``KernelConfig.sym_config``) with column tiles of at least 16 (the fp64
    32x8 tile of "d_any" used an 8-byte stack frame on sm_80 with a filter, Triton 3.9) and at most 4 warps on
    tiles of <= 32x16 (the 8-warp fp32 32x16 tile of "f_d32" used 8 bytes with two scales on Triton 3.3.1).
    Not the 4-warp rule of ``bwd_config`` (<= 32x32): the 4-warp 64x16 16-bit tile of "h_d128" spilled
    184-248 B. Checked by ssl_codegen."""
    bc = kc.sym_config()
    bc = bc._replace(BLOCK_N=max(bc.BLOCK_N, 16))
    if bc.BLOCK_M * bc.BLOCK_N <= 32 * 16:
        bc = bc._replace(num_warps=min(bc.num_warps, 4))
    return bc


def _params(inv_tau, c0, c1, lower, upper, acc):
    """Float arguments (inv_tau, c0, c1, lower, upper) of the forward and dA/dC kernels (support.kernel_param)."""
    return [support.kernel_param(x, acc) for x in (inv_tau, c0, c1, lower, upper)]


def _bayes_params(c, bayes, acc):
    """Float arguments of ssl_bayes_kernel: the scale c and the constants of ω (_bayes_logw), from (α, β, τ⁺)."""
    alpha, beta, tau_plus = bayes
    tau_minus = 1.0 - tau_plus
    a = (1.0 - 2.0 * alpha) * (tau_minus - tau_plus) + 1e-3
    b = 2.0 * (alpha * tau_minus + (1.0 - alpha) * tau_plus)
    p = [c, b * b, 4.0 * a, b, alpha, 1.0 - alpha, alpha * (1.0 - beta), (1.0 - alpha) * beta,
         alpha * (1.0 - beta) + (1.0 - alpha) * beta + 1e-3, tau_minus, tau_plus]
    return [support.kernel_param(x, acc) for x in p]


def _groups(scales: List[float]):
    """Scales two at a time: (first index, c0, c1, K2)."""
    for k in range(0, len(scales), 2):
        two = k + 1 < len(scales)
        yield k, float(scales[k]), float(scales[k + 1]) if two else 0.0, two


def _bayes_rows(M: int, N: int) -> int:
    if FORCE_BAYES_ROWS:
        return FORCE_BAYES_ROWS
    return max(64, min(M, BAYES_BLOCK_ELEMENTS // max(N, 1)))


def _bayes_cfg() -> BlockConfig:
    return BAYES_CONFIG_INTERPRET if interpreted() else BAYES_CONFIG


def _merge_bayes_parts(part: Tensor, nset: Tensor) -> Tensor:
    """LSE [bm] of a split weighting pass from its partials part [2, n_split, bm] (max m_k, Σ exp(x − m_k)),
    merged in k order: M = max_k m_k over the non-empty parts, LSE = M + log Σ_k s_k e^{m_k − M} (−inf when
    every part is empty, NaN for a poisoned row, nset < 0), as the kernel's own _lse_final."""
    m, s = part[0], part[1]
    live = s > 0
    ninf = torch.full_like(m, float("-inf"))
    big = torch.where(live, m, ninf).amax(0)
    ref = torch.where(big > float("-inf"), big, torch.zeros_like(big))
    tot = torch.where(live, s * torch.exp(torch.where(live, m, ref) - ref), torch.zeros_like(s)).sum(0)
    lse = torch.where(tot > 0, ref + torch.log(tot), ninf[0])
    return torch.where(nset < 0, torch.full_like(lse, float("nan")), lse)


def _bayes_launch(bm: int, N: int, device: torch.device, bwd: bool, *args, lse_out: Tensor, nset: Tensor):
    """ssl_bayes_kernel over a strip of bm rows: a 2-D grid (row blocks x column ranges, ops.split_plan) when
    the row blocks alone cannot fill the GPU; the forward's partials then merged by _merge_bayes_parts."""
    bc = _bayes_cfg()
    n_split, n_per = split_plan(bm, N, bc.BLOCK_M, bc.BLOCK_N, device)
    meta = dict(BWD=bwd, BLOCK_M=bc.BLOCK_M, BLOCK_N=bc.BLOCK_N, num_warps=bc.num_warps, num_stages=bc.num_stages)
    rows = triton.cdiv(bm, bc.BLOCK_M)
    if n_split == 1:
        launch(ssl_bayes_kernel, (rows,), device, *args, **meta)
        return
    part = None if bwd else torch.empty(2, n_split, bm, dtype=lse_out.dtype, device=device)
    launch(ssl_bayes_kernel, (rows, n_split), device, *args, PART=part if part is not None else lse_out,
           n_per=n_per, SPLIT=True, **meta)
    if not bwd:
        lse_out.copy_(_merge_bayes_parts(part, nset))


def _strip(A_blk, C, partner_blk, self_off, params, pos, pos_in, filter_mode, exclude_partner, include_self, cfg,
           prec, upcast):
    """The masked similarity strip V [rows, N] (+inf off the set), its row-sorted copy and the set sizes."""
    bm, D = A_blk.shape
    N = C.shape[0]
    acc = pos.dtype
    V = torch.empty(bm, N, dtype=acc, device=A_blk.device)
    nset = torch.empty(bm, dtype=torch.int32, device=A_blk.device)
    launch(ssl_fwd_kernel, (triton.cdiv(bm, cfg.BLOCK_M),), A_blk.device,
           A_blk, C, partner_blk, pos, pos, pos_in, V, nset, bm, N, D, A_blk.stride(0), C.stride(0), self_off, *params,
           K2=False, FILTER=filter_mode, EXCL_PARTNER=exclude_partner, INCL_SELF=include_self, STRIP=True,
           BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, SINGLE_D=cfg.single_d(D), PREC=prec,
           UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    srt = torch.sort(V, dim=1).values
    return V, srt, nset


def _lifting(N: int):
    top = 1 << (max(N, 1).bit_length() - 1)
    return top, top.bit_length()


def _fwd_impl(A: Tensor, C: Tensor, partner: Tensor, self_offset: int, inv_tau: float, scales: List[float],
              exclude_partner: bool, include_self: bool, filter_mode: int, lower: float, upper: float,
              bayes: List[float], precision: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(lse [K, M], pos [M], pos_in [M]) of the SSL contract."""
    M, D = A.shape
    N = C.shape[0]
    acc = _acc(A.dtype)
    K = len(scales)
    lse = torch.empty(K, M, dtype=acc, device=A.device)
    pos = torch.empty(M, dtype=acc, device=A.device)
    pos_in = torch.empty(M, dtype=acc, device=A.device)
    cfg = _config(M, N, D, A.dtype, "ssl").fwd
    prec, upcast = _precision(A.dtype, precision), _upcast(A.dtype)
    if M == 0:
        return lse, pos, pos_in
    if not bayes:
        for k, c0, c1, two in _groups(scales):
            launch(ssl_fwd_kernel, (triton.cdiv(M, cfg.BLOCK_M),), A.device,
                   A, C, partner, lse[k], pos, pos_in, lse, lse, M, N, D, A.stride(0), C.stride(0), self_offset,
                   *_params(inv_tau, c0, c1, lower, upper, acc),
                   K2=two, FILTER=filter_mode, EXCL_PARTNER=exclude_partner, INCL_SELF=include_self, STRIP=False,
                   BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, SINGLE_D=cfg.single_d(D), PREC=prec,
                   UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return lse, pos, pos_in
    if K != 1:
        raise ValueError("triton ssl: the Bayesian weights are defined for one scale only")
    params = _params(inv_tau, float(scales[0]), 0.0, lower, upper, acc)
    bparams = _bayes_params(float(scales[0]), bayes, acc)
    top, steps = _lifting(N)
    rows = _bayes_rows(M, N)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        so = self_offset + r0 if self_offset >= 0 else self_offset
        V, srt, nset = _strip(A[r0:r1], C, partner[r0:r1], so, params, pos[r0:r1], pos_in[r0:r1], filter_mode,
                              exclude_partner, include_self, cfg, prec, upcast)
        bm = r1 - r0
        _bayes_launch(bm, N, A.device, False, V, srt, nset, partner[r0:r1], lse[0, r0:r1], lse, lse, V, bm, N, top,
                      steps, *bparams, lse_out=lse[0, r0:r1], nset=nset)
    return lse, pos, pos_in


def _bwd_launch(kernel, grid, A, C, partner, params, lse, coef, cpos, gs, out, self_offset, two, filter_mode,
                exclude_partner, include_self, g_strip, bm, bn, cfg, prec, upcast):
    M, D = A.shape
    N = C.shape[0]
    launch(kernel, grid, A.device,
           A, C, partner, lse, coef, cpos, gs, out, M, N, D, A.stride(0), C.stride(0), self_offset, *params,
           K2=two, FILTER=filter_mode, EXCL_PARTNER=exclude_partner, INCL_SELF=include_self, G_STRIP=g_strip,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.BLOCK_D, SINGLE_D=cfg.single_d(D), PREC=prec, UPCAST=upcast,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _bwd_impl(A: Tensor, C: Tensor, partner: Tensor, self_offset: int, inv_tau: float, scales: List[float],
              exclude_partner: bool, include_self: bool, filter_mode: int, lower: float, upper: float,
              bayes: List[float], precision: str, lse: Tensor, coef: Tensor, cpos: Tensor) -> Tuple[Tensor, Tensor]:
    """(dA [M, D], dC [N, D]) in the input dtype: the SSL contract backward."""
    M, D = A.shape
    N = C.shape[0]
    acc = _acc(A.dtype)
    cfg = bwd_config(_config(M, N, D, A.dtype, "ssl").bwd, bool(bayes))
    prec, upcast = _precision(A.dtype, precision), _upcast(A.dtype)
    da_grid = (triton.cdiv(M, cfg.BLOCK_M),)
    dc_grid = (triton.cdiv(N, cfg.BLOCK_M),)
    # dA: a program owns BLOCK_M anchor rows and sweeps column tiles of BLOCK_N;
    # dC: a program owns BLOCK_M columns (kernel's BLOCK_N) and sweeps row tiles of BLOCK_N (kernel's BLOCK_M)
    if M == 0 or N == 0:
        return torch.zeros_like(A), torch.zeros_like(C)
    if not bayes:
        dA = dC = None
        zero = torch.zeros_like(cpos)
        for k, c0, c1, two in _groups(scales):
            params = _params(inv_tau, c0, c1, lower, upper, acc)
            cp = cpos if k == 0 else zero  # the partner term once
            ga = torch.zeros(M, D, dtype=acc, device=A.device)  # zero-initialised: chunked-D accumulation
            gc = torch.zeros(N, D, dtype=acc, device=A.device)
            common = (partner, params, lse[k], coef[k], cp, lse)
            _bwd_launch(ssl_bwd_da_kernel, da_grid, A, C, *common, ga, self_offset, two, filter_mode,
                        exclude_partner, include_self, False, cfg.BLOCK_M, cfg.BLOCK_N, cfg, prec, upcast)
            _bwd_launch(ssl_bwd_dc_kernel, dc_grid, A, C, *common, gc, self_offset, two, filter_mode,
                        exclude_partner, include_self, False, cfg.BLOCK_N, cfg.BLOCK_M, cfg, prec, upcast)
            dA = ga if dA is None else dA.add_(ga)
            dC = gc if dC is None else dC.add_(gc)
        return dA.to(A.dtype), dC.to(C.dtype)
    fcfg = _config(M, N, D, A.dtype, "ssl").fwd
    params = _params(inv_tau, float(scales[0]), 0.0, lower, upper, acc)
    bparams = _bayes_params(float(scales[0]), bayes, acc)
    top, steps = _lifting(N)
    rows = _bayes_rows(M, N)
    dA = torch.zeros(M, D, dtype=acc, device=A.device)  # zero-initialised: chunked-D accumulation
    dC = torch.zeros(N, D, dtype=acc, device=A.device)
    gc = torch.empty(N, D, dtype=acc, device=A.device)
    scratch = torch.empty(2, rows, dtype=acc, device=A.device)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        bm = r1 - r0
        A_blk, p_blk = A[r0:r1], partner[r0:r1]
        so = self_offset + r0 if self_offset >= 0 else self_offset
        V, srt, nset = _strip(A_blk, C, p_blk, so, params, scratch[0, :bm], scratch[1, :bm], filter_mode,
                              exclude_partner, include_self, fcfg, prec, upcast)
        G = torch.empty_like(V)
        _bayes_launch(bm, N, A.device, True, V, srt, nset, p_blk, lse[0, r0:r1], coef[0, r0:r1], cpos[r0:r1], G, bm,
                      N, top, steps, *bparams, lse_out=lse[0, r0:r1], nset=nset)
        del V, srt
        _bwd_launch(ssl_bwd_da_kernel, (triton.cdiv(bm, cfg.BLOCK_M),), A_blk, C, p_blk, params, lse, coef, cpos, G,
                    dA[r0:r1], so, False, filter_mode, exclude_partner, include_self, True, cfg.BLOCK_M, cfg.BLOCK_N,
                    cfg, prec, upcast)
        gc.zero_()  # the chunked-D kernels accumulate into it
        _bwd_launch(ssl_bwd_dc_kernel, dc_grid, A_blk, C, p_blk, params, lse, coef, cpos, G, gc, so, False,
                    filter_mode, exclude_partner, include_self, True, cfg.BLOCK_N, cfg.BLOCK_M, cfg, prec, upcast)
        dC.add_(gc)
    return dA.to(A.dtype), dC.to(C.dtype)


def _bwd_sym_impl(X: Tensor, partner: Tensor, inv_tau: float, scales: List[float], exclude_partner: bool,
                  include_self: bool, filter_mode: int, lower: float, upper: float, precision: str, lse: Tensor,
                  coef: Tensor, cpos: Tensor) -> Tensor:
    """dX [N, D] in the input dtype: the SSL contract backward of A = C = X, self_offset = 0, unit weights, i.e.
    dA + dC, by one row-parallel kernel per two scales (``ssl_bwd_sym_kernel``)."""
    N, D = X.shape
    if N == 0:
        return torch.zeros_like(X)
    acc = _acc(X.dtype)
    cfg = sym_config(_config(N, N, D, X.dtype, "ssl"))
    prec, upcast = _precision(X.dtype, precision), _upcast(X.dtype)
    dX = None
    zero = torch.zeros_like(cpos)
    for k, c0, c1, two in _groups(scales):
        grid, slabs, n_per = sym_grid(N, D, cfg, acc, X.device)
        launch(ssl_bwd_sym_kernel, grid, X.device,
               X, partner, lse[k], coef[k], cpos if k == 0 else zero, slabs, N, D, X.stride(0),
               *_params(inv_tau, c0, c1, lower, upper, acc), n_per,
               K2=two, FILTER=filter_mode, EXCL_PARTNER=exclude_partner, INCL_SELF=include_self,
               BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, SINGLE_D=cfg.single_d(D), PREC=prec,
               UPCAST=upcast, SPLIT=grid[1] > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out = sum_slabs(slabs)
        dX = out if dX is None else dX.add_(out)
    return dX.to(X.dtype)


def _bwd_sym_fake(X, partner, inv_tau, scales, exclude_partner, include_self, filter_mode, lower, upper, precision,
                  lse, coef, cpos):
    return torch.empty_like(X)


def _fwd_fake(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter_mode, lower, upper,
              bayes, precision):
    M = A.shape[0]
    acc = _acc(A.dtype)
    return A.new_empty(len(scales), M, dtype=acc), A.new_empty(M, dtype=acc), A.new_empty(M, dtype=acc)


def _bwd_fake(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter_mode, lower, upper,
              bayes, precision, lse, coef, cpos):
    return torch.empty_like(A), torch.empty_like(C)


if interpreted():
    triton_ssl_fwd = torch.library.custom_op("ltcl_fused::triton_ssl_fwd", _fwd_impl, mutates_args=())
    triton_ssl_fwd.register_fake(_fwd_fake)
    triton_ssl_bwd = torch.library.custom_op("ltcl_fused::triton_ssl_bwd", _bwd_impl, mutates_args=())
    triton_ssl_bwd.register_fake(_bwd_fake)
    triton_ssl_bwd_sym = torch.library.custom_op("ltcl_fused::triton_ssl_bwd_sym", _bwd_sym_impl, mutates_args=())
    triton_ssl_bwd_sym.register_fake(_bwd_sym_fake)
else:
    triton_ssl_fwd = torch.library.triton_op("ltcl_fused::triton_ssl_fwd", _fwd_impl, mutates_args=())
    triton_ssl_bwd = torch.library.triton_op("ltcl_fused::triton_ssl_bwd", _bwd_impl, mutates_args=())
    triton_ssl_bwd_sym = torch.library.triton_op("ltcl_fused::triton_ssl_bwd_sym", _bwd_sym_impl, mutates_args=())
