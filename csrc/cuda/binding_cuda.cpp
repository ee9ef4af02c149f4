// CUDA implementations of the ltcl_fused ops: argument checks, dtype handling and torch's current
// stream around the raw-pointer launchers of rowstats_cuda.cu, mining_cuda.cu and ssl_cuda.cu.
// Built only against a CUDA torch; the tests also build it with -DLTCL_CUDA_EMU for the CPU emulator of
// csrc/cuda_emu (CPU tensors, the ops registered as ltcl_fused_cuda_emu::*, tests/_cuda_emu.py).
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef LTCL_CUDA_EMU
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../symmetric_check.h"
#include "mining_cuda.h"
#include "rowstats_cuda.h"
#include "ssl_cuda.h"

namespace ltcl {
namespace cuda {
namespace {

using at::Tensor;

// The device the kernels run on: a CUDA GPU, or under LTCL_CUDA_EMU the emulator (CPU tensors, no stream).
#ifdef LTCL_CUDA_EMU
constexpr const char* kDevice = "CPU (the CUDA emulator)";
bool on_device(const Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
#else
constexpr const char* kDevice = "CUDA";
bool on_device(const Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
#endif

struct Prep {
  Tensor A, C, al, cl, bs, bo;
  at::ScalarType acc, in_dtype;
  int64_t M, N, D;
};

Prep prepare(const Tensor& A, const Tensor& C, const Tensor& a_lab, const Tensor& c_lab,
             const c10::optional<Tensor>& bias_same, const c10::optional<Tensor>& bias_other, const char* op) {
  TORCH_CHECK(on_device(A) && on_device(C) && on_device(a_lab) && on_device(c_lab), op, ": all tensors must be on ",
              kDevice);
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
  p.C = ltcl::same_operand(A, C) ? p.A : C.to(p.acc).contiguous();  // C is A: one converted copy
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
    double inv_tau, double gamma, bool focal, bool symmetric) {
  // symmetric=True: the general forward kernel (one row-parallel pass over C = A); only the backward differs
  if (symmetric) {
    check_symmetric_operands(A, C, self_offset, "ltcl_fused::rowstats_fwd");
    check_symmetric_labels(a_lab, c_lab, "ltcl_fused::rowstats_fwd");
  }
  const DeviceGuard guard(A.device());
  Prep p = prepare(A, C, a_lab, c_lab, bias_same, bias_other, "ltcl_fused::rowstats_fwd");
  auto opts = A.options().dtype(p.acc);
  Tensor lse = at::empty({p.M}, opts), pos = at::empty({p.M}, opts), fpos = at::empty({p.M}, opts),
         fneg = at::empty({p.M}, opts), upos = at::empty({p.M}, opts), uneg = at::empty({p.M}, opts),
         top = at::empty({p.M}, A.options().dtype(at::kLong)), lrest = at::empty({p.M}, opts);
  const cudaStream_t stream = current_stream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(p.acc, "rowstats_fwd_cuda", [&] {
    err = rowstats_forward<scalar_t>(
        p.A.data_ptr<scalar_t>(), p.C.data_ptr<scalar_t>(), p.al.data_ptr<int64_t>(), p.cl.data_ptr<int64_t>(),
        opt_ptr<scalar_t>(p.bs), opt_ptr<scalar_t>(p.bo), p.M, p.N, p.D, self_offset,
        static_cast<scalar_t>(inv_tau), static_cast<scalar_t>(gamma), focal, lse.data_ptr<scalar_t>(),
        pos.data_ptr<scalar_t>(), fpos.data_ptr<scalar_t>(), fneg.data_ptr<scalar_t>(), upos.data_ptr<scalar_t>(),
        uneg.data_ptr<scalar_t>(), top.data_ptr<int64_t>(), lrest.data_ptr<scalar_t>(), stream);
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
                                             const Tensor& rt, bool symmetric) {
  const char* op = "ltcl_fused::rowstats_bwd";
  if (symmetric) {
    check_symmetric_operands(A, C, self_offset, op);
    check_symmetric_labels(a_lab, c_lab, op);
  }
  const DeviceGuard guard(A.device());
  Prep p = prepare(A, C, a_lab, c_lab, bias_same, bias_other, op);
  auto opts = A.options().dtype(p.acc);
  // symmetric: (dX, an empty [0, D] tensor), dX = (G + G^T) X / tau the gradient through both A and C
  Tensor dA = at::empty({p.M, p.D}, opts), dC = at::empty({symmetric ? int64_t(0) : p.N, p.D}, opts);
  Tensor l = lse.to(p.acc).contiguous(), tp = top.to(at::kLong).contiguous(), lr = lrest.to(p.acc).contiguous(),
         a = cpos.to(p.acc).contiguous(), b = cposf.to(p.acc).contiguous(), c = cneg.to(p.acc).contiguous(),
         rr = r.to(p.acc).contiguous(), rtt = rt.to(p.acc).contiguous();
  const cudaStream_t stream = current_stream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(p.acc, "rowstats_bwd_cuda", [&] {
    if (symmetric) {
      err = rowstats_backward_symmetric<scalar_t>(
          p.A.data_ptr<scalar_t>(), p.al.data_ptr<int64_t>(), opt_ptr<scalar_t>(p.bs), opt_ptr<scalar_t>(p.bo), p.M,
          p.D, static_cast<scalar_t>(inv_tau), static_cast<scalar_t>(gamma), focal, l.data_ptr<scalar_t>(),
          tp.data_ptr<int64_t>(), lr.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
          c.data_ptr<scalar_t>(), rr.data_ptr<scalar_t>(), rtt.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
          stream);
      return;
    }
    err = rowstats_backward<scalar_t>(
        p.A.data_ptr<scalar_t>(), p.C.data_ptr<scalar_t>(), p.al.data_ptr<int64_t>(), p.cl.data_ptr<int64_t>(),
        opt_ptr<scalar_t>(p.bs), opt_ptr<scalar_t>(p.bo), p.M, p.N, p.D, self_offset,
        static_cast<scalar_t>(inv_tau), static_cast<scalar_t>(gamma), focal, l.data_ptr<scalar_t>(),
        tp.data_ptr<int64_t>(), lr.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), rr.data_ptr<scalar_t>(), rtt.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
        dC.data_ptr<scalar_t>(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, "ltcl_fused::rowstats_bwd (CUDA): ", cudaGetErrorString(err));
  return {dA.to(p.in_dtype), dC.to(p.in_dtype)};
}

// ---------------------------------------------------------------- hard-pair mining (csrc/cuda/mining_cuda.cu)

std::tuple<Tensor, Tensor> topk_mining_cuda(const Tensor& anchors, const Tensor& anchor_labels, const Tensor& keys,
                                            const Tensor& key_labels, int64_t k_pos, int64_t k_neg) {
  const char* op = "ltcl_fused::topk_mining";
  TORCH_CHECK(on_device(anchors) && on_device(keys) && on_device(anchor_labels) && on_device(key_labels), op,
              ": all tensors must be on ", kDevice);
  TORCH_CHECK(anchors.dim() == 2 && keys.dim() == 2, op, ": anchors and keys must be 2-D, got ", anchors.sizes(),
              " and ", keys.sizes());
  TORCH_CHECK(anchors.size(1) == keys.size(1), op, ": anchors and keys must share D");
  TORCH_CHECK(anchors.scalar_type() == keys.scalar_type() && at::isFloatingType(anchors.scalar_type()), op,
              ": anchors and keys must share a floating dtype");
  TORCH_CHECK(anchor_labels.scalar_type() == at::kLong && key_labels.scalar_type() == at::kLong, op,
              ": labels must be int64");
  TORCH_CHECK(anchor_labels.numel() == anchors.size(0) && key_labels.numel() == keys.size(0), op,
              ": one label per anchor and per key");
  TORCH_CHECK(k_pos >= 0 && k_neg >= 0, op, ": k_pos and k_neg must be >= 0");
  const DeviceGuard guard(anchors.device());
  const int64_t M = anchors.size(0), Q = keys.size(0), D = anchors.size(1);
  auto opts = anchors.options().dtype(at::kLong);
  Tensor pos = at::full({M, k_pos}, -1, opts), neg = at::full({M, k_neg}, -1, opts);
  if (M == 0 || Q == 0 || (k_pos == 0 && k_neg == 0)) return {pos, neg};
  const auto acc = anchors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor A = anchors.to(acc).contiguous(), K = keys.to(acc).contiguous();
  Tensor al = anchor_labels.contiguous(), kl = key_labels.contiguous();
  const cudaStream_t stream = current_stream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(acc, "topk_mining_cuda", [&] {
    const size_t bytes = topk_mining_workspace_bytes<scalar_t>(M, k_pos, k_neg);
    Tensor ws = at::empty({static_cast<int64_t>(bytes)}, anchors.options().dtype(at::kByte));
    err = topk_mining<scalar_t>(A.data_ptr<scalar_t>(), al.data_ptr<int64_t>(), K.data_ptr<scalar_t>(),
                                kl.data_ptr<int64_t>(), M, Q, D, k_pos, k_neg, pos.data_ptr<int64_t>(),
                                neg.data_ptr<int64_t>(), ws.data_ptr(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): ", cudaGetErrorString(err));
  return {pos, neg};
}

// ---------------------------------------------------------------- SSL row statistics (csrc/cuda/ssl_cuda.cu)

struct SSLPrep {
  Tensor A, C, partner;
  at::ScalarType acc, in_dtype;
  int64_t M, N, D;
  SSLParams params;
};

SSLPrep ssl_prepare(const Tensor& A, const Tensor& C, const Tensor& partner, int64_t self_offset, double inv_tau,
                    c10::ArrayRef<double> scales, bool exclude_partner, bool include_self, int64_t filter,
                    double lower, double upper, c10::ArrayRef<double> bayes, const char* op) {
  TORCH_CHECK(on_device(A) && on_device(C) && on_device(partner), op, ": all tensors must be on ", kDevice);
  TORCH_CHECK(A.dim() == 2 && C.dim() == 2, op, ": A and C must be 2-D, got ", A.sizes(), " and ", C.sizes());
  TORCH_CHECK(A.size(1) == C.size(1), op, ": A and C need the same feature size, got ", A.sizes(), " and ",
              C.sizes());
  TORCH_CHECK(A.scalar_type() == C.scalar_type(), op, ": A and C must share a dtype");
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), op, ": floating-point features required, got ", A.scalar_type());
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == A.size(0), op, ": `partner` must have shape [M]");
  TORCH_CHECK(!scales.empty() && scales.size() <= static_cast<size_t>(kSSLMaxScales), op, ": 1 to ",
              kSSLMaxScales, " scales expected, got ", scales.size());
  TORCH_CHECK(filter >= 0 && filter <= 2, op, ": filter must be 0 (none), 1 (both) or 2 (low)");
  TORCH_CHECK(bayes.empty() || (bayes.size() == 3 && scales.size() == 1), op,
              ": `bayes` is [] or [alpha, beta, tau_plus] with one scale");
  TORCH_CHECK(C.size(0) < (int64_t(1) << 31), op, ": fewer than 2^31 contrast columns required");
  SSLPrep pp;
  pp.in_dtype = A.scalar_type();
  pp.acc = pp.in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  pp.M = A.size(0);
  pp.N = C.size(0);
  pp.D = A.size(1);
  pp.A = A.to(pp.acc).contiguous();
  pp.C = ltcl::same_operand(A, C) ? pp.A : C.to(pp.acc).contiguous();  // C is A: one converted copy
  pp.partner = partner.to(at::kLong).contiguous();
  SSLParams& p = pp.params;
  p.self_offset = self_offset;
  p.inv_tau = inv_tau;
  p.num_scales = static_cast<int>(scales.size());
  for (int k = 0; k < kSSLMaxScales; ++k) p.scales[k] = k < p.num_scales ? scales[k] : 0.0;
  p.exclude_partner = exclude_partner;
  p.include_self = include_self;
  p.filter = static_cast<int>(filter);
  p.lower = lower;
  p.upper = upper;
  p.bayes = !bayes.empty();
  p.alpha = p.bayes ? bayes[0] : 0.0;
  p.beta = p.bayes ? bayes[1] : 0.0;
  p.tau_plus = p.bayes ? bayes[2] : 0.0;
  return pp;
}

// The rank reference of the ranked ops (column blocks), checked and in the accumulation dtype.
struct SSLRankPrep {
  Tensor ref, n;
};

SSLRankPrep ssl_rank_prepare(const SSLPrep& pp, c10::ArrayRef<double> bayes, const Tensor& rank_ref,
                             const Tensor& rank_n, const char* op) {
  TORCH_CHECK(!bayes.empty(), op, ": a rank reference is only used with the Bayesian weights (`bayes` given)");
  TORCH_CHECK(on_device(rank_ref) && on_device(rank_n), op, ": rank_ref and rank_n must be on ", kDevice);
  TORCH_CHECK(rank_ref.dim() == 2 && rank_ref.size(0) == pp.M, op, ": rank_ref must have shape [M, L], got ",
              rank_ref.sizes());
  TORCH_CHECK(rank_n.dim() == 1 && rank_n.size(0) == pp.M, op, ": rank_n must have shape [M]");
  SSLRankPrep r;
  r.ref = rank_ref.to(pp.acc).contiguous();
  r.n = rank_n.to(at::kLong).contiguous();
  if (pp.M > 0) {
    TORCH_CHECK(r.n.min().item<int64_t>() >= 0 && r.n.max().item<int64_t>() <= rank_ref.size(1), op,
                ": rank_n must lie in [0, L]");
  }
  return r;
}

// Device workspace of the Bayesian rank pass (empty when not needed).
template <typename T>
Tensor ssl_workspace(const SSLPrep& pp, bool has_ref) {
  const size_t bytes = ssl_workspace_bytes<T>(pp.M, pp.N, pp.params, has_ref);
  return at::empty({static_cast<int64_t>(bytes)}, pp.A.options().dtype(at::kByte));
}

std::tuple<Tensor, Tensor, Tensor> ssl_fwd_run(const Tensor& A, const Tensor& C, const Tensor& partner,
                                               int64_t self_offset, double inv_tau, c10::ArrayRef<double> scales,
                                               bool exclude_partner, bool include_self, int64_t filter,
                                               double lower, double upper, c10::ArrayRef<double> bayes,
                                               const Tensor* rank_ref, const Tensor* rank_n, const char* op) {
  const DeviceGuard guard(A.device());
  SSLPrep pp = ssl_prepare(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter,
                           lower, upper, bayes, op);
  SSLRankPrep rp;
  if (rank_ref != nullptr) rp = ssl_rank_prepare(pp, bayes, *rank_ref, *rank_n, op);
  const int64_t K = static_cast<int64_t>(scales.size());
  auto opts = A.options().dtype(pp.acc);
  Tensor lse = at::empty({K, pp.M}, opts), pos = at::empty({pp.M}, opts), pos_in = at::empty({pp.M}, opts);
  const cudaStream_t stream = current_stream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(pp.acc, "ssl_fwd_cuda", [&] {
    const SSLRankRef<scalar_t> rr{rp.ref.defined() ? rp.ref.data_ptr<scalar_t>() : nullptr,
                                  rp.n.defined() ? rp.n.data_ptr<int64_t>() : nullptr,
                                  rp.ref.defined() ? rp.ref.size(1) : 0};
    Tensor ws = ssl_workspace<scalar_t>(pp, rank_ref != nullptr);
    err = ssl_forward<scalar_t>(pp.A.data_ptr<scalar_t>(), pp.C.data_ptr<scalar_t>(), pp.partner.data_ptr<int64_t>(),
                                pp.M, pp.N, pp.D, pp.params, rank_ref != nullptr ? &rr : nullptr, ws.data_ptr(),
                                static_cast<size_t>(ws.numel()), lse.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(),
                                pos_in.data_ptr<scalar_t>(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): ", cudaGetErrorString(err));
  return {lse, pos, pos_in};
}

std::tuple<Tensor, Tensor, Tensor> ssl_fwd_cuda(const Tensor& A, const Tensor& C, const Tensor& partner,
                                                int64_t self_offset, double inv_tau, c10::ArrayRef<double> scales,
                                                bool exclude_partner, bool include_self, int64_t filter,
                                                double lower, double upper, c10::ArrayRef<double> bayes,
                                                bool symmetric) {
  // symmetric=True: the general forward kernel (one row-parallel pass over C = A); only the backward differs
  if (symmetric) {
    check_symmetric_operands(A, C, self_offset, "ltcl_fused::ssl_fwd");
    check_symmetric_no_bayes(bayes, "ltcl_fused::ssl_fwd");
  }
  return ssl_fwd_run(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower, upper,
                     bayes, nullptr, nullptr, "ltcl_fused::ssl_fwd");
}

std::tuple<Tensor, Tensor, Tensor> ssl_fwd_ranked_cuda(const Tensor& A, const Tensor& C, const Tensor& partner,
                                                       int64_t self_offset, double inv_tau,
                                                       c10::ArrayRef<double> scales, bool exclude_partner,
                                                       bool include_self, int64_t filter, double lower, double upper,
                                                       c10::ArrayRef<double> bayes, const Tensor& rank_ref,
                                                       const Tensor& rank_n) {
  return ssl_fwd_run(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower, upper,
                     bayes, &rank_ref, &rank_n, "ltcl_fused::ssl_fwd_ranked");
}

std::tuple<Tensor, Tensor> ssl_bwd_run(const Tensor& A, const Tensor& C, const Tensor& partner, int64_t self_offset,
                                       double inv_tau, c10::ArrayRef<double> scales, bool exclude_partner,
                                       bool include_self, int64_t filter, double lower, double upper,
                                       c10::ArrayRef<double> bayes, const Tensor* rank_ref, const Tensor* rank_n,
                                       const Tensor& lse, const Tensor& coef, const Tensor& cpos, const char* op,
                                       bool symmetric = false) {
  if (symmetric) {
    check_symmetric_operands(A, C, self_offset, op);
    check_symmetric_no_bayes(bayes, op);
  }
  const DeviceGuard guard(A.device());
  SSLPrep pp = ssl_prepare(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter,
                           lower, upper, bayes, op);
  SSLRankPrep rp;
  if (rank_ref != nullptr) rp = ssl_rank_prepare(pp, bayes, *rank_ref, *rank_n, op);
  const int64_t K = static_cast<int64_t>(scales.size());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == K && lse.size(1) == pp.M && coef.sizes() == lse.sizes(),
              "ltcl_fused::ssl_bwd: lse and coef must have shape [K, M]");
  TORCH_CHECK(cpos.dim() == 1 && cpos.size(0) == pp.M, "ltcl_fused::ssl_bwd: cpos must have shape [M]");
  auto opts = A.options().dtype(pp.acc);
  // symmetric: (dX, an empty [0, D] tensor), dX = (G + G^T) X / tau the gradient through both A and C
  Tensor dA = at::empty({pp.M, pp.D}, opts), dC = at::empty({symmetric ? int64_t(0) : pp.N, pp.D}, opts);
  Tensor l = lse.to(pp.acc).contiguous(), cf = coef.to(pp.acc).contiguous(), cp = cpos.to(pp.acc).contiguous();
  const cudaStream_t stream = current_stream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(pp.acc, "ssl_bwd_cuda", [&] {
    if (symmetric) {
      err = ssl_backward_symmetric<scalar_t>(pp.A.data_ptr<scalar_t>(), pp.partner.data_ptr<int64_t>(), pp.M, pp.D,
                                             pp.params, l.data_ptr<scalar_t>(), cf.data_ptr<scalar_t>(),
                                             cp.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(), stream);
      return;
    }
    const SSLRankRef<scalar_t> rr{rp.ref.defined() ? rp.ref.data_ptr<scalar_t>() : nullptr,
                                  rp.n.defined() ? rp.n.data_ptr<int64_t>() : nullptr,
                                  rp.ref.defined() ? rp.ref.size(1) : 0};
    Tensor ws = ssl_workspace<scalar_t>(pp, rank_ref != nullptr);
    err = ssl_backward<scalar_t>(pp.A.data_ptr<scalar_t>(), pp.C.data_ptr<scalar_t>(),
                                 pp.partner.data_ptr<int64_t>(), pp.M, pp.N, pp.D, pp.params,
                                 rank_ref != nullptr ? &rr : nullptr, ws.data_ptr(), static_cast<size_t>(ws.numel()),
                                 l.data_ptr<scalar_t>(), cf.data_ptr<scalar_t>(), cp.data_ptr<scalar_t>(),
                                 dA.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): ", cudaGetErrorString(err));
  return {dA.to(pp.in_dtype), dC.to(pp.in_dtype)};
}

std::tuple<Tensor, Tensor> ssl_bwd_cuda(const Tensor& A, const Tensor& C, const Tensor& partner, int64_t self_offset,
                                        double inv_tau, c10::ArrayRef<double> scales, bool exclude_partner,
                                        bool include_self, int64_t filter, double lower, double upper,
                                        c10::ArrayRef<double> bayes, const Tensor& lse, const Tensor& coef,
                                        const Tensor& cpos, bool symmetric) {
  return ssl_bwd_run(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower, upper,
                     bayes, nullptr, nullptr, lse, coef, cpos, "ltcl_fused::ssl_bwd", symmetric);
}

std::tuple<Tensor, Tensor> ssl_bwd_ranked_cuda(const Tensor& A, const Tensor& C, const Tensor& partner,
                                               int64_t self_offset, double inv_tau, c10::ArrayRef<double> scales,
                                               bool exclude_partner, bool include_self, int64_t filter, double lower,
                                               double upper, c10::ArrayRef<double> bayes, const Tensor& rank_ref,
                                               const Tensor& rank_n, const Tensor& lse, const Tensor& coef,
                                               const Tensor& cpos) {
  return ssl_bwd_run(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower, upper,
                     bayes, &rank_ref, &rank_n, lse, coef, cpos, "ltcl_fused::ssl_bwd_ranked");
}

// One column block's row-sorted set values (the rank sweep of ltcl_fused.distributed's ring).
std::tuple<Tensor, Tensor> ssl_set_values_cuda(const Tensor& A, const Tensor& C, const Tensor& partner,
                                               int64_t self_offset, double inv_tau, bool exclude_partner,
                                               bool include_self, int64_t filter, double lower, double upper) {
  const char* op = "ltcl_fused::ssl_set_values";
  const DeviceGuard guard(A.device());
  const double one[1] = {1.0};
  SSLPrep pp = ssl_prepare(A, C, partner, self_offset, inv_tau, c10::ArrayRef<double>(one, 1), exclude_partner,
                           include_self, filter, lower, upper, c10::ArrayRef<double>(), op);
  pp.params.bayes = true;  // the rank pass alone (its workspace); the weights are not evaluated
  Tensor vals = at::empty({pp.M, pp.N}, A.options().dtype(pp.acc));
  Tensor cnt = at::zeros({pp.M}, A.options().dtype(at::kLong));
  const cudaStream_t stream = current_stream();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(pp.acc, "ssl_set_values_cuda", [&] {
    Tensor ws = ssl_workspace<scalar_t>(pp, false);
    err = ssl_set_values<scalar_t>(pp.A.data_ptr<scalar_t>(), pp.C.data_ptr<scalar_t>(),
                                   pp.partner.data_ptr<int64_t>(), pp.M, pp.N, pp.D, pp.params, ws.data_ptr(),
                                   static_cast<size_t>(ws.numel()), vals.data_ptr<scalar_t>(),
                                   cnt.data_ptr<int64_t>(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): ", cudaGetErrorString(err));
  return {vals, cnt};
}

// Every op of this file, handed to reg(name, fn).
template <typename Reg>
void for_each_op(Reg&& reg) {
  reg("rowstats_fwd", &rowstats_fwd_cuda);
  reg("rowstats_bwd", &rowstats_bwd_cuda);
  reg("topk_mining", &topk_mining_cuda);
  reg("ssl_fwd", &ssl_fwd_cuda);
  reg("ssl_bwd", &ssl_bwd_cuda);
  reg("ssl_fwd_ranked", &ssl_fwd_ranked_cuda);
  reg("ssl_bwd_ranked", &ssl_bwd_ranked_cuda);
  reg("ssl_set_values", &ssl_set_values_cuda);
}

}  // namespace

#ifdef LTCL_CUDA_EMU
// The emulator's own namespace, schemas inferred from the C++ signatures (every argument then has to be passed)
TORCH_LIBRARY(ltcl_fused_cuda_emu, m) {
  for_each_op([&](const char* name, auto fn) { m.def(name, fn); });
}
#else
TORCH_LIBRARY_IMPL(ltcl_fused, CUDA, m) {
  for_each_op([&](const char* name, auto fn) { m.impl(name, fn); });
}
#endif

}  // namespace cuda
}  // namespace ltcl
