// Tile machinery shared by the CUDA kernels (rowstats_cuda.cu, ssl_cuda.cu): a block of 256 threads
// (8 warps) works on a 32 x 32 tile of dot products <A_i, C_j> formed from shared-memory tiles of A and
// C (32 features at a time); thread (warp w, lane l) holds row w + 8q, column l (q = 0..3), so each
// row of a tile lives in one warp and row reductions are fixed-order warp shuffles (deterministic).
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
