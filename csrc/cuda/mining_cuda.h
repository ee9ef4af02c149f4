// Launchers of the CUDA hard-pair mining kernel (contract: ltcl_fused/backends/mining_torch.py).
// Raw device pointers and a stream: this header and mining_cuda.cu need only the CUDA toolkit.
// Instantiated for float and double (fp16/bf16 inputs are converted to fp32 by the binding).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace ltcl {
namespace cuda {

// Bytes of device workspace topk_mining needs (O(min(M, 1024) * (max(k_pos, k_neg) + 1024))).
template <typename T>
size_t topk_mining_workspace_bytes(int64_t M, int64_t k_pos, int64_t k_neg);

// pos_idx [M, k_pos], neg_idx [M, k_neg] int64 (fully written; -1 in the slots of a row with fewer candidates).
// A [M, D], K [Q, D] contiguous; labels int64. workspace: topk_mining_workspace_bytes<T>(M, k_pos, k_neg) bytes.
template <typename T>
cudaError_t topk_mining(const T* A, const int64_t* a_lab, const T* K, const int64_t* k_lab, int64_t M, int64_t Q,
                        int64_t D, int64_t k_pos, int64_t k_neg, int64_t* pos_idx, int64_t* neg_idx,
                        void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace ltcl
