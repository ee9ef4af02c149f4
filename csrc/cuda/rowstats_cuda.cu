// CUDA kernels of the row-statistics engine (contract: ltcl_fused/engine/contract.py). They mirror
// the CPU algorithm (csrc/cpu/rowstats_cpu.cpp) and share its per-element math (csrc/common).
//
// Tiles: a block of 256 threads (8 warps) owns BM = 32 anchor rows (forward, dA) or BN = 32 columns
// (dC). A 32 x 32 tile of S is computed from shared-memory tiles of A and C (BK = 32 features at a
// time); thread (warp w, lane l) holds S[w + 8q][l], q = 0..3, so every row of the tile lives in one
// warp and row reductions are warp shuffles in a fixed order (deterministic).
// Forward: pass 1 streams (max, dominant column, the other columns' max and scaled sum, positives' sum)
// over column tiles (cm::top_rest_step: lrest exact at any lead; a NaN / +inf logit poisons the row); pass 2
// (focal only) recomputes the tiles for the focal sums. Backward: recompute, form G in shared memory,
// dA row-parallel (one block owns its rows: no atomics), dC column-parallel (one block owns its
// columns). Needs only the CUDA toolkit: no torch headers.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/ltcl_math.h"
#include "rowstats_cuda.h"
#include "tile_common.cuh"

namespace ltcl {
namespace cuda {
namespace {

namespace cm = ltcl::common;

using tile::kRowsPerThread;
using tile::kThreads;
using tile::kTile;
using tile::Smem;
using tile::tile_dots;
using tile::warp_max;
using tile::warp_sum;

template <typename T>
struct Args {
  const T* A;
  const T* C;
  const int64_t* a_lab;
  const int64_t* c_lab;
  const T* bs;
  const T* bo;
  int64_t M, N, D, self_offset;
  T inv_tau, gamma;
  bool focal;
};


__device__ __forceinline__ int64_t warp_min_i64(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ bool col_valid(const Args<T>& P, int64_t i, int64_t j) {
  return i < P.M && j < P.N && !(P.self_offset >= 0 && j == i + P.self_offset);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(Args<T> P, T* lse_o, T* pos_o, T* fpos_o, T* fneg_o,
                                                           T* upos_o, T* uneg_o, int64_t* top_o, T* lrest_o) {
  __shared__ Smem<T> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const T ninf = cm::neg_inf<T>();
  T m[kRowsPerThread], m2[kRowsPerThread], s2[kRowsPerThread], psum[kRowsPerThread];
  int64_t top[kRowsPerThread], lab[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = r0 + warp + 8 * q;
    m[q] = ninf;
    m2[q] = ninf;
    s2[q] = T(0);
    psum[q] = T(0);
    top[q] = -1;
    lab[q] = i < P.M ? P.a_lab[i] : 0;
  }
  // pass 1: streaming (m, top, m2, s2) and the positives' sum
  for (int64_t c0 = 0; c0 < P.N; c0 += kTile) {
    T acc[kRowsPerThread];
    tile_dots(P, r0, c0, sm, acc);
    const int64_t j = c0 + lane;
    const int64_t cl = j < P.N ? P.c_lab[j] : 0;
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = r0 + warp + 8 * q;
      const bool valid = col_valid(P, i, j);
      const bool is_pos = valid && cl == lab[q];
      const T s = acc[q] * P.inv_tau;
      const T x = valid ? s + cm::column_bias(P.bs, P.bo, j, is_pos) : ninf;
      psum[q] += warp_sum(is_pos ? s : T(0));
      if (!__any_sync(0xffffffffu, valid)) continue;  // uniform across the warp
      const T tm = warp_max(x);  // NaN if a logit is NaN
      const int64_t tj = warp_min_i64((valid && x == tm) ? j : INT64_MAX);
      const bool other = valid && j != tj;  // a NaN logit is never tj: it lands in ts2
      const T tm2 = warp_max(other ? x : ninf);
      const T ts2 = warp_sum(other ? cm::f_exp(x - (tm2 == ninf ? T(0) : tm2)) : T(0));
      cm::top_rest_step(&m[q], &top[q], &m2[q], &s2[q], tm, tj == INT64_MAX ? int64_t(-1) : tj, tm2, ts2);
    }
  }
  T lse[kRowsPerThread], lrest[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = r0 + warp + 8 * q;
    const bool has_self = P.self_offset >= 0 && i + P.self_offset < P.N;
    if (!cm::top_rest_finish(m[q], m2[q], s2[q], P.N - (has_self ? 1 : 0) > 0, &lse[q], &lrest[q])) top[q] = -1;
  }
  T fp[kRowsPerThread], fn[kRowsPerThread], up[kRowsPerThread], un[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) fp[q] = fn[q] = up[q] = un[q] = T(0);
  // pass 2 (focal): recompute the tiles, per-element focal terms
  if (P.focal) {
    for (int64_t c0 = 0; c0 < P.N; c0 += kTile) {
      T acc[kRowsPerThread];
      tile_dots(P, r0, c0, sm, acc);
      const int64_t j = c0 + lane;
      const int64_t cl = j < P.N ? P.c_lab[j] : 0;
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) {
        const int64_t i = r0 + warp + 8 * q;
        const bool valid = col_valid(P, i, j) && top[q] >= 0;
        T f1 = T(0), u1 = T(0), f2 = T(0), u2 = T(0);
        if (valid) {
          const bool is_pos = cl == lab[q];
          const bool is_top = j == top[q];
          const T x = acc[q] * P.inv_tau + cm::column_bias(P.bs, P.bo, j, is_pos);
          T lp, l1;
          cm::elem_logp(x, lse[q], is_top, lrest[q], &lp, &l1);
          if (is_pos) {
            cm::focal_pos(lp, l1, is_top, lrest[q], P.gamma, &f1, &u1);
          } else {
            cm::focal_neg(lp, l1, &f2, &u2);
            if (is_top) u2 = T(0);  // uneg leaves the dominant column out
          }
        }
        fp[q] += warp_sum(f1);
        up[q] += warp_sum(u1);
        fn[q] += warp_sum(f2);
        un[q] += warp_sum(u2);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = r0 + warp + 8 * q;
      if (i >= P.M) continue;
      const bool poisoned = lse[q] != lse[q];  // NaN statistics throughout
      lse_o[i] = lse[q];
      lrest_o[i] = lrest[q];
      top_o[i] = top[q];
      pos_o[i] = psum[q];
      fpos_o[i] = poisoned ? lse[q] : fp[q];
      fneg_o[i] = poisoned ? lse[q] : fn[q];
      upos_o[i] = poisoned ? lse[q] : up[q];
      uneg_o[i] = poisoned ? lse[q] : un[q];
    }
  }
}

template <typename T>
struct BwdRows {
  const T *lse, *lrest, *cpos, *cposf, *cneg, *r, *rt;
  const int64_t* top;
};

// G_ij of the contract for one element (0 when invalid), from the raw dot product.
template <typename T>
__device__ __forceinline__ T grad_at(const Args<T>& P, const BwdRows<T>& R, int64_t i, int64_t j, T dot) {
  if (!col_valid(P, i, j)) return T(0);
  const T lse = R.lse[i];
  const int64_t top = R.top[i];
  // empty row: zero gradient (a NaN lse, a poisoned row, gives NaN); top < 0 with a finite lse means the
  // dominant column lies outside these columns (the distributed ring's blocks): every column takes the
  // generic formula
  if (lse == cm::neg_inf<T>()) return T(0);
  const bool is_pos = P.c_lab[j] == P.a_lab[i];
  const bool is_top = j == top;
  const T x = dot * P.inv_tau + cm::column_bias(P.bs, P.bo, j, is_pos);
  const T cposf = P.focal ? R.cposf[i] : T(0), cneg = P.focal ? R.cneg[i] : T(0);
  const T r = R.r[i], lrest = R.lrest[i];
  T lp, l1;
  cm::elem_logp(x, lse, is_top, lrest, &lp, &l1);
  if (is_top) return cm::grad_top(lp, l1, lrest, is_pos, P.focal, P.gamma, R.cpos[i], cposf, cneg, r);
  return cm::grad_element(lp, l1, lrest, is_pos, P.focal, P.gamma, R.cpos[i], cposf, cneg, r,
                          P.focal ? R.rt[i] : T(0));
}

// dA rows (general path, SYM = false; tile::backward_sweep) or, on the symmetric path (C is A, c_lab equal to
// a_lab, self_offset 0), dX = (G + G^T) X / tau with G_ji from row j's statistics (SYM = true).
template <typename T, bool SYM>
__global__ void __launch_bounds__(kThreads, 1) backward_rows_kernel(Args<T> P, BwdRows<T> R, T* out) {
  __shared__ Smem<T> sm;
  const auto grad = [&](int64_t i, int64_t j, T dot) { return grad_at(P, R, i, j, dot); };
  tile::backward_sweep<SYM ? tile::Sweep::kRowsSym : tile::Sweep::kRows, T>(P, grad, sm, out);
}

// dC columns (general path; tile::backward_sweep).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_cols_kernel(Args<T> P, BwdRows<T> R, T* out) {
  __shared__ Smem<T> sm;
  const auto grad = [&](int64_t i, int64_t j, T dot) { return grad_at(P, R, i, j, dot); };
  tile::backward_sweep<tile::Sweep::kCols, T>(P, grad, sm, out);
}

template <typename T>
Args<T> make_args(const T* A, const T* C, const int64_t* a_lab, const int64_t* c_lab, const T* bs, const T* bo,
                  int64_t M, int64_t N, int64_t D, int64_t self_offset, T inv_tau, T gamma, bool focal) {
  return Args<T>{A, C, a_lab, c_lab, bs, bo, M, N, D, self_offset, inv_tau, gamma, focal};
}

}  // namespace

template <typename T>
cudaError_t rowstats_forward(const T* A, const T* C, const int64_t* a_lab, const int64_t* c_lab,
                             const T* bias_same, const T* bias_other, int64_t M, int64_t N, int64_t D,
                             int64_t self_offset, T inv_tau, T gamma, bool focal, T* lse, T* pos, T* fpos,
                             T* fneg, T* upos, T* uneg, int64_t* top, T* lrest, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  const auto P = make_args(A, C, a_lab, c_lab, bias_same, bias_other, M, N, D, self_offset, inv_tau, gamma, focal);
  const unsigned grid = static_cast<unsigned>((M + kTile - 1) / kTile);
  forward_kernel<T><<<grid, kThreads, 0, stream>>>(P, lse, pos, fpos, fneg, upos, uneg, top, lrest);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rowstats_backward(const T* A, const T* C, const int64_t* a_lab, const int64_t* c_lab,
                              const T* bias_same, const T* bias_other, int64_t M, int64_t N, int64_t D,
                              int64_t self_offset, T inv_tau, T gamma, bool focal, const T* lse,
                              const int64_t* top, const T* lrest, const T* cpos, const T* cposf, const T* cneg,
                              const T* r, const T* rt, T* dA, T* dC, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(dA, 0, sizeof(T) * static_cast<size_t>(M * D), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(dC, 0, sizeof(T) * static_cast<size_t>(N * D), stream);
  if (err != cudaSuccess || M <= 0 || N <= 0 || D <= 0) return err;
  const auto P = make_args(A, C, a_lab, c_lab, bias_same, bias_other, M, N, D, self_offset, inv_tau, gamma, focal);
  const BwdRows<T> R{lse, lrest, cpos, cposf, cneg, r, rt, top};
  backward_rows_kernel<T, false><<<static_cast<unsigned>((M + kTile - 1) / kTile), kThreads, 0, stream>>>(P, R, dA);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  backward_cols_kernel<T><<<static_cast<unsigned>((N + kTile - 1) / kTile), kThreads, 0, stream>>>(P, R, dC);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rowstats_backward_symmetric(const T* X, const int64_t* lab, const T* bias_same, const T* bias_other,
                                        int64_t N, int64_t D, T inv_tau, T gamma, bool focal, const T* lse,
                                        const int64_t* top, const T* lrest, const T* cpos, const T* cposf,
                                        const T* cneg, const T* r, const T* rt, T* dX, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(dX, 0, sizeof(T) * static_cast<size_t>(N * D), stream);
  if (err != cudaSuccess || N <= 0 || D <= 0) return err;
  const auto P = make_args(X, X, lab, lab, bias_same, bias_other, N, N, D, int64_t(0), inv_tau, gamma, focal);
  const BwdRows<T> R{lse, lrest, cpos, cposf, cneg, r, rt, top};
  backward_rows_kernel<T, true><<<static_cast<unsigned>((N + kTile - 1) / kTile), kThreads, 0, stream>>>(P, R, dX);
  return cudaGetLastError();
}

#define LTCL_INSTANTIATE(T)                                                                                      \
  template cudaError_t rowstats_forward<T>(const T*, const T*, const int64_t*, const int64_t*, const T*, const T*, \
                                           int64_t, int64_t, int64_t, int64_t, T, T, bool, T*, T*, T*, T*, T*,   \
                                           T*, int64_t*, T*, cudaStream_t);                                      \
  template cudaError_t rowstats_backward<T>(const T*, const T*, const int64_t*, const int64_t*, const T*,         \
                                            const T*, int64_t, int64_t, int64_t, int64_t, T, T, bool, const T*,  \
                                            const int64_t*, const T*, const T*, const T*, const T*, const T*,    \
                                            const T*, T*, T*, cudaStream_t);                                     \
  template cudaError_t rowstats_backward_symmetric<T>(const T*, const int64_t*, const T*, const T*, int64_t,      \
                                                      int64_t, T, T, bool, const T*, const int64_t*, const T*,    \
                                                      const T*, const T*, const T*, const T*, const T*, T*,       \
                                                      cudaStream_t);

LTCL_INSTANTIATE(float)
LTCL_INSTANTIATE(double)

}  // namespace cuda
}  // namespace ltcl
