// Launchers of the CUDA row-statistics kernels (contract: ltcl_fused/engine/contract.py).
// Raw device pointers and a stream: this header and rowstats_cuda.cu need only the CUDA toolkit.
// Instantiated for float and double (fp16/bf16 inputs are converted to fp32 by the binding).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ltcl {
namespace cuda {

// Outputs [M]: lse, pos, fpos, fneg, upos, uneg, top (int64), lrest. bias_same/bias_other: both or nullptr.
template <typename T>
cudaError_t rowstats_forward(const T* A, const T* C, const int64_t* a_lab, const int64_t* c_lab,
                             const T* bias_same, const T* bias_other, int64_t M, int64_t N, int64_t D,
                             int64_t self_offset, T inv_tau, T gamma, bool focal, T* lse, T* pos, T* fpos,
                             T* fneg, T* upos, T* uneg, int64_t* top, T* lrest, cudaStream_t stream);

// dA [M, D] and dC [N, D] (accumulation dtype), fully overwritten.
template <typename T>
cudaError_t rowstats_backward(const T* A, const T* C, const int64_t* a_lab, const int64_t* c_lab,
                              const T* bias_same, const T* bias_other, int64_t M, int64_t N, int64_t D,
                              int64_t self_offset, T inv_tau, T gamma, bool focal, const T* lse,
                              const int64_t* top, const T* lrest, const T* cpos, const T* cposf, const T* cneg,
                              const T* r, const T* rt, T* dA, T* dC, cudaStream_t stream);

// Symmetric path (C is A = X [N, D], one label vector, self_offset 0): dX = (G + G^T) X * inv_tau [N, D],
// the gradient through both operands, fully overwritten; one kernel (2 GEMM-equivalents instead of 4).
template <typename T>
cudaError_t rowstats_backward_symmetric(const T* X, const int64_t* lab, const T* bias_same, const T* bias_other,
                                        int64_t N, int64_t D, T inv_tau, T gamma, bool focal, const T* lse,
                                        const int64_t* top, const T* lrest, const T* cpos, const T* cposf,
                                        const T* cneg, const T* r, const T* rt, T* dX, cudaStream_t stream);

}  // namespace cuda
}  // namespace ltcl
