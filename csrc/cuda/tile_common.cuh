// Tile machinery shared by the CUDA kernels (rowstats_cuda.cu, ssl_cuda.cu): a block of 256 threads
// (8 warps) works on a 32 x 32 tile of dot products <A_i, C_j> formed from shared-memory tiles of A and
// C (32 features at a time); thread (warp w, lane l) holds row w + 8q, column l (q = 0..3), so each
// row of a tile lives in one warp and row reductions are fixed-order warp shuffles (deterministic).
// The backward drivers (rows_backward, cols_backward; the symmetric dX = (G + G^T) X / tau is
// rows_backward<true>) take the contract's per-element gradient as a functor, so both engine contracts
// (row statistics, SSL) share one implementation of each.
// Needs only the CUDA toolkit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ltcl {
namespace cuda {
namespace tile {

constexpr int kTile = 32;     // BM = BN = BK
constexpr int kThreads = 256; // 8 warps
constexpr int kRowsPerThread = kTile / (kThreads / 32);  // 4

template <typename T>
struct Smem {
  T a[kTile][kTile + 1];
  T c[kTile][kTile + 1];
  T g[kTile][kTile + 1];
};

// acc[q] = <A[r0 + w + 8q], C[c0 + lane]> for the 32 x 32 tile at (r0, c0); zero outside the matrices.
// ``Args`` is any kernel-argument struct with A, C (row-major, D wide), M, N and D.
template <typename T, typename Args>
__device__ void tile_dots(const Args& P, int64_t r0, int64_t c0, Smem<T>& sm, T acc[kRowsPerThread]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) acc[q] = T(0);
  for (int64_t k0 = 0; k0 < P.D; k0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int rr = e / kTile, kk = e % kTile;
      const int64_t k = k0 + kk;
      const int64_t ra = r0 + rr, cc = c0 + rr;
      sm.a[rr][kk] = (ra < P.M && k < P.D) ? P.A[ra * P.D + k] : T(0);
      sm.c[rr][kk] = (cc < P.N && k < P.D) ? P.C[cc * P.D + k] : T(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const T cv = sm.c[lane][kk];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) acc[q] += sm.a[warp + 8 * q][kk] * cv;
    }
    __syncthreads();
  }
}

// Row-parallel backward driver (this block owns rows r0..r0+31 of out: no atomics):
//   out_i += inv_tau * sum_j H_ij C_j over the column tiles, H_ij = grad(i, j, <A_i, C_j>),
// and with SYM (C is A, the same rows: S is symmetric) H_ij = grad(i, j, s) + grad(j, i, s), row j's gradient
// of s_ji = s_ij, so out = (G + G^T) X / tau in one kernel: 2 GEMM-equivalents (recompute S, H X) where the
// general dA + dC kernels pay 4. grad(i, j, dot) must return 0 outside the matrices (i >= M or j >= N).
// Thread t owns feature columns d = t, t + 256, ...: 32 row accumulators, one read of C per (column, d).
template <bool SYM, typename T, typename Args, typename Grad>
__device__ void rows_backward(const Args& P, const Grad& grad, Smem<T>& sm, T* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t c0 = 0; c0 < P.N; c0 += kTile) {
    T acc[kRowsPerThread];
    tile_dots(P, r0, c0, sm, acc);
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = r0 + warp + 8 * q, j = c0 + lane;
      T h = grad(i, j, acc[q]);
      if (SYM) h += grad(j, i, acc[q]);
      sm.g[warp + 8 * q][lane] = h;
    }
    __syncthreads();
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
        if (r0 + rr < P.M) out[(r0 + rr) * P.D + d] += P.inv_tau * o[rr];
    }
    __syncthreads();
  }
}

// Column-parallel backward driver (this block owns columns c0..c0+31 of out: no atomics):
//   out_j += inv_tau * sum_i grad(i, j, <A_i, C_j>) A_i over the row tiles (the general path's dC).
template <typename T, typename Args, typename Grad>
__device__ void cols_backward(const Args& P, const Grad& grad, Smem<T>& sm, T* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t r0 = 0; r0 < P.M; r0 += kTile) {
    T acc[kRowsPerThread];
    tile_dots(P, r0, c0, sm, acc);
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) sm.g[warp + 8 * q][lane] = grad(r0 + warp + 8 * q, c0 + lane, acc[q]);
    __syncthreads();
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
        if (c0 + cc < P.N) out[(c0 + cc) * P.D + d] += P.inv_tau * o[cc];
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Max over the warp; NaN if any lane holds NaN (fmax would drop it).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = (w > v || w != w) ? w : v;
  }
  return v;
}

}  // namespace tile
}  // namespace cuda
}  // namespace ltcl
