// CUDA implementations of the ltcl_fused ops: argument checks, dtype handling and torch's current
// stream around the raw-pointer launchers of rowstats_cuda.cu. Built only against a CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rowstats_cuda.h"

namespace ltcl {
namespace cuda {
namespace {

using at::Tensor;

struct Prep {
  Tensor A, C, al, cl, bs, bo;
  at::ScalarType acc, in_dtype;
  int64_t M, N, D;
};

Prep prepare(const Tensor& A, const Tensor& C, const Tensor& a_lab, const Tensor& c_lab,
             const c10::optional<Tensor>& bias_same, const c10::optional<Tensor>& bias_other, const char* op) {
  TORCH_CHECK(A.is_cuda() && C.is_cuda() && a_lab.is_cuda() && c_lab.is_cuda(), op, ": all tensors must be on CUDA");
  TORCH_CHECK(A.dim() == 2 && C.dim() == 2 && A.size(1) == C.size(1), op, ": A [M, D] and C [N, D] expected, got ",
              A.sizes(), " and ", C.sizes());
  TORCH_CHECK(A.scalar_type() == C.scalar_type() && at::isFloatingType(A.scalar_type()), op,
              ": A and C must share a floating-point dtype");
  TORCH_CHECK(a_lab.numel() == A.size(0) && c_lab.numel() == C.size(0), op, ": one label per row of A and of C");
  TORCH_CHECK(bias_same.has_value() == bias_other.has_value(), op, ": pass both bias_same and bias_other or neither");
  Prep p;
  p.in_dtype = A.scalar_type();
  p.acc = p.in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  p.A = A.to(p.acc).contiguous();
  p.C = C.to(p.acc).contiguous();
  p.al = a_lab.to(at::kLong).contiguous();
  p.cl = c_lab.to(at::kLong).contiguous();
  if (bias_same.has_value()) {
    p.bs = bias_same->to(p.acc).contiguous();
    p.bo = bias_other->to(p.acc).contiguous();
  }
  p.M = A.size(0);
  p.N = C.size(0);
  p.D = A.size(1);
  return p;
}

template <typename T>
const T* opt_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rowstats_fwd_cuda(
    const Tensor& A, const Tensor& C, const Tensor& a_lab, const Tensor& c_lab,
    const c10::optional<Tensor>& bias_same, const c10::optional<Tensor>& bias_other, int64_t self_offset,
    double inv_tau, double gamma, bool focal) {
  const c10::cuda::CUDAGuard guard(A.device());
  Prep p = prepare(A, C, a_lab, c_lab, bias_same, bias_other, "ltcl_fused::rowstats_fwd");
  auto opts = A.options().dtype(p.acc);
  Tensor lse = at::empty({p.M}, opts), pos = at::empty({p.M}, opts), fpos = at::empty({p.M}, opts),
         fneg = at::empty({p.M}, opts), upos = at::empty({p.M}, opts), uneg = at::empty({p.M}, opts),
         top = at::empty({p.M}, A.options().dtype(at::kLong)), lrest = at::empty({p.M}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(p.acc, "rowstats_fwd_cuda", [&] {
    err = rowstats_forward<scalar_t>(
        p.A.data_ptr<scalar_t>(), p.C.data_ptr<scalar_t>(), p.al.data_ptr<int64_t>(), p.cl.data_ptr<int64_t>(),
        opt_ptr<scalar_t>(p.bs), opt_ptr<scalar_t>(p.bo), p.M, p.N, p.D, self_offset,
        static_cast<scalar_t>(inv_tau), static_cast<scalar_t>(gamma), focal, lse.data_ptr<scalar_t>(),
        pos.data_ptr<scalar_t>(), fpos.data_ptr<scalar_t>(), fneg.data_ptr<scalar_t>(), upos.data_ptr<scalar_t>(),
        uneg.data_ptr<scalar_t>(), top.data_ptr<int64_t>(), lrest.data_ptr<scalar_t>(), stream.stream());
  });
  TORCH_CHECK(err == cudaSuccess, "ltcl_fused::rowstats_fwd (CUDA): ", cudaGetErrorString(err));
  return {lse, pos, fpos, fneg, upos, uneg, top, lrest};
}

std::tuple<Tensor, Tensor> rowstats_bwd_cuda(const Tensor& A, const Tensor& C, const Tensor& a_lab,
                                             const Tensor& c_lab, const c10::optional<Tensor>& bias_same,
                                             const c10::optional<Tensor>& bias_other, int64_t self_offset,
                                             double inv_tau, double gamma, bool focal, const Tensor& lse,
                                             const Tensor& top, const Tensor& lrest, const Tensor& cpos,
                                             const Tensor& cposf, const Tensor& cneg, const Tensor& r,
                                             const Tensor& rt) {
  const c10::cuda::CUDAGuard guard(A.device());
  Prep p = prepare(A, C, a_lab, c_lab, bias_same, bias_other, "ltcl_fused::rowstats_bwd");
  auto opts = A.options().dtype(p.acc);
  Tensor dA = at::empty({p.M, p.D}, opts), dC = at::empty({p.N, p.D}, opts);
  Tensor l = lse.to(p.acc).contiguous(), tp = top.to(at::kLong).contiguous(), lr = lrest.to(p.acc).contiguous(),
         a = cpos.to(p.acc).contiguous(), b = cposf.to(p.acc).contiguous(), c = cneg.to(p.acc).contiguous(),
         rr = r.to(p.acc).contiguous(), rtt = rt.to(p.acc).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(p.acc, "rowstats_bwd_cuda", [&] {
    err = rowstats_backward<scalar_t>(
        p.A.data_ptr<scalar_t>(), p.C.data_ptr<scalar_t>(), p.al.data_ptr<int64_t>(), p.cl.data_ptr<int64_t>(),
        opt_ptr<scalar_t>(p.bs), opt_ptr<scalar_t>(p.bo), p.M, p.N, p.D, self_offset,
        static_cast<scalar_t>(inv_tau), static_cast<scalar_t>(gamma), focal, l.data_ptr<scalar_t>(),
        tp.data_ptr<int64_t>(), lr.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), rr.data_ptr<scalar_t>(), rtt.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
        dC.data_ptr<scalar_t>(), stream.stream());
  });
  TORCH_CHECK(err == cudaSuccess, "ltcl_fused::rowstats_bwd (CUDA): ", cudaGetErrorString(err));
  return {dA.to(p.in_dtype), dC.to(p.in_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltcl_fused, CUDA, m) {
  m.impl("rowstats_fwd", &rowstats_fwd_cuda);
  m.impl("rowstats_bwd", &rowstats_bwd_cuda);
}

}  // namespace cuda
}  // namespace ltcl
