// Argument checks of the symmetric path (symmetric=True: the anchors ARE the columns), shared by the CPU
// kernels (csrc/cpu) and the CUDA binding (csrc/cuda/binding_cuda.cpp): the caller guarantees C is A (the
// same storage), self_offset 0 and, for the row statistics, c_lab equal to a_lab.
#pragma once

#include <ATen/ATen.h>

namespace ltcl {

// Whether C is A itself or a view of all of it (the same storage, shape, strides and dtype).
inline bool same_operand(const at::Tensor& A, const at::Tensor& C) {
  return A.sizes() == C.sizes() && A.strides() == C.strides() && A.data_ptr() == C.data_ptr() &&
         A.scalar_type() == C.scalar_type();
}

inline void check_symmetric_operands(const at::Tensor& A, const at::Tensor& C, int64_t self_offset, const char* op) {
  TORCH_CHECK(self_offset == 0, op, ": symmetric=True needs self_offset == 0, got ", self_offset);
  TORCH_CHECK(same_operand(A, C), op, ": symmetric=True needs C to be A (the same tensor or a view of all of it)");
}

inline void check_symmetric_labels(const at::Tensor& a_lab, const at::Tensor& c_lab, const char* op) {
  TORCH_CHECK(a_lab.data_ptr() == c_lab.data_ptr() || at::equal(a_lab, c_lab), op,
              ": symmetric=True needs c_lab equal to a_lab");
}

inline void check_symmetric_no_bayes(c10::ArrayRef<double> bayes, const char* op) {
  TORCH_CHECK(bayes.empty(), op, ": symmetric=True is not available with the Bayesian weights");
}

}  // namespace ltcl
