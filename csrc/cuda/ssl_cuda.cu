// CUDA kernels of the self-supervised row-statistics contract (ltcl_fused/engine/ssl_contract.py):
// DCL, HCL and MTTV. They mirror the tiled design of rowstats_cuda.cu and share the per-element math
// (element filter, LSE finish) with the CPU kernels through csrc/common/ssl_math.h.
//
// Tiles: a block of 256 threads (8 warps) owns BM = 32 anchor rows (forward, dA) or BN = 32 columns
// (dC). A 32 x 32 tile of raw dot products g = <A_i, C_j> is computed from shared-memory tiles of A and C
// (BK = 32 features at a time); thread (warp w, lane l) holds g[w + 8q][l], q = 0..3, so every row of a
// tile lives in one warp and row reductions are warp shuffles in a fixed order (deterministic).
// Forward: one pass over the column tiles with NK online LSEs per row (running max and sum of
// exp(c_k s - max)) over the row's set (self / partner / filter masks), the positive's s and whether it
// stayed in the set. NK (a template constant: 1, 2 or 8) is the smallest supported count >= K.
// Backward: recompute the tile, form G in shared memory, dA row-parallel (one block owns its rows),
// dC column-parallel (one block owns its columns): no atomics. The Bayesian weights are not here.
// Needs only the CUDA toolkit: no torch headers.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/ssl_math.h"
#include "ssl_cuda.h"
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
  const int64_t* partner;
  int64_t M, N, D, self_offset;
  T inv_tau, lower, upper;
  int filter, K;
  bool exclude_partner, include_self;
  T scales[kSSLMaxScales];
};


// Whether column j is in set(i), from the raw dot product g (i < M assumed; j may be >= N).
template <typename T>
__device__ __forceinline__ bool in_set(const Args<T>& P, int64_t i, int64_t j, int64_t p, T g) {
  if (j >= P.N) return false;
  if (!P.include_self && P.self_offset >= 0 && j == i + P.self_offset) return false;
  if (P.exclude_partner && j == p) return false;
  return cm::ssl_filter_keep(g, P.filter, P.lower, P.upper);
}

template <typename T, int NK>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(Args<T> P, T* lse_o, T* pos_o, T* pos_in_o) {
  __shared__ Smem<T> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const T ninf = cm::neg_inf<T>();
  T m[NK][kRowsPerThread], sum[NK][kRowsPerThread], pos[kRowsPerThread], pin[kRowsPerThread];
  T bad[kRowsPerThread];  // sum of g * 0: NaN iff a dot product of the row is NaN or +-inf (poisoned)
  int64_t part[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = r0 + warp + 8 * q;
    const int64_t p = i < P.M ? P.partner[i] : -1;
    part[q] = (p >= 0 && p < P.N) ? p : -1;
    pos[q] = T(0);
    pin[q] = T(0);
    bad[q] = T(0);
#pragma unroll
    for (int k = 0; k < NK; ++k) {
      m[k][q] = ninf;
      sum[k][q] = T(0);
    }
  }
  for (int64_t c0 = 0; c0 < P.N; c0 += kTile) {
    T acc[kRowsPerThread];
    tile_dots(P, r0, c0, sm, acc);
    const int64_t j = c0 + lane;
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = r0 + warp + 8 * q;
      const T g = acc[q];
      const T s = g * P.inv_tau;
      bad[q] += g * T(0);  // 0 outside the matrices (tile_dots pads with zeros)
      const bool in = i < P.M && in_set(P, i, j, part[q], g);
      const bool is_p = j == part[q];
      // the positive: s at the partner column (whatever the set), and whether it is in the set
      if (__any_sync(0xffffffffu, is_p)) {
        pos[q] += warp_sum(is_p ? s : T(0));
        pin[q] += warp_sum((is_p && in) ? T(1) : T(0));
      }
      if (!__any_sync(0xffffffffu, in)) continue;  // uniform across the warp
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        if (k >= P.K) break;
        const T x = in ? P.scales[k] * s : ninf;
        const T tm = warp_max(x);
        const T nm = tm > m[k][q] ? tm : m[k][q];  // finite: some x is finite
        const T tsum = warp_sum(in ? cm::f_exp(x - nm) : T(0));
        sum[k][q] = sum[k][q] * cm::f_exp(m[k][q] - nm) + tsum;  // exp(-inf) = 0 on the first hit
        m[k][q] = nm;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) bad[q] = warp_sum(bad[q]);
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = r0 + warp + 8 * q;
      if (i >= P.M) continue;
      pos_o[i] = pos[q];
      pos_in_o[i] = pin[q];
#pragma unroll
      for (int k = 0; k < NK; ++k)
        if (k < P.K) lse_o[k * P.M + i] = bad[q] != T(0) ? cm::quiet_nan<T>() : cm::lse_finish(m[k][q], sum[k][q]);
    }
  }
}

template <typename T>
struct BwdIn {
  const T *lse, *coef, *cpos;  // [K, M], [K, M], [M]
};

// G_ij of the contract for one element, from the raw dot product (0 outside the matrices).
template <typename T>
__device__ __forceinline__ T grad_at(const Args<T>& P, const BwdIn<T>& R, int64_t i, int64_t j, T g) {
  if (i >= P.M || j >= P.N) return T(0);
  const int64_t p = P.partner[i];
  T G = T(0);
  if (in_set(P, i, j, p, g)) {
    const T s = g * P.inv_tau;
#pragma unroll
    for (int k = 0; k < kSSLMaxScales; ++k) {  // unrolled: constant indices into the scales
      if (k >= P.K) break;
      const T L = R.lse[k * P.M + i], ck = R.coef[k * P.M + i];
      if (ck == T(0) || !(L > cm::neg_inf<T>()) || !(L < -cm::neg_inf<T>())) continue;  // a dead term: exactly 0
      const T c = P.scales[k];
      G += ck * c * cm::f_exp(c * s - L);
    }
  }
  if (j == p) G = R.cpos[i] + G;
  return G;
}

// dA rows r0..r0+31: this block owns them (no atomics).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_da_kernel(Args<T> P, BwdIn<T> R, T* dA) {
  __shared__ Smem<T> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t c0 = 0; c0 < P.N; c0 += kTile) {
    T acc[kRowsPerThread];
    tile_dots(P, r0, c0, sm, acc);
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) sm.g[warp + 8 * q][lane] = grad_at(P, R, r0 + warp + 8 * q, c0 + lane, acc[q]);
    __syncthreads();
    // thread t owns feature columns d = t, t + 256, ...: 32 row accumulators, one read of C per (cc, d)
    const int ncols = P.N - c0 < kTile ? static_cast<int>(P.N - c0) : kTile;
    for (int64_t d = threadIdx.x; d < P.D; d += kThreads) {
      T o[kTile];
#pragma unroll
      for (int rr = 0; rr < kTile; ++rr) o[rr] = T(0);
      for (int cc = 0; cc < ncols; ++cc) {
        const T cv = P.C[(c0 + cc) * P.D + d];
#pragma unroll
        for (int rr = 0; rr < kTile; ++rr) o[rr] += sm.g[rr][cc] * cv;
      }
#pragma unroll
      for (int rr = 0; rr < kTile; ++rr)
        if (r0 + rr < P.M) dA[(r0 + rr) * P.D + d] += P.inv_tau * o[rr];
    }
    __syncthreads();
  }
}

// dC columns c0..c0+31: this block owns them (no atomics).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_dc_kernel(Args<T> P, BwdIn<T> R, T* dC) {
  __shared__ Smem<T> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t r0 = 0; r0 < P.M; r0 += kTile) {
    T acc[kRowsPerThread];
    tile_dots(P, r0, c0, sm, acc);
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) sm.g[warp + 8 * q][lane] = grad_at(P, R, r0 + warp + 8 * q, c0 + lane, acc[q]);
    __syncthreads();
    // thread t owns feature columns d = t, t + 256, ...: 32 column accumulators, one read of A per (rr, d)
    const int nrows = P.M - r0 < kTile ? static_cast<int>(P.M - r0) : kTile;
    for (int64_t d = threadIdx.x; d < P.D; d += kThreads) {
      T o[kTile];
#pragma unroll
      for (int cc = 0; cc < kTile; ++cc) o[cc] = T(0);
      for (int rr = 0; rr < nrows; ++rr) {
        const T av = P.A[(r0 + rr) * P.D + d];
#pragma unroll
        for (int cc = 0; cc < kTile; ++cc) o[cc] += sm.g[rr][cc] * av;
      }
#pragma unroll
      for (int cc = 0; cc < kTile; ++cc)
        if (c0 + cc < P.N) dC[(c0 + cc) * P.D + d] += P.inv_tau * o[cc];
    }
    __syncthreads();
  }
}

template <typename T>
Args<T> make_args(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                  const SSLParams& p) {
  Args<T> P;
  P.A = A;
  P.C = C;
  P.partner = partner;
  P.M = M;
  P.N = N;
  P.D = D;
  P.self_offset = p.self_offset;
  P.inv_tau = static_cast<T>(p.inv_tau);
  P.lower = static_cast<T>(p.lower);
  P.upper = static_cast<T>(p.upper);
  P.filter = p.filter;
  P.K = p.num_scales;
  P.exclude_partner = p.exclude_partner;
  P.include_self = p.include_self;
  for (int k = 0; k < kSSLMaxScales; ++k) P.scales[k] = k < p.num_scales ? static_cast<T>(p.scales[k]) : T(0);
  return P;
}

}  // namespace

template <typename T>
cudaError_t ssl_forward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                        const SSLParams& p, T* lse, T* pos, T* pos_in, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (p.num_scales < 1 || p.num_scales > kSSLMaxScales) return cudaErrorInvalidValue;
  const auto P = make_args(A, C, partner, M, N, D, p);
  const unsigned grid = static_cast<unsigned>((M + kTile - 1) / kTile);
  if (p.num_scales == 1) {
    forward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(P, lse, pos, pos_in);
  } else if (p.num_scales == 2) {
    forward_kernel<T, 2><<<grid, kThreads, 0, stream>>>(P, lse, pos, pos_in);
  } else {
    forward_kernel<T, kSSLMaxScales><<<grid, kThreads, 0, stream>>>(P, lse, pos, pos_in);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t ssl_backward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                         const SSLParams& p, const T* lse, const T* coef, const T* cpos, T* dA, T* dC,
                         cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(dA, 0, sizeof(T) * static_cast<size_t>(M * D), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(dC, 0, sizeof(T) * static_cast<size_t>(N * D), stream);
  if (err != cudaSuccess || M <= 0 || N <= 0 || D <= 0) return err;
  if (p.num_scales < 1 || p.num_scales > kSSLMaxScales) return cudaErrorInvalidValue;
  const auto P = make_args(A, C, partner, M, N, D, p);
  BwdIn<T> R{lse, coef, cpos};
  backward_da_kernel<T><<<static_cast<unsigned>((M + kTile - 1) / kTile), kThreads, 0, stream>>>(P, R, dA);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  backward_dc_kernel<T><<<static_cast<unsigned>((N + kTile - 1) / kTile), kThreads, 0, stream>>>(P, R, dC);
  return cudaGetLastError();
}

#define LTCL_INSTANTIATE(T)                                                                                     \
  template cudaError_t ssl_forward<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,          \
                                      const SSLParams&, T*, T*, T*, cudaStream_t);                            \
  template cudaError_t ssl_backward<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,         \
                                       const SSLParams&, const T*, const T*, const T*, T*, T*, cudaStream_t);

LTCL_INSTANTIATE(float)
LTCL_INSTANTIATE(double)

}  // namespace cuda
}  // namespace ltcl
