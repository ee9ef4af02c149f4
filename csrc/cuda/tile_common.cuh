// Tile machinery shared by the CUDA kernels (rowstats_cuda.cu, ssl_cuda.cu): a block of 256 threads
// (8 warps) works on a 32 x 32 tile of dot products <A_i, C_j> formed from shared-memory tiles of A and
// C (32 features at a time); thread (warp w, lane l) holds row w + 8q, column l (q = 0..3), so each
// row of a tile lives in one warp and row reductions are fixed-order warp shuffles (deterministic).
// The backward driver (backward_sweep: dA rows, dC columns, and the symmetric dX = (G + G^T) X / tau)
// takes the contract's per-element gradient as a functor, so both engine contracts (row statistics, SSL)
// share one implementation.
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

// out[o0 + o] += inv_tau * sum_{y < ny} G(o, y) Y[y0 + y] for the 32 output rows o0 + o < n_out, G the tile in
// shared memory (TRANS: its transpose, G(o, y) = g[y][o]). Thread t owns feature columns d = t, t + 256, ...:
// 32 output accumulators, one read of Y per (y, d).
template <bool TRANS, typename T>
__device__ void gy_tile(const T (&g)[kTile][kTile + 1], const T* Y, int64_t y0, int ny, T* out, int64_t o0,
                        int64_t n_out, int64_t D, T inv_tau) {
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    T o[kTile];
#pragma unroll
    for (int oo = 0; oo < kTile; ++oo) o[oo] = T(0);
    for (int yy = 0; yy < ny; ++yy) {
      const T yv = Y[(y0 + yy) * D + d];
#pragma unroll
      for (int oo = 0; oo < kTile; ++oo) o[oo] += (TRANS ? g[yy][oo] : g[oo][yy]) * yv;
    }
#pragma unroll
    for (int oo = 0; oo < kTile; ++oo)
      if (o0 + oo < n_out) out[(o0 + oo) * D + d] += inv_tau * o[oo];
  }
}

// The backward sweeps, one driver (this block owns 32 rows, or with kCols 32 columns, of out: no atomics):
//   kRows:    out_i += inv_tau * sum_j H_ij C_j over the column tiles, H_ij = grad(i, j, <A_i, C_j>) (dA);
//   kRowsSym: the same with H_ij = grad(i, j, s) + grad(j, i, s) when C is A (S symmetric): row j's gradient of
//             s_ji = s_ij, so out = (G + G^T) X / tau in one kernel, 2 GEMM-equivalents (recompute S, H X)
//             where the general dA + dC kernels pay 4;
//   kCols:    out_j += inv_tau * sum_i grad(i, j, <A_i, C_j>) A_i over the row tiles (dC).
// grad(i, j, dot) must return 0 outside the matrices (i >= M or j >= N).
enum class Sweep { kRows, kRowsSym, kCols };

template <Sweep S, typename T, typename Args, typename Grad>
__device__ void backward_sweep(const Args& P, const Grad& grad, Smem<T>& sm, T* out) {
  constexpr bool kCols = S == Sweep::kCols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTile;  // the owned rows (kCols: columns)
  const int64_t n_sweep = kCols ? P.M : P.N;
  for (int64_t t0 = 0; t0 < n_sweep; t0 += kTile) {
    const int64_t r0 = kCols ? t0 : b0, c0 = kCols ? b0 : t0;
    T acc[kRowsPerThread];
    tile_dots(P, r0, c0, sm, acc);
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int64_t i = r0 + warp + 8 * q, j = c0 + lane;
      T h = grad(i, j, acc[q]);
      if (S == Sweep::kRowsSym) h += grad(j, i, acc[q]);
      sm.g[warp + 8 * q][lane] = h;
    }
    __syncthreads();
    const int ny = n_sweep - t0 < kTile ? static_cast<int>(n_sweep - t0) : kTile;
    gy_tile<kCols>(sm.g, kCols ? P.A : P.C, t0, ny, out, b0, kCols ? P.N : P.M, P.D, P.inv_tau);
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
