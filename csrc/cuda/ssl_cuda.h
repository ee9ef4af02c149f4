// Launchers of the CUDA kernels of the self-supervised row-statistics contract
// (ltcl_fused/engine/ssl_contract.py): DCL, HCL and MTTV (scales, element filter, partner/self masks) and
// the Bayesian weights with exact within-row ranks (a rank pass: CUB segmented radix sort of the rows'
// order-preserving keys, then the weighting pass counts by binary search, as csrc/cpu/ssl_cpu.cpp does).
// Column blocks (ssl_fwd_ranked / ssl_bwd_ranked / ssl_set_values): the Bayesian counts against a rank
// reference of the whole row (SSLRankRef), and one block's row-sorted set values.
// Raw device pointers and a stream: this header and ssl_cuda.cu need only the CUDA toolkit (CUB included).
// Instantiated for float and double (fp16/bf16 inputs are converted to fp32 by the binding).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace ltcl {
namespace cuda {

constexpr int kSSLMaxScales = 8;
// Rows of one rank-pass chunk: max(1, kSSLRankChunkElements / N) (two key buffers of that many elements).
constexpr int64_t kSSLRankChunkElements = int64_t(1) << 24;

// Scalar configuration of one call (the SSLConfig of the contract).
struct SSLParams {
  int64_t self_offset;   // column i + self_offset is anchor i's self column; -1: none
  double inv_tau;
  int num_scales;        // 1 .. kSSLMaxScales
  double scales[kSSLMaxScales];
  bool exclude_partner, include_self;
  int filter;            // 0 none, 1 "both", 2 "low" (on the raw dot product)
  double lower, upper;
  bool bayes;            // Bayesian weights (num_scales == 1)
  double alpha, beta, tau_plus;
};

// Rank reference of column blocks: row i's ascending set values over all blocks in ref[i * ld, + n[i]).
template <typename T>
struct SSLRankRef {
  const T* ref;
  const int64_t* n;
  int64_t ld;
};

// Device workspace (bytes) the Bayesian rank pass needs for an M x N problem; 0 when p.bayes is false
// or a rank reference is given (ranked ops): the caller allocates it and passes it to the launchers.
template <typename T>
size_t ssl_workspace_bytes(int64_t M, int64_t N, const SSLParams& p, bool has_rank_ref);

// lse [K, M], pos [M], pos_in [M] (accumulation dtype T). rank_ref: nullptr, or the column-block reference.
template <typename T>
cudaError_t ssl_forward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                        const SSLParams& p, const SSLRankRef<T>* rank_ref, void* ws, size_t ws_bytes, T* lse,
                        T* pos, T* pos_in, cudaStream_t stream);

// dA [M, D] and dC [N, D] (accumulation dtype T), fully overwritten. lse, coef: [K, M]; cpos: [M].
template <typename T>
cudaError_t ssl_backward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                         const SSLParams& p, const SSLRankRef<T>* rank_ref, void* ws, size_t ws_bytes,
                         const T* lse, const T* coef, const T* cpos, T* dA, T* dC, cudaStream_t stream);

// Symmetric path (C is A = X [N, D], self_offset 0, no Bayesian weights): dX = (G + G^T) X * inv_tau [N, D],
// the gradient through both operands, fully overwritten; one kernel (2 GEMM-equivalents instead of 4).
template <typename T>
cudaError_t ssl_backward_symmetric(const T* X, const int64_t* partner, int64_t N, int64_t D, const SSLParams& p,
                                   const T* lse, const T* coef, const T* cpos, T* dX, cudaStream_t stream);

// One column block's row-sorted set values vals [M, N] (+inf after the first cnt[i]) and cnt [M].
// Workspace: ssl_workspace_bytes with p.bayes = true and no reference.
template <typename T>
cudaError_t ssl_set_values(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                           const SSLParams& p, void* ws, size_t ws_bytes, T* vals, int64_t* cnt,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace ltcl
