// Streaming hard-pair mining for ResCom (SPEC.md section 4) on the CPU.
//
// Contract (ltcl_fused/backends/mining_torch.py): per anchor i, pos_idx[i] = the k_pos same-class keys with the
// SMALLEST similarity A_i . K_j (ascending), neg_idx[i] = the k_neg other-class keys with the LARGEST
// similarity (descending), int64, -1 in the trailing slots of a row with fewer candidates.
//
// The keys are swept in tiles of T keys. Per tile one GEMM (at::mm, all threads) writes the M x T strip of
// similarities; then, parallel over rows (at::parallel_for), each row scans its strip while it is in cache
// and keeps a per-row candidate buffer of capacity k + T with a threshold: a candidate enters only if it
// beats the row's current k-th best; a full buffer is cut back to its best k by partial selection
// (std::nth_element). Memory: O(M * (k + T)); the M x Q similarity matrix never exists.
// Similarities are accumulated in float (double for double inputs). Ties are broken by the smaller key
// index, so the result does not depend on the tile size or the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace ltcl {
namespace cpu {
namespace {

using at::Tensor;

template <typename acc_t>
struct Cand {
  acc_t v;      // value to maximise (-s for positives, s for negatives)
  int64_t j;    // key index
};

// a is better than b: larger value, then smaller index (a strict weak order). NaN counts as larger than
// every number (as in torch.topk), so a NaN similarity is selected, never dropped (and never breaks the order).
template <typename acc_t>
inline bool better(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  const bool na = a.v != a.v, nb = b.v != b.v;
  if (na || nb) return na && (!nb || a.j < b.j);
  return a.v > b.v || (a.v == b.v && a.j < b.j);
}

// Per-row running top-k: a buffer with a threshold, cut back to k by partial selection when full.
template <typename acc_t>
struct RowTopK {
  std::vector<Cand<acc_t>> buf;
  bool has_thr = false;   // true once the buffer has been cut to exactly k: thr is the k-th best
  Cand<acc_t> thr{};

  inline void push(acc_t v, int64_t j, int64_t k, int64_t cap) {
    Cand<acc_t> c{v, j};
    if (has_thr && !better(c, thr)) return;
    buf.push_back(c);
    if (static_cast<int64_t>(buf.size()) >= cap) cut(k);
  }

  void cut(int64_t k) {
    if (static_cast<int64_t>(buf.size()) <= k) return;
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), better<acc_t>);
    buf.resize(k);
    thr = buf[k - 1];  // nth_element puts the k-th best at position k-1 and only better ones before it
    has_thr = true;
  }

  void finish(int64_t k, int64_t* out) {
    cut(k);
    std::sort(buf.begin(), buf.end(), better<acc_t>);
    int64_t n = static_cast<int64_t>(buf.size());
    for (int64_t t = 0; t < k; ++t) out[t] = t < n ? buf[t].j : -1;
  }
};

template <typename acc_t>
std::tuple<Tensor, Tensor> mine_impl(const Tensor& A, const Tensor& a_lab, const Tensor& K, const Tensor& k_lab,
                                     int64_t k_pos, int64_t k_neg) {
  const int64_t M = A.size(0), Q = K.size(0);
  auto opts = A.options().dtype(at::kLong);
  Tensor pos = at::full({M, k_pos}, -1, opts);
  Tensor neg = at::full({M, k_neg}, -1, opts);
  if (M == 0 || Q == 0 || (k_pos == 0 && k_neg == 0)) return {pos, neg};

  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  Tensor Aacc = A.to(acc).contiguous();
  // keys per tile: the M x T strip stays around 2^20 elements (4-8 MB), at least 256 keys
  const int64_t T = std::min<int64_t>(Q, std::max<int64_t>(256, (int64_t(1) << 20) / std::max<int64_t>(M, 1)));
  const int64_t cap_pos = k_pos + T, cap_neg = k_neg + T;
  std::vector<RowTopK<acc_t>> P(k_pos ? M : 0), N(k_neg ? M : 0);
  for (auto& r : P) r.buf.reserve(cap_pos);
  for (auto& r : N) r.buf.reserve(cap_neg);
  const int64_t* al = a_lab.data_ptr<int64_t>();
  const int64_t* kl = k_lab.data_ptr<int64_t>();

  for (int64_t q0 = 0; q0 < Q; q0 += T) {
    const int64_t t = std::min(T, Q - q0);
    Tensor S = at::mm(Aacc, K.narrow(0, q0, t).to(acc).t()).contiguous();  // [M, t]
    const acc_t* s = S.data_ptr<acc_t>();
    at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const acc_t* row = s + i * t;
        const int64_t y = al[i];
        for (int64_t jj = 0; jj < t; ++jj) {
          const int64_t j = q0 + jj;
          if (kl[j] == y) {
            if (k_pos) P[i].push(-row[jj], j, k_pos, cap_pos);
          } else if (k_neg) {
            N[i].push(row[jj], j, k_neg, cap_neg);
          }
        }
      }
    });
  }
  int64_t* po = pos.data_ptr<int64_t>();
  int64_t* no = neg.data_ptr<int64_t>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      if (k_pos) P[i].finish(k_pos, po + i * k_pos);
      if (k_neg) N[i].finish(k_neg, no + i * k_neg);
    }
  });
  return {pos, neg};
}

std::tuple<Tensor, Tensor> topk_mining_cpu(const Tensor& anchors, const Tensor& anchor_labels, const Tensor& keys,
                                           const Tensor& key_labels, int64_t k_pos, int64_t k_neg) {
  TORCH_CHECK(anchors.dim() == 2 && keys.dim() == 2, "topk_mining: anchors and keys must be 2-D, got ",
              anchors.sizes(), " and ", keys.sizes());
  TORCH_CHECK(anchors.size(1) == keys.size(1), "topk_mining: anchors and keys must share D");
  TORCH_CHECK(anchors.scalar_type() == keys.scalar_type() && at::isFloatingType(anchors.scalar_type()),
              "topk_mining: anchors and keys must share a floating dtype");
  TORCH_CHECK(anchor_labels.scalar_type() == at::kLong && key_labels.scalar_type() == at::kLong,
              "topk_mining: labels must be int64");
  TORCH_CHECK(anchor_labels.numel() == anchors.size(0) && key_labels.numel() == keys.size(0),
              "topk_mining: one label per anchor and per key");
  TORCH_CHECK(k_pos >= 0 && k_neg >= 0, "topk_mining: k_pos and k_neg must be >= 0");
  Tensor al = anchor_labels.contiguous(), kl = key_labels.contiguous();
  if (anchors.scalar_type() == at::kDouble) return mine_impl<double>(anchors, al, keys.contiguous(), kl, k_pos, k_neg);
  return mine_impl<float>(anchors, al, keys.contiguous(), kl, k_pos, k_neg);
}

}  // namespace
}  // namespace cpu
}  // namespace ltcl

TORCH_LIBRARY_FRAGMENT(ltcl_fused, m) {
  // Hard-pair mining (ResCom): (pos_idx [M, k_pos], neg_idx [M, k_neg]) int64, -1 = fewer candidates.
  m.def("topk_mining(Tensor anchors, Tensor anchor_labels, Tensor keys, Tensor key_labels, int k_pos, int k_neg)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ltcl_fused, CPU, m) { m.impl("topk_mining", &ltcl::cpu::topk_mining_cpu); }
