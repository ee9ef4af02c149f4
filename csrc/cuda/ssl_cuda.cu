// CUDA kernels of the self-supervised row-statistics contract (ltcl_fused/engine/ssl_contract.py):
// DCL, HCL, MTTV and the Bayesian contrastive loss. They mirror the tiled design of rowstats_cuda.cu and
// share the per-element math (element filter, LSE finish, order-preserving keys, count -> weight) with the
// CPU kernels through csrc/common/ssl_math.h.
//
// Tiles: a block of 256 threads (8 warps) owns BM = 32 anchor rows (forward, dA) or BN = 32 columns
// (dC). A 32 x 32 tile of raw dot products g = <A_i, C_j> is computed from shared-memory tiles of A and C
// (BK = 32 features at a time); thread (warp w, lane l) holds g[w + 8q][l], q = 0..3, so every row of a
// tile lives in one warp and row reductions are warp shuffles in a fixed order (deterministic).
// Forward: one pass over the column tiles with NK online LSEs per row (running max and sum of
// exp(c_k s - max)) over the row's set (self / partner / filter masks), the positive's s and whether it
// stayed in the set. NK (a template constant: 1, 2 or 8) is the smallest supported count >= K.
// Backward: recompute the tile, form G in shared memory, dA row-parallel (one block owns its rows),
// dC column-parallel (one block owns its columns): no atomics (tile::backward_sweep).
// Symmetric path (C is A, self_offset 0, no Bayesian weights): one row-parallel kernel
// dX_I = sum_J (G_IJ + G_JI^T) X_J / tau, G_JI^T from row j's saved lse / coef / cpos on the same recomputed
// tile (2 GEMM-equivalents instead of 4; the forward is the general one).
// Bayesian weights (exact ranks, ties count as <=, -0 == +0), as the CPU kernel: a rank pass sorts each
// row's set values, then u_ij = #{set values <= s_ij} / n_i and w = ω(u). Anchors go in chunks of
// R = max(1, kSSLRankChunkElements / N) rows: (1) rank_keys_kernel writes the chunk's R x N keys
// (cm::ordered_key of s on the set, all-ones elsewhere, so they sort last) and counts n_i; (2) CUB's
// segmented radix sort sorts every row's keys (the CPU kernel's LSD radix sort, on the same keys);
// (3) keys_to_values_kernel turns the sorted keys back into values in place. The forward and backward
// kernels then run on the chunk with BAYES = true: each set element's count is a binary search in its
// row's sorted values (cm::count_le; the CPU kernel reads the same count off the end of its run) and
// x = log ω(count / n) + c s (cm::bayes_count_log_weight). Ranked ops (column blocks) skip the rank
// pass and search the given reference instead. The rank pass recomputes the same tiles with the same
// s = g * inv_tau, so an element always finds itself and its exact ties.
// Needs only the CUDA toolkit (CUB is header-only there): no torch headers.
#include <cuda_runtime.h>

#include <cstdint>

#include <cub/device/device_segmented_radix_sort.cuh>

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
  cm::BayesOmega<T> omega;  // Bayesian weights (BAYES kernels only)
  const T* ref;             // row i's ascending set values ref[i * ref_ld, + ref_n[i]) (BAYES kernels only)
  const int64_t* ref_n;
  int64_t ref_ld;
};

// log ω(u_ij) for an element of set(i) with value s: u = #{row i's set values <= s} / n_i.
template <typename T>
__device__ __forceinline__ T bayes_log_weight(const Args<T>& P, int64_t i, T s) {
  const int64_t n = P.ref_n[i];
  if (n <= 0) return cm::neg_inf<T>();
  return cm::bayes_count_log_weight(P.omega, cm::count_le(P.ref + i * P.ref_ld, n, s), n);
}


// Whether column j is in set(i), from the raw dot product g (i < M assumed; j may be >= N).
template <typename T>
__device__ __forceinline__ bool in_set(const Args<T>& P, int64_t i, int64_t j, int64_t p, T g) {
  if (j >= P.N) return false;
  if (!P.include_self && P.self_offset >= 0 && j == i + P.self_offset) return false;
  if (P.exclude_partner && j == p) return false;
  return cm::ssl_filter_keep(g, P.filter, P.lower, P.upper);
}

template <typename T, int NK, bool BAYES>
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
      bool live = in;  // in the set with a weight > 0
      T lw = T(0);     // log w
      if (BAYES && in) {
        lw = bayes_log_weight(P, i, s);
        live = lw > ninf;
      }
      if (!__any_sync(0xffffffffu, live)) continue;  // uniform across the warp
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        if (k >= P.K) break;
        const T x = live ? (BAYES ? lw + P.scales[k] * s : P.scales[k] * s) : ninf;
        const T tm = warp_max(x);
        const T nm = tm > m[k][q] ? tm : m[k][q];  // finite: some x is finite
        const T tsum = warp_sum(live ? cm::f_exp(x - nm) : T(0));
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
template <typename T, bool BAYES>
__device__ __forceinline__ T grad_at(const Args<T>& P, const BwdIn<T>& R, int64_t i, int64_t j, T g) {
  if (i >= P.M || j >= P.N) return T(0);
  const int64_t p = P.partner[i];
  T G = T(0);
  if (in_set(P, i, j, p, g)) {
    const T s = g * P.inv_tau;
    const T lw = BAYES ? bayes_log_weight(P, i, s) : T(0);  // log w; -inf gives exactly 0 below
#pragma unroll
    for (int k = 0; k < kSSLMaxScales; ++k) {  // unrolled: constant indices into the scales
      if (k >= P.K) break;
      const T L = R.lse[k * P.M + i], ck = R.coef[k * P.M + i];
      if (ck == T(0) || !(L > cm::neg_inf<T>()) || !(L < -cm::neg_inf<T>())) continue;  // a dead term: exactly 0
      const T c = P.scales[k];
      G += ck * c * cm::f_exp(lw + c * s - L);
    }
  }
  if (j == p) G = R.cpos[i] + G;
  return G;
}

// dA rows (general path, SYM = false; tile::backward_sweep) or, on the symmetric path (C is A, self_offset 0,
// no Bayesian weights), dX = (G + G^T) X / tau with G_ji from row j's lse / coef / cpos (SYM = true).
template <typename T, bool BAYES, bool SYM>
__global__ void __launch_bounds__(kThreads, 1) backward_rows_kernel(Args<T> P, BwdIn<T> R, T* out) {
  __shared__ Smem<T> sm;
  const auto grad = [&](int64_t i, int64_t j, T g) { return grad_at<T, BAYES>(P, R, i, j, g); };
  tile::backward_sweep<SYM ? tile::Sweep::kRowsSym : tile::Sweep::kRows, T>(P, grad, sm, out);
}

// dC columns (general path; tile::backward_sweep).
template <typename T, bool BAYES>
__global__ void __launch_bounds__(kThreads, 1) backward_cols_kernel(Args<T> P, BwdIn<T> R, T* out) {
  __shared__ Smem<T> sm;
  const auto grad = [&](int64_t i, int64_t j, T g) { return grad_at<T, BAYES>(P, R, i, j, g); };
  tile::backward_sweep<tile::Sweep::kCols, T>(P, grad, sm, out);
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
  if (p.bayes) P.omega = cm::BayesOmega<T>(p.alpha, p.beta, p.tau_plus);
  P.ref = nullptr;
  P.ref_n = nullptr;
  P.ref_ld = 0;
  return P;
}

// The sub-problem of anchor rows [r0, r0 + rows) (same columns; self columns re-based).
template <typename T>
Args<T> row_chunk(const Args<T>& P, int64_t r0, int64_t rows) {
  Args<T> Q = P;
  Q.A = P.A + r0 * P.D;
  Q.partner = P.partner + r0;
  Q.M = rows;
  Q.self_offset = P.self_offset >= 0 ? P.self_offset + r0 : -1;
  return Q;
}

// ---------------------------------------------------------------- rank pass (Bayesian weights)

template <typename T>
using Key = typename cm::OrderedKey<T>::type;

// keys[i][j] = ordered_key(s_ij) for j in set(i), all-ones (sorts last) elsewhere; cnt[i] += |set(i)| of the
// tile. Grid: (column tiles, row tiles) of the chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) rank_keys_kernel(Args<T> P, Key<T>* keys, unsigned long long* cnt) {
  __shared__ Smem<T> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  T acc[kRowsPerThread];
  tile_dots(P, r0, c0, sm, acc);
  const int64_t j = c0 + lane;
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = r0 + warp + 8 * q;
    const bool in = i < P.M && in_set(P, i, j, i < P.M ? P.partner[i] : int64_t(-1), acc[q]);
    if (i < P.M && j < P.N) keys[i * P.N + j] = in ? cm::ordered_key(acc[q] * P.inv_tau) : ~Key<T>(0);
    const unsigned ballot = __ballot_sync(0xffffffffu, in);
    if (lane == 0 && ballot != 0u) atomicAdd(cnt + i, static_cast<unsigned long long>(__popc(ballot)));
  }
}

// Sorted keys -> values in place (+inf for the out-of-set sentinel).
template <typename T>
__global__ void keys_to_values_kernel(Key<T>* keys, int64_t n) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Key<T> k = keys[e];
    reinterpret_cast<T*>(keys)[e] = k == ~Key<T>(0) ? -cm::neg_inf<T>() : cm::key_to_value<T>(k);
  }
}

__global__ void segment_offsets_kernel(int* off, int64_t rows, int64_t n) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e <= rows;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    off[e] = static_cast<int>(e * n);
}

// Tuning of CUB's segmented radix sort (one thread block per row): 192 threads x 23 keys and 384 x 11
// for the alternate passes (CUB's own sm_80+ tuning, 39 keys a thread, spills on sm_90). One policy for
// every architecture; ptxas reports no spills for 32- and 64-bit keys on sm_80 and sm_90.
template <typename K>
struct SegmentedSortHub {
  struct Policy800 : cub::ChainedPolicy<800, Policy800, Policy800> {
    using SegmentedPolicy = cub::AgentRadixSortDownsweepPolicy<192, 23, K, cub::BLOCK_LOAD_TRANSPOSE, cub::LOAD_DEFAULT,
                                                               cub::RADIX_RANK_MEMOIZE, cub::BLOCK_SCAN_WARP_SCANS, 6>;
    using AltSegmentedPolicy =
        cub::AgentRadixSortDownsweepPolicy<384, 11, K, cub::BLOCK_LOAD_TRANSPOSE, cub::LOAD_DEFAULT,
                                           cub::RADIX_RANK_MEMOIZE, cub::BLOCK_SCAN_WARP_SCANS, 5>;
  };
  using MaxPolicy = Policy800;
};

// Sorts each of the `rows` segments [off[r], off[r + 1]) of keys_in into keys_out (ascending); with
// tmp == nullptr only writes the temporary storage size into bytes.
template <typename K>
cudaError_t sort_rows(void* tmp, size_t& bytes, const K* keys_in, K* keys_out, int64_t elems, int64_t rows,
                      const int* off, cudaStream_t stream) {
  cub::DoubleBuffer<K> keys(const_cast<K*>(keys_in), keys_out);
  cub::DoubleBuffer<cub::NullType> none;
  return cub::DispatchSegmentedRadixSort<cub::SortOrder::Ascending, K, cub::NullType, const int*, const int*, int,
                                         SegmentedSortHub<K>>::Dispatch(tmp, bytes, keys, none,
                                                                        static_cast<int>(elems),
                                                                        static_cast<int>(rows), off, off + 1, 0,
                                                                        static_cast<int>(8 * sizeof(K)), false,
                                                                        stream);
}

// Workspace of the rank pass for chunks of R rows: keys, sorted keys (then values), offsets, counts, CUB.
template <typename T>
struct RankWorkspace {
  int64_t R = 0;
  Key<T>* keys = nullptr;
  Key<T>* sorted = nullptr;
  int* offsets = nullptr;
  unsigned long long* cnt = nullptr;
  void* cub_tmp = nullptr;
  size_t cub_bytes = 0, total = 0;
};

inline size_t align_up(size_t b) { return (b + 255) / 256 * 256; }

inline int64_t chunk_rows(int64_t M, int64_t N) {
  const int64_t R = N > 0 ? kSSLRankChunkElements / N : M;
  return R < 1 ? 1 : (R > M ? M : R);
}

// Lays the workspace out at base (nullptr: sizes only).
template <typename T>
RankWorkspace<T> rank_layout(int64_t M, int64_t N, void* base) {
  RankWorkspace<T> w;
  w.R = chunk_rows(M, N);
  const size_t elems = static_cast<size_t>(w.R * N);
  size_t off = 0;
  auto* b = static_cast<char*>(base);
  auto take = [&](size_t bytes) {
    char* ptr = b == nullptr ? nullptr : b + off;
    off += align_up(bytes);
    return ptr;
  };
  w.keys = reinterpret_cast<Key<T>*>(take(elems * sizeof(Key<T>)));
  w.sorted = reinterpret_cast<Key<T>*>(take(elems * sizeof(Key<T>)));
  w.offsets = reinterpret_cast<int*>(take(static_cast<size_t>(w.R + 1) * sizeof(int)));
  w.cnt = reinterpret_cast<unsigned long long*>(take(static_cast<size_t>(w.R) * sizeof(unsigned long long)));
  sort_rows<Key<T>>(nullptr, w.cub_bytes, nullptr, nullptr, static_cast<int64_t>(elems), w.R, nullptr, nullptr);
  w.cub_tmp = take(w.cub_bytes);
  w.total = off;
  return w;
}

// Rank pass of one chunk problem Q (Q.M <= w.R rows): row-sorted set values into vals [Q.M, N] (+inf after
// the set) and the set sizes into cnt [Q.M].
template <typename T>
cudaError_t rank_chunk(const Args<T>& Q, const RankWorkspace<T>& w, T* vals, unsigned long long* cnt,
                       cudaStream_t stream) {
  const int64_t elems = Q.M * Q.N;
  cudaError_t err = cudaMemsetAsync(cnt, 0, sizeof(unsigned long long) * static_cast<size_t>(Q.M), stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((Q.N + kTile - 1) / kTile), static_cast<unsigned>((Q.M + kTile - 1) / kTile));
  rank_keys_kernel<T><<<grid, kThreads, 0, stream>>>(Q, w.keys, cnt);
  segment_offsets_kernel<<<static_cast<unsigned>((Q.M + 256) / 256), 256, 0, stream>>>(w.offsets, Q.M, Q.N);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  size_t bytes = w.cub_bytes;
  Key<T>* out = reinterpret_cast<Key<T>*>(vals);  // sizeof(Key<T>) == sizeof(T): sorted in place of the values
  err = sort_rows<Key<T>>(w.cub_tmp, bytes, w.keys, out, elems, Q.M, w.offsets, stream);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (elems + 255) / 256;
  keys_to_values_kernel<T><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(out, elems);
  return cudaGetLastError();
}

bool bad_scales(const SSLParams& p) {
  return p.num_scales < 1 || p.num_scales > kSSLMaxScales || (p.bayes && p.num_scales != 1);
}

}  // namespace

template <typename T>
size_t ssl_workspace_bytes(int64_t M, int64_t N, const SSLParams& p, bool has_rank_ref) {
  if (!p.bayes || has_rank_ref || M <= 0 || N <= 0) return 0;
  return rank_layout<T>(M, N, nullptr).total;
}

template <typename T>
cudaError_t ssl_forward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                        const SSLParams& p, const SSLRankRef<T>* rank_ref, void* ws, size_t ws_bytes, T* lse,
                        T* pos, T* pos_in, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (bad_scales(p)) return cudaErrorInvalidValue;
  auto P = make_args(A, C, partner, M, N, D, p);
  const unsigned grid = static_cast<unsigned>((M + kTile - 1) / kTile);
  if (!p.bayes) {
    if (p.num_scales == 1) {
      forward_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(P, lse, pos, pos_in);
    } else if (p.num_scales == 2) {
      forward_kernel<T, 2, false><<<grid, kThreads, 0, stream>>>(P, lse, pos, pos_in);
    } else {
      forward_kernel<T, kSSLMaxScales, false><<<grid, kThreads, 0, stream>>>(P, lse, pos, pos_in);
    }
    return cudaGetLastError();
  }
  if (rank_ref != nullptr) {  // column blocks: count against the given reference
    P.ref = rank_ref->ref;
    P.ref_n = rank_ref->n;
    P.ref_ld = rank_ref->ld;
    forward_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(P, lse, pos, pos_in);
    return cudaGetLastError();
  }
  const auto w = rank_layout<T>(M, N, ws);
  if (N > 0 && (ws == nullptr || ws_bytes < w.total)) return cudaErrorInvalidValue;
  for (int64_t r0 = 0; r0 < M; r0 += w.R) {
    const int64_t rows = M - r0 < w.R ? M - r0 : w.R;
    auto Q = row_chunk(P, r0, rows);
    if (N > 0) {
      T* vals = reinterpret_cast<T*>(w.sorted);
      cudaError_t err = rank_chunk(Q, w, vals, w.cnt, stream);
      if (err != cudaSuccess) return err;
      Q.ref = vals;
      Q.ref_n = reinterpret_cast<const int64_t*>(w.cnt);
      Q.ref_ld = N;
    }
    forward_kernel<T, 1, true><<<static_cast<unsigned>((rows + kTile - 1) / kTile), kThreads, 0, stream>>>(
        Q, lse + r0, pos + r0, pos_in + r0);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t ssl_backward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                         const SSLParams& p, const SSLRankRef<T>* rank_ref, void* ws, size_t ws_bytes,
                         const T* lse, const T* coef, const T* cpos, T* dA, T* dC, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(dA, 0, sizeof(T) * static_cast<size_t>(M * D), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(dC, 0, sizeof(T) * static_cast<size_t>(N * D), stream);
  if (err != cudaSuccess || M <= 0 || N <= 0 || D <= 0) return err;
  if (bad_scales(p)) return cudaErrorInvalidValue;
  auto P = make_args(A, C, partner, M, N, D, p);
  const unsigned gm = static_cast<unsigned>((M + kTile - 1) / kTile), gn = static_cast<unsigned>((N + kTile - 1) / kTile);
  if (!p.bayes) {
    BwdIn<T> R{lse, coef, cpos};
    backward_rows_kernel<T, false, false><<<gm, kThreads, 0, stream>>>(P, R, dA);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    backward_cols_kernel<T, false><<<gn, kThreads, 0, stream>>>(P, R, dC);
    return cudaGetLastError();
  }
  if (rank_ref != nullptr) {
    P.ref = rank_ref->ref;
    P.ref_n = rank_ref->n;
    P.ref_ld = rank_ref->ld;
    BwdIn<T> R{lse, coef, cpos};
    backward_rows_kernel<T, true, false><<<gm, kThreads, 0, stream>>>(P, R, dA);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    backward_cols_kernel<T, true><<<gn, kThreads, 0, stream>>>(P, R, dC);
    return cudaGetLastError();
  }
  const auto w = rank_layout<T>(M, N, ws);
  if (ws == nullptr || ws_bytes < w.total) return cudaErrorInvalidValue;
  for (int64_t r0 = 0; r0 < M; r0 += w.R) {  // one scale: lse, coef, cpos rows r0.. of the chunk
    const int64_t rows = M - r0 < w.R ? M - r0 : w.R;
    auto Q = row_chunk(P, r0, rows);
    T* vals = reinterpret_cast<T*>(w.sorted);
    if ((err = rank_chunk(Q, w, vals, w.cnt, stream)) != cudaSuccess) return err;
    Q.ref = vals;
    Q.ref_n = reinterpret_cast<const int64_t*>(w.cnt);
    Q.ref_ld = N;
    BwdIn<T> R{lse + r0, coef + r0, cpos + r0};
    backward_rows_kernel<T, true, false><<<static_cast<unsigned>((rows + kTile - 1) / kTile), kThreads, 0, stream>>>(
        Q, R, dA + r0 * D);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    backward_cols_kernel<T, true><<<gn, kThreads, 0, stream>>>(Q, R, dC);  // accumulates over the chunks
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t ssl_backward_symmetric(const T* X, const int64_t* partner, int64_t N, int64_t D, const SSLParams& p,
                                   const T* lse, const T* coef, const T* cpos, T* dX, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(dX, 0, sizeof(T) * static_cast<size_t>(N * D), stream);
  if (err != cudaSuccess || N <= 0 || D <= 0) return err;
  if (bad_scales(p) || p.bayes || p.self_offset != 0) return cudaErrorInvalidValue;
  const auto P = make_args(X, X, partner, N, N, D, p);
  BwdIn<T> R{lse, coef, cpos};
  backward_rows_kernel<T, false, true><<<static_cast<unsigned>((N + kTile - 1) / kTile), kThreads, 0, stream>>>(
      P, R, dX);
  return cudaGetLastError();
}

template <typename T>
cudaError_t ssl_set_values(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                           const SSLParams& p, void* ws, size_t ws_bytes, T* vals, int64_t* cnt,
                           cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (N <= 0) return cudaMemsetAsync(cnt, 0, sizeof(int64_t) * static_cast<size_t>(M), stream);
  const auto P = make_args(A, C, partner, M, N, D, p);
  const auto w = rank_layout<T>(M, N, ws);
  if (ws == nullptr || ws_bytes < w.total) return cudaErrorInvalidValue;
  for (int64_t r0 = 0; r0 < M; r0 += w.R) {
    const int64_t rows = M - r0 < w.R ? M - r0 : w.R;
    cudaError_t err = rank_chunk(row_chunk(P, r0, rows), w, vals + r0 * N,
                                 reinterpret_cast<unsigned long long*>(cnt + r0), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define LTCL_INSTANTIATE(T)                                                                                     \
  template size_t ssl_workspace_bytes<T>(int64_t, int64_t, const SSLParams&, bool);                           \
  template cudaError_t ssl_forward<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,          \
                                      const SSLParams&, const SSLRankRef<T>*, void*, size_t, T*, T*, T*,      \
                                      cudaStream_t);                                                          \
  template cudaError_t ssl_backward<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,         \
                                       const SSLParams&, const SSLRankRef<T>*, void*, size_t, const T*,       \
                                       const T*, const T*, T*, T*, cudaStream_t);                             \
  template cudaError_t ssl_backward_symmetric<T>(const T*, const int64_t*, int64_t, int64_t, const SSLParams&, \
                                                 const T*, const T*, const T*, T*, cudaStream_t);              \
  template cudaError_t ssl_set_values<T>(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t,       \
                                         const SSLParams&, void*, size_t, T*, int64_t*, cudaStream_t);

LTCL_INSTANTIATE(float)
LTCL_INSTANTIATE(double)

}  // namespace cuda
}  // namespace ltcl
