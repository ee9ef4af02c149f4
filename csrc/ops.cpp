// Operator schemas of the ltcl_fused extension (implementations: csrc/cpu, csrc/cuda/binding_cuda.cpp).
// The Python side (ltcl_fused/ext.py) registers the fake (meta) kernels and the autograd formula.
#include <torch/library.h>

TORCH_LIBRARY(ltcl_fused, m) {
  // Per-row statistics of S = A C^T * inv_tau (contract: ltcl_fused/engine/contract.py):
  // (lse, pos_sum, fpos, fneg, upos, uneg, top, lrest), [M] each, top int64, the rest in the accumulation dtype.
  m.def(
      "rowstats_fwd(Tensor A, Tensor C, Tensor a_lab, Tensor c_lab, Tensor? bias_same, Tensor? bias_other, "
      "int self_offset, float inv_tau, float gamma, bool focal, bool symmetric=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // symmetric=True (C is A, c_lab equal to a_lab, self_offset 0): the CPU kernels visit each pair of row blocks
  // once; the CUDA kernels run the general forward and one (G + G^T) X backward kernel.
  // Gradient (dA, dC) of sum_ij G_ij s_ij for the G of the contract, recomputing S; symmetric=True returns
  // (dX, an empty [0, D] tensor) with dX the whole gradient of the one input.
  m.def(
      "rowstats_bwd(Tensor A, Tensor C, Tensor a_lab, Tensor c_lab, Tensor? bias_same, Tensor? bias_other, "
      "int self_offset, float inv_tau, float gamma, bool focal, Tensor lse, Tensor top, Tensor lrest, Tensor cpos, Tensor cposf, "
      "Tensor cneg, Tensor r, Tensor rt, bool symmetric=False) -> (Tensor, Tensor)");
}
