// The CPU strip engine shared by the row-statistics kernels (rowstats_cpu.cpp, ssl_cpu.cpp).
//
// Anchors are processed in blocks of bm rows (the bm x N strip of S fits L2); one MKL GEMM per block
// writes the raw strip into a thread-local buffer and a per-row epilogue reduces it (forward) or turns
// it into G in place (backward). The backward works in super-blocks of R rows (G of a super-block ≈
// 32 MB): phase 1, parallel over row blocks, recomputes the strips, forms G and dA = inv_tau·G C;
// phase 2, parallel over column blocks of 256, dC += inv_tau·Gᵀ A. Every GEMM shape and reduction
// order is a function of N and the dtype only, and MKL runs single-threaded inside a worker, so the
// results are bit-identical for any thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace ltcl {
namespace cpu {
namespace strip {

// MKL single-threaded inside a worker: a GEMM then gives the same bits whatever thread runs it.
struct SequentialBlas {
  int prev = 0;
  bool set = false;
  SequentialBlas() {
    if (&MKL_Set_Num_Threads_Local != nullptr) {
      prev = MKL_Set_Num_Threads_Local(1);
      set = true;
    }
  }
  ~SequentialBlas() {
    if (set) MKL_Set_Num_Threads_Local(prev);
  }
};

inline int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return dflt;
  const long long x = std::atoll(v);
  return x > 0 ? static_cast<int64_t>(x) : dflt;
}

// Rows per block: the strip (bm x Npad) within about 2 MB (L2), between 16 and 64 rows.
template <typename T>
int64_t block_rows(int64_t Npad) {
  const int64_t forced = env_int("LTCL_CPU_BLOCK_ROWS", 0);
  if (forced > 0) return forced;
  int64_t bm = 64;
  while (bm > 16 && bm * Npad * static_cast<int64_t>(sizeof(T)) > (int64_t(2) << 20)) bm /= 2;
  return bm;
}

template <typename T>
at::Tensor view2d(const T* p, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {s0, s1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
T hsum(const at::vec::Vectorized<T>& v) {
  alignas(64) T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T s = T(0);
  for (int64_t l = 0; l < at::vec::Vectorized<T>::size(); ++l) s += buf[l];
  return s;
}

// Horizontal max / min of the lanes; a NaN lane gives NaN (as at::vec::maximum / minimum do lane-wise),
// so a NaN logit is never dropped by a reduction.
template <typename T>
T hmax(const at::vec::Vectorized<T>& v) {
  alignas(64) T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T s = buf[0];
  for (int64_t l = 1; l < at::vec::Vectorized<T>::size(); ++l) s = (buf[l] > s || buf[l] != buf[l]) ? buf[l] : s;
  return s;
}

template <typename T>
T hmin(const at::vec::Vectorized<T>& v) {
  alignas(64) T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T s = buf[0];
  for (int64_t l = 1; l < at::vec::Vectorized<T>::size(); ++l) s = (buf[l] < s || buf[l] != buf[l]) ? buf[l] : s;
  return s;
}

// out[rows x N] (leading dimension Npad) = A[r0 : r0 + rows] C^T. ``P`` has A, C, N, D, Npad.
template <typename T, typename Prob>
void gemm_strip(const Prob& P, int64_t r0, int64_t rows, T* out) {
  if (P.D == 0) {
    for (int64_t r = 0; r < rows; ++r) std::fill(out + r * P.Npad, out + r * P.Npad + P.N, T(0));
    return;
  }
  at::Tensor o = view2d(out, rows, P.N, P.Npad, 1);
  at::mm_out(o, view2d(P.A + r0 * P.D, rows, P.D, P.D, 1), view2d(P.C, P.N, P.D, P.D, 1).t());
}

// Forward driver: row(scratch, i, x) reduces row i's raw strip x; make() builds a worker's scratch.
template <typename T, typename Prob, typename MakeScratch, typename Row>
void forward_strips(const Prob& P, MakeScratch make, Row row) {
  const int64_t bm = block_rows<T>(P.Npad);
  const int64_t nblk = (P.M + bm - 1) / bm;
  at::parallel_for(0, nblk, 0, [&](int64_t b0, int64_t b1) {
    SequentialBlas seq;
    std::vector<T> strip(static_cast<size_t>(bm * P.Npad));
    auto scratch = make();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * bm, rows = std::min(bm, P.M - r0);
      gemm_strip<T>(P, r0, rows, strip.data());
      for (int64_t ii = 0; ii < rows; ++ii) row(scratch, r0 + ii, strip.data() + ii * P.Npad);
    }
  });
}

// Backward driver: row(scratch, i, x) turns row i's raw strip x into G_i in place; dA, dC as above.
template <typename T, typename Prob, typename MakeScratch, typename Row>
void backward_strips(const Prob& P, T* dA, T* dC, MakeScratch make, Row row) {
  const int64_t M = P.M, N = P.N, D = P.D;
  const int64_t bm = block_rows<T>(P.Npad);
  // super-block rows: a function of N and the dtype only, never of the thread count (the dC sums depend on it)
  const int64_t sb_budget = env_int("LTCL_CPU_SUPER_BYTES", int64_t(32) << 20);
  const int64_t R = std::max(bm, (sb_budget / (P.Npad * static_cast<int64_t>(sizeof(T))) / bm) * bm);
  const int64_t bn = 256;
  std::vector<T> gsb(static_cast<size_t>(std::min(R, M) * P.Npad));
  const int64_t ncb = (N + bn - 1) / bn;
  for (int64_t sb0 = 0; sb0 < M; sb0 += R) {
    const int64_t rows_sb = std::min(R, M - sb0);
    const int64_t nblk = (rows_sb + bm - 1) / bm;
    at::parallel_for(0, nblk, 0, [&](int64_t b0, int64_t b1) {
      SequentialBlas seq;
      auto scratch = make();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = sb0 + b * bm, rows = std::min(bm, M - r0);
        T* g = gsb.data() + (b * bm) * P.Npad;
        gemm_strip<T>(P, r0, rows, g);
        for (int64_t ii = 0; ii < rows; ++ii) row(scratch, r0 + ii, g + ii * P.Npad);
        at::Tensor out = view2d(dA + r0 * D, rows, D, D, 1);
        at::addmm_out(out, out, view2d<T>(g, rows, N, P.Npad, 1), view2d(P.C, N, D, D, 1), /*beta=*/0,
                      /*alpha=*/P.inv_tau);
      }
    });
    at::parallel_for(0, ncb, 0, [&](int64_t c0b, int64_t c1b) {
      SequentialBlas seq;
      for (int64_t cb = c0b; cb < c1b; ++cb) {
        const int64_t c0 = cb * bn, cols = std::min(bn, N - c0);
        at::Tensor out = view2d(dC + c0 * D, cols, D, D, 1);
        at::addmm_out(out, out, view2d<T>(gsb.data() + c0, cols, rows_sb, 1, P.Npad),
                      view2d(P.A + sb0 * D, rows_sb, D, D, 1), /*beta=*/sb0 == 0 ? 0 : 1, /*alpha=*/P.inv_tau);
      }
    });
  }
}

}  // namespace strip
}  // namespace cpu
}  // namespace ltcl
