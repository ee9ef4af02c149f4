"""Streaming top-k hard-pair mining (ResCom, SPEC.md section 4) as a Triton kernel.

One program owns BLOCK_M anchor rows and sweeps the keys in tiles of BLOCK_N. Per tile it forms the
similarity block with ``tl.dot`` (over D in BLOCK_D chunks), turns every candidate into one int64 sort key
that packs an order-preserving image of its value (high bits) with its key index (low bits), and merges
the tile into a per-row state of the best KP packed keys (KP = next power of two >= k):

    top  = topk(tile, KP)                    # the tile's best KP, descending
    state = bitonic_merge(max(state, top))   # state kept ascending: max(ascending, descending) is a
                                             # bitonic sequence holding the best KP of both (Batcher)

The network is Triton's own (``tl.topk`` / ``tl.bitonic_merge``, NATIVE_SORT: the GPU's path, Triton >= 3.4)
or the same network written with masked sums (``_net_topk`` / ``_net_merge_asc``: the interpreter's path).
On Triton 3.3 a GPU launch raises one line (no tl.topk; the compiler aborts on the network's reshapes).

A tile in which no candidate beats any row's current k-th best is skipped. Memory: the state lives in
registers, the output is [M, k]; the M × Q similarity matrix never exists.

Positives (``SAME=True``) are the same-class keys with the SMALLEST similarity (the value packed is -s),
negatives the other-class keys with the LARGEST. Value packing:
- fp16/bf16/fp32 inputs: fp32 similarity, the full 32-bit order key + a 32-bit index (exact order);
- fp64 inputs: fp64 similarity; the low IDX_BITS = bit_length(Q-1) bits of its 64-bit order key are
  replaced by the index, so values closer than ~2^-(52-IDX_BITS) relative rank as ties (broken by index).
Missing candidates (fewer than k) come out as index -1.

Host entry point: ``topk_mining(A, a_lab, K, k_lab, k_pos, k_neg)`` (the mining contract of
``ltcl_fused/backends/mining_torch.py``). GPU configurations are in ``SHIPPED``; ``compile_config`` builds
one for a given target without a GPU (tests/test_mining_triton_codegen.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import support

INT64_MIN = tl.constexpr(-(2 ** 63))
INT64_MAX = tl.constexpr(2 ** 63 - 1)
#: largest k one launch supports on a GPU (state of KP int64 per row in registers)
MAX_K = 1024


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0/1 along the j-th innermost axis of a [2] * n_dims hypercube."""
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _cas(h, desc, j: tl.constexpr, n_dims: tl.constexpr):
    """Compare-and-swap along the j-th innermost hypercube axis: ascending, descending where ``desc`` != 0.

    The halves are read with masked integer sums over the size-2 axis (exact for int64 keys): the Triton
    interpreter runs those as numpy reductions, whereas tl.sort's xor-reductions run per element there.
    """
    right = _indicator(n_dims, j)
    m = right.to(h.dtype)
    lft = tl.sum(h * (1 - m), axis=n_dims - 1 - j, keep_dims=True)
    rgt = tl.sum(h * m, axis=n_dims - 1 - j, keep_dims=True)
    return tl.where((right == 1) != (desc != 0), tl.maximum(lft, rgt), tl.minimum(lft, rgt))


@triton.jit
def _stages(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """``stage`` rounds of compare-and-swap; order 0 ascending, 1 descending, 2 alternating (bit ``stage``)."""
    if order == 2:
        desc = _indicator(n_dims, stage)
    else:
        desc = tl.full([1] * n_dims, order, tl.int32)
    for i in tl.static_range(stage):
        h = _cas(h, desc, stage - 1 - i, n_dims)
    return h


@triton.jit
def _net_topk(x, LOG_M: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """Per row of ``x [2^LOG_M, 2^LOG_N]`` the 2^LOG_K largest, descending (bitonic top-k, as tl.topk)."""
    ND: tl.constexpr = LOG_M + LOG_N
    h = tl.reshape(x, [2] * ND)
    for i in tl.static_range(1, LOG_K + 1):
        h = _stages(h, i, 2 if i < LOG_N else 1, ND)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=ND - (i - LOG_K) - LOG_K)
        h = _stages(h, LOG_K, 2 if i < LOG_N else 1, ND - (i - LOG_K))
    return tl.reshape(h, [2 ** LOG_M, 2 ** LOG_K])


@triton.jit
def _net_merge_asc(x, LOG_M: tl.constexpr, LOG_K: tl.constexpr):
    """Sort each row of ``x [2^LOG_M, 2^LOG_K]``, rows being bitonic sequences, ascending."""
    ND: tl.constexpr = LOG_M + LOG_K
    h = tl.reshape(x, [2] * ND)
    h = _stages(h, LOG_K, 0, ND)
    return tl.reshape(h, [2 ** LOG_M, 2 ** LOG_K])


if hasattr(tl, "topk") and hasattr(tl, "bitonic_merge"):
    @triton.jit
    def _native_merge(state, packed, KP: tl.constexpr):
        """Merge a tile's packed keys into the ascending state with Triton's sorting network (Triton >= 3.4)."""
        top = tl.topk(packed, KP)                   # descending
        return tl.bitonic_merge(tl.maximum(state, top))  # ascending
else:
    @triton.jit
    def _native_merge(state, packed, KP: tl.constexpr):
        """Triton < 3.4 has no tl.topk (its compiler resolves every name the kernel mentions, taken branch or
        not): never compiled, the host refuses NATIVE_SORT there (support.FEATURES["native_sort"])."""
        tl.static_assert(False, "the native sort needs Triton >= 3.4")
        return state


@triton.jit
def _pack(val, cols, IS_FP64: tl.constexpr, IDX_BITS: tl.constexpr):
    """Order-preserving int64 sort key of (val, col): larger val -> larger key; ties -> larger col."""
    if IS_FP64:
        b = val.to(tl.int64, bitcast=True)
        key = b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)
        key = (key >> IDX_BITS) << IDX_BITS
        return key | cols.to(tl.int64)
    else:
        b = val.to(tl.float32).to(tl.int32, bitcast=True)
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
        return (key.to(tl.int64) << 32) | cols.to(tl.int64)


@triton.jit
def topk_mining_kernel(A, K, ALAB, KLAB, OUT, M, Q, D, stride_am, stride_kq, stride_om, k_out,
                       SAME: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       KP: tl.constexpr, IS_FP64: tl.constexpr, IDX_BITS: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr, NATIVE_SORT: tl.constexpr, LOG_M: tl.constexpr, LOG_N: tl.constexpr,
                       LOG_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    alab = tl.load(ALAB + rows, mask=rmask, other=0)
    slot = tl.arange(0, KP)
    # ascending state: the best k are the last k slots
    state = tl.full([BLOCK_M, KP], INT64_MIN, tl.int64)
    for n0 in range(0, Q, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < Q
        cols64 = cols.to(tl.int64)
        klab = tl.load(KLAB + cols, mask=cmask, other=0)
        if IS_FP64:
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            a = tl.load(A + rows64[:, None] * stride_am + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0)
            kt = tl.load(K + cols64[:, None] * stride_kq + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0)
            if UPCAST:  # the interpreter's bf16 tl.dot is inexact (numpy has no bf16)
                a = a.to(tl.float32)
                kt = kt.to(tl.float32)
            # out_dtype = the accumulator's (fp64 for fp64 inputs: Triton <= 3.8 rejects the fp32 default there)
            s = tl.dot(a, tl.trans(kt), s, input_precision=PRECISION, out_dtype=s.dtype)
        same = alab[:, None] == klab[None, :]
        if SAME:
            cand = same
            val = -s
        else:
            cand = same == 0
            val = s
        cand = cand & rmask[:, None] & cmask[None, :]
        packed = tl.where(cand, _pack(val, cols, IS_FP64, IDX_BITS), INT64_MIN)
        # the k-th best so far (slot KP - k_out of the ascending state); skip tiles that cannot enter
        kth = tl.min(tl.where(slot[None, :] >= KP - k_out, state, INT64_MAX), axis=1)
        best = tl.max(packed, axis=1)
        if tl.max((best > kth).to(tl.int32), axis=0) > 0:
            if NATIVE_SORT:  # Triton's sorting network (GPU, Triton >= 3.4)
                state = _native_merge(state, packed, KP)
            else:            # the same network through masked sums (fast under the interpreter)
                top = _net_topk(packed, LOG_M, LOG_N, LOG_K)
                state = _net_merge_asc(tl.maximum(state, top), LOG_M, LOG_K)
    # slot KP-1-j holds the (j+1)-th best: write it to column j
    col = KP - 1 - slot
    if IDX_BITS >= 32:
        idx = state & 0xFFFFFFFF
    else:
        idx = state & ((1 << IDX_BITS) - 1)
    idx = tl.where(state == INT64_MIN, -1, idx)
    omask = rmask[:, None] & (col[None, :] < k_out)
    tl.store(OUT + rows64[:, None] * stride_om + col[None, :], idx, mask=omask)


class MiningConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


#: GPU configurations by KP (state width), from an sm_80/sm_90 register sweep. BLOCK_M = 16 is the smallest
#: tl.dot tile; BLOCK_N = max(KP, 32) (the bitonic merge needs KP <= BLOCK_N). Up to KP = 256 these compile
#: without register spills. KP = 512 / 1024 (k = 257 .. 1024) cannot fit: the [16, KP] int64 state plus the
#: [16, KP] packed tile alone fill the register file of an SM, so those two configurations spill to local
#: memory (L1-cached) and run slower; they stay correct. BLOCK_D is capped by next_pow2(D) at launch.
SHIPPED = {
    1: MiningConfig(16, 32, 32, 4, 1),
    2: MiningConfig(16, 32, 32, 4, 1),
    4: MiningConfig(16, 32, 32, 4, 1),
    8: MiningConfig(16, 32, 32, 4, 1),
    16: MiningConfig(16, 32, 32, 4, 1),
    32: MiningConfig(16, 32, 32, 4, 1),
    64: MiningConfig(16, 64, 32, 8, 1),
    128: MiningConfig(16, 128, 32, 8, 1),
    256: MiningConfig(16, 256, 32, 8, 1),
    512: MiningConfig(16, 512, 32, 16, 1),
    1024: MiningConfig(16, 1024, 32, 32, 1),
}
#: the configurations that must compile without spills (tests/test_mining_triton_codegen.py)
SPILL_FREE_KP = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _log2(n: int) -> int:
    return int(n).bit_length() - 1


#: test hook: True = tl.topk/tl.bitonic_merge, False = the masked-sum network; None = native on a GPU (which
#: needs Triton >= 3.4), the network under the interpreter
NATIVE_SORT = None


def interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(topk_mining_kernel, InterpretedFunction)


#: test hook: a MiningConfig that replaces the heuristic (BLOCK_N must be >= KP)
FORCE_CONFIG = None


def pick_config(k: int, D: int, interpret: bool) -> MiningConfig:
    KP = _next_pow2(k)
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    if interpret:  # big tiles: fewer Python-level steps
        return MiningConfig(64, max(KP, 64), max(16, min(128, _next_pow2(D))), 1, 1)
    cfg = SHIPPED[KP]
    return cfg._replace(BLOCK_D=max(16, min(cfg.BLOCK_D, _next_pow2(D))))


def _native_sort(interp: bool) -> bool:
    """NATIVE_SORT of a launch: the native sort on a GPU, the masked-sum network under the interpreter (or as
    the test hook says). A GPU launch needs Triton >= 3.4: Triton 3.3 has no tl.topk and its compiler aborts on
    the network's rank-9+ reshapes, so there it raises one line (``support.FEATURES["native_sort"]``)."""
    native = (not interp) if NATIVE_SORT is None else bool(NATIVE_SORT)
    reason = support.feature_reason("native_sort") if native else None
    if reason is not None:
        raise RuntimeError(f"triton mining: {reason}")
    return native


def _launch(A, a_lab, K, k_lab, k, same):
    M, D = A.shape
    Q = K.shape[0]
    out = torch.full((M, k), -1, dtype=torch.int64, device=A.device)
    if k == 0 or M == 0 or Q == 0:
        return out
    interp = interpreted()
    if k > MAX_K and not interp:
        raise ValueError(f"triton mining: {'k_pos' if same else 'k_neg'}={k} exceeds the largest k of one launch "
                         f"({MAX_K}); use backend='torch' or 'cpu' for larger k")
    cfg = pick_config(k, D, interp)
    is_fp64 = A.dtype == torch.float64
    idx_bits = max(1, (Q - 1).bit_length()) if is_fp64 else 32
    grid = (triton.cdiv(M, cfg.BLOCK_M),)
    with support.device_guard(A.device):
        topk_mining_kernel[grid](
            A, K, a_lab, k_lab, out, M, Q, D, A.stride(0), K.stride(0), out.stride(0), k,
            SAME=same, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, KP=_next_pow2(k),
            IS_FP64=is_fp64, IDX_BITS=idx_bits, UPCAST=(interp and A.dtype == torch.bfloat16),
            PRECISION=support.dot_precision(A.dtype, support.fp32_precision()), NATIVE_SORT=_native_sort(interp),
            LOG_M=_log2(cfg.BLOCK_M), LOG_N=_log2(cfg.BLOCK_N), LOG_K=_log2(_next_pow2(k)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@torch.no_grad()
def topk_mining(A, a_lab, K, k_lab, k_pos: int, k_neg: int):
    """Hard-pair mining on the Triton kernel: ``(pos_idx [M, k_pos], neg_idx [M, k_neg])`` int64, -1 = missing.

    Positives ascending, negatives descending in similarity (the contract of backends/mining_torch.py).
    """
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or K.dtype != A.dtype:
        raise TypeError(f"triton mining: anchors and keys must share a float dtype, got {A.dtype} and {K.dtype}")
    if K.shape[0] >= 2 ** 31:
        raise ValueError("triton mining: at most 2^31 - 1 keys")
    reason = support.dtype_reason(A.dtype)
    if reason is not None:
        raise RuntimeError(f"triton mining: {reason}")
    A = A.contiguous()
    K = K.contiguous()
    a_lab = a_lab.to(torch.int64).contiguous()
    k_lab = k_lab.to(torch.int64).contiguous()
    return _launch(A, a_lab, K, k_lab, int(k_pos), True), _launch(A, a_lab, K, k_lab, int(k_neg), False)


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation (no GPU needed): used by the code-generation tests
# ---------------------------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def compile_config(KP: int, dtype: torch.dtype, same: bool, capability: int, D: int = 128, native_sort=None,
                   precision: str = "ieee"):
    """``triton.compile`` the kernel for KP and dtype with the shipped configuration, for ``cuda:capability``
    (``native_sort=None``: the GPU's native sort, which raises the one-line gate on Triton < 3.4)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if native_sort is None:
        native_sort = _native_sort(False)
    reason = support.dtype_reason(dtype)
    if reason is not None:
        raise RuntimeError(f"triton mining: {reason}")
    cfg = pick_config(KP, D, False)
    t = "*" + _TL_DTYPE[dtype]
    signature = {"A": t, "K": t, "ALAB": "*i64", "KLAB": "*i64", "OUT": "*i64", "M": "i32", "Q": "i32", "D": "i32",
                 "stride_am": "i32", "stride_kq": "i32", "stride_om": "i32", "k_out": "i32",
                 "SAME": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
                 "KP": "constexpr", "IS_FP64": "constexpr", "IDX_BITS": "constexpr", "UPCAST": "constexpr",
                 "PRECISION": "constexpr", "NATIVE_SORT": "constexpr", "LOG_M": "constexpr", "LOG_N": "constexpr",
                 "LOG_K": "constexpr"}
    is_fp64 = dtype == torch.float64
    constexprs = {"SAME": same, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_D": cfg.BLOCK_D, "KP": KP,
                  "IS_FP64": is_fp64, "IDX_BITS": 20 if is_fp64 else 32, "UPCAST": False, "PRECISION": precision,
                  "NATIVE_SORT": native_sort, "LOG_M": _log2(cfg.BLOCK_M), "LOG_N": _log2(cfg.BLOCK_N),
                  "LOG_K": _log2(KP)}
    src = ASTSource(fn=topk_mining_kernel, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}), cfg
