// Launchers of the CUDA kernels of the self-supervised row-statistics contract
// (ltcl_fused/engine/ssl_contract.py): DCL, HCL and MTTV (scales, element filter, partner/self masks).
// The Bayesian weights (exact within-row ranks) have no CUDA kernel: the binding refuses them.
// Raw device pointers and a stream: this header and ssl_cuda.cu need only the CUDA toolkit.
// Instantiated for float and double (fp16/bf16 inputs are converted to fp32 by the binding).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ltcl {
namespace cuda {

constexpr int kSSLMaxScales = 8;

// Scalar configuration of one call (the SSLConfig of the contract, less `bayes`).
struct SSLParams {
  int64_t self_offset;   // column i + self_offset is anchor i's self column; -1: none
  double inv_tau;
  int num_scales;        // 1 .. kSSLMaxScales
  double scales[kSSLMaxScales];
  bool exclude_partner, include_self;
  int filter;            // 0 none, 1 "both", 2 "low" (on the raw dot product)
  double lower, upper;
};

// lse [K, M], pos [M], pos_in [M] (accumulation dtype T).
template <typename T>
cudaError_t ssl_forward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                        const SSLParams& p, T* lse, T* pos, T* pos_in, cudaStream_t stream);

// dA [M, D] and dC [N, D] (accumulation dtype T), fully overwritten. lse, coef: [K, M]; cpos: [M].
template <typename T>
cudaError_t ssl_backward(const T* A, const T* C, const int64_t* partner, int64_t M, int64_t N, int64_t D,
                         const SSLParams& p, const T* lse, const T* coef, const T* cpos, T* dA, T* dC,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace ltcl
