// CUDA hard-pair mining for ResCom (SPEC.md section 4; contract: ltcl_fused/backends/mining_torch.py).
// Mirrors the CPU algorithm (csrc/cpu/topk_mining.cpp): per anchor row a candidate buffer with a
// threshold, cut back to the best k when it fills; the M x Q similarity matrix never exists.
//
// One block of 256 threads (8 warps) per anchor row (grid-stride over rows, at most kMaxBlocks blocks,
// each with its own slice of the workspace). The keys are streamed in tiles of kTileKeys: warp w takes
// keys q0 + w, q0 + w + 8, ...; the 32 lanes split the feature dimension and a shuffle reduction gives
// the similarity (accumulated in T: fp32, fp64 for fp64). Lane 0 appends a candidate (value v = -s for
// positives, s for negatives; key index j) to the row's buffer in global memory when it beats the
// current threshold. When the buffer cannot take another tile it is cut to the best k by a block-wide
// rank selection: rank(e) = #{f : f better than e} in the strict total order "larger v, then smaller j",
// entries of rank < k move to slot rank (so the cut also sorts). The result does not depend on the order
// in which the candidates were appended: the selection is deterministic and equals the CPU kernel's for
// equal similarities. One launch per selection (positives, negatives). Needs only the CUDA toolkit.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "mining_cuda.h"
#include "tile_common.cuh"

namespace ltcl {
namespace cuda {
namespace {

using tile::kThreads;              // 256 threads, 8 warps
using tile::warp_sum;
constexpr int kWarps = kThreads / 32;
constexpr int kTileKeys = 256;    // keys per tile: at most this many candidates enter between two checks
constexpr int kSlack = 1024;      // buffer capacity k + kSlack; a cut when fewer than kTileKeys slots are left
constexpr int kMaxBlocks = 1024;  // workspace: at most this many row buffers

__host__ __device__ inline int64_t capacity(int64_t k) { return (k + kSlack + 31) / 32 * 32; }

template <typename T>
struct Buf {
  T* v;
  int64_t* j;
};

// the per-block buffers: [blocks][2][cap] values, then [blocks][2][cap] indices
template <typename T>
__device__ __forceinline__ Buf<T> block_buf(void* ws, int64_t cap, int which) {
  const int64_t nb = gridDim.x;
  T* v = static_cast<T*>(ws);
  int64_t* j = reinterpret_cast<int64_t*>(v + nb * 2 * cap);
  const int64_t off = (static_cast<int64_t>(blockIdx.x) * 2 + which) * cap;
  return Buf<T>{v + off, j + off};
}

// a strict order: larger value, then smaller index; NaN larger than every number (as torch.topk), so the
// ranks stay distinct and a NaN similarity is selected, never dropped
template <typename T>
__device__ __forceinline__ bool better(T va, int64_t ja, T vb, int64_t jb) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return na && (!nb || ja < jb);
  return va > vb || (va == vb && ja < jb);
}

// Rank selection of the best min(n, k) of src[0, n) into dst[0, min(n, k)) in order (best first).
template <typename T>
__device__ void rank_select(const Buf<T>& src, const Buf<T>& dst, int64_t n, int64_t k) {
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const T ve = src.v[e];
    const int64_t je = src.j[e];
    int64_t r = 0;
    for (int64_t f = 0; f < n && r < k; ++f) r += better(src.v[f], src.j[f], ve, je) ? 1 : 0;
    if (r < k) {
      dst.v[r] = ve;
      dst.j[r] = je;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    mining_kernel(const T* __restrict__ A, const int64_t* __restrict__ a_lab, const T* __restrict__ K,
                  const int64_t* __restrict__ k_lab, int64_t M, int64_t Q, int64_t D, int64_t k, bool same,
                  int64_t* __restrict__ out, void* ws) {
  __shared__ int64_t n_sh;      // entries in the buffer
  __shared__ int has_thr_sh;    // the buffer was cut to exactly k: (thr_v, thr_j) is its k-th best
  __shared__ T thr_v_sh;
  __shared__ int64_t thr_j_sh;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t cap = capacity(k);
  Buf<T> buf = block_buf<T>(ws, cap, 0), tmp = block_buf<T>(ws, cap, 1);

  for (int64_t i = blockIdx.x; i < M; i += gridDim.x) {
    if (threadIdx.x == 0) {
      n_sh = 0;
      has_thr_sh = 0;
    }
    __syncthreads();
    const int64_t y = a_lab[i];
    const T* a = A + i * D;
    for (int64_t q0 = 0; q0 < Q; q0 += kTileKeys) {
      const int has_thr = has_thr_sh;
      const T thr_v = thr_v_sh;
      const int64_t thr_j = thr_j_sh;
      const int64_t q1 = q0 + kTileKeys < Q ? q0 + kTileKeys : Q;
      for (int64_t j = q0 + warp; j < q1; j += kWarps) {
        if ((k_lab[j] == y) != same) continue;  // uniform across the warp
        const T* kr = K + j * D;
        T s = T(0);
        for (int64_t d = lane; d < D; d += 32) s += a[d] * kr[d];
        s = warp_sum(s);
        const T v = same ? -s : s;
        if (lane == 0 && (!has_thr || better(v, j, thr_v, thr_j))) {
          const int64_t slot = static_cast<int64_t>(atomicAdd(reinterpret_cast<unsigned long long*>(&n_sh), 1ull));
          buf.v[slot] = v;
          buf.j[slot] = j;
        }
      }
      __syncthreads();  // the tile's appends are visible to the block (global memory, same block)
      const int64_t n = n_sh;
      if (n > cap - kTileKeys && n > k) {  // another tile might not fit: cut to the best k
        rank_select(buf, tmp, n, k);
        __syncthreads();
        for (int64_t e = threadIdx.x; e < k; e += kThreads) {
          buf.v[e] = tmp.v[e];
          buf.j[e] = tmp.j[e];
        }
        if (threadIdx.x == 0) {
          n_sh = k;
          has_thr_sh = 1;
          thr_v_sh = tmp.v[k - 1];
          thr_j_sh = tmp.j[k - 1];
        }
      }
      __syncthreads();
    }
    // final: sort the best min(n, k) into tmp and write the row (-1 where no candidate)
    const int64_t n = n_sh;
    rank_select(buf, tmp, n, k);
    __syncthreads();
    const int64_t kept = n < k ? n : k;
    for (int64_t e = threadIdx.x; e < k; e += kThreads) out[i * k + e] = e < kept ? tmp.j[e] : int64_t(-1);
    __syncthreads();  // tmp and the shared state are reused by the next row
  }
}

int blocks_for(int64_t M) { return static_cast<int>(M < kMaxBlocks ? M : kMaxBlocks); }

}  // namespace

template <typename T>
size_t topk_mining_workspace_bytes(int64_t M, int64_t k_pos, int64_t k_neg) {
  if (M <= 0) return 0;
  const int64_t k = k_pos > k_neg ? k_pos : k_neg;
  return static_cast<size_t>(blocks_for(M)) * 2 * static_cast<size_t>(capacity(k)) * (sizeof(T) + sizeof(int64_t));
}

template <typename T>
cudaError_t topk_mining(const T* A, const int64_t* a_lab, const T* K, const int64_t* k_lab, int64_t M, int64_t Q,
                        int64_t D, int64_t k_pos, int64_t k_neg, int64_t* pos_idx, int64_t* neg_idx,
                        void* workspace, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  const int grid = blocks_for(M);
  // the workspace is sized for the larger k; a launch with the smaller k lays its (smaller) buffers out
  // from the start of the same workspace, so it fits too
  if (k_pos > 0) {
    mining_kernel<T><<<grid, kThreads, 0, stream>>>(A, a_lab, K, k_lab, M, Q, D, k_pos, true, pos_idx, workspace);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (k_neg > 0) {
    mining_kernel<T><<<grid, kThreads, 0, stream>>>(A, a_lab, K, k_lab, M, Q, D, k_neg, false, neg_idx, workspace);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

#define LTCL_INSTANTIATE(T)                                                                                   \
  template size_t topk_mining_workspace_bytes<T>(int64_t, int64_t, int64_t);                                 \
  template cudaError_t topk_mining<T>(const T*, const int64_t*, const T*, const int64_t*, int64_t, int64_t, \
                                      int64_t, int64_t, int64_t, int64_t*, int64_t*, void*, cudaStream_t);

LTCL_INSTANTIATE(float)
LTCL_INSTANTIATE(double)

}  // namespace cuda
}  // namespace ltcl
