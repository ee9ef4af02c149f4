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
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <numeric>
#include <thread>
#include <utility>
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

// f(std::true_type{}) or f(std::false_type{}): a loop compiled once per value of a runtime flag (the fused
// tiles' variants), the branch taken once per call instead of once per vector
template <typename F>
inline decltype(auto) with_flag(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

inline int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return dflt;
  const long long x = std::atoll(v);
  return x > 0 ? static_cast<int64_t>(x) : dflt;
}

// Rows per block: 64, halved (down to 16) while the strip (bm x Npad) exceeds 16 MB. A strip of fewer rows
// keeps its row pass in L2 but makes a skinny GEMM: at N = 32768, D = 128 (fp32, one thread, Intel) the
// general forward took 3.9 s with the 16 rows of a 2 MB strip and 2.4 s with 64 (16384: 0.72 / 0.58 s;
// 65536: 15.3 / 9.8 s, one GEMM-equivalent being 10.4 s there).
template <typename T>
int64_t block_rows(int64_t Npad) {
  const int64_t forced = env_int("LTCL_CPU_BLOCK_ROWS", 0);
  if (forced > 0) return forced;
  int64_t bm = 64;
  while (bm > 16 && bm * Npad * static_cast<int64_t>(sizeof(T)) > (int64_t(16) << 20)) bm /= 2;
  return bm;
}

template <typename T>
at::Tensor view2d(const T* p, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {s0, s1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512 horizontal reductions (fixed tree order: deterministic); hmax keeps the NaN rule below.
inline float hsum(const at::vec::Vectorized<float>& v) { return _mm512_reduce_add_ps(v); }
inline double hsum(const at::vec::Vectorized<double>& v) { return _mm512_reduce_add_pd(v); }
inline float hmax(const at::vec::Vectorized<float>& v) {
  if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(v);
}
inline double hmax(const at::vec::Vectorized<double>& v) {
  if (_mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q) != 0) return std::numeric_limits<double>::quiet_NaN();
  return _mm512_reduce_max_pd(v);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// exp of 16 floats, inline. (at::vec's exp is Sleef's, a call through the PLT: every live vector register of
// the calling loop is spilled and reloaded around it.) n = round(x log2 e), r = x - n ln 2 with ln 2 in two
// parts (|r| <= ln 2 / 2), exp(r) = 1 + r + r^2 P(r) with Cephes' degree-5 P for expf, then 2^n by scalef.
// Below -87.5 (-inf included) 0, above ln(FLT_MAX) inf, NaN in NaN out; within 2 ulp elsewhere
// (tests/test_symmetric_cpu_fused.py holds it to that on a dense sample of [-87.3, 88.7]).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.5f), hi = _mm512_set1_ps(88.72283f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), over = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
  const __m512 t = _mm512_min_ps(hi, _mm512_max_ps(lo, x));  // (max / min return their second operand, x, on NaN)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(y, n);
  return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(__mmask16(~under), e), over,
                            _mm512_set1_ps(std::numeric_limits<float>::infinity()));
}
#endif

// exp for the fused tiles' loops: exp16 for fp32 on AVX-512, at::vec's (Sleef) otherwise
template <typename T>
inline at::vec::Vectorized<T> vexp(const at::vec::Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same<T, float>::value) return at::vec::Vectorized<float>(exp16(v));
#endif
  return v.exp();
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


// ---------------------------------------------------------------- symmetric tiles (the anchors ARE the columns)
//
// When C is A (S = X Xᵀ, self_offset 0, one label vector) S is symmetric: one GEMM per pair of row blocks
// I <= J gives the tile S_IJ, whose rows serve the statistics of rows I (columns J) and whose transpose
// serves rows J (columns I). Tiles are b x b, b a multiple of the vector width (so every tile's column
// range starts on a vector boundary of the Npad-padded per-column arrays).
//   forward: every pair once (0.5 GEMM-equivalent per pass); the contract stores partial statistics per
//            (row, column block) and merges them in column-block order: bit-identical for any thread count.
//   backward: the pairs in the order of a round-robin tournament's rounds, every row block of dX summed in
//            that order (BlockOrder: no races, the same sums for any thread count); per tile S_IJ, G_IJ (rows I),
//            G_JI (rows J, on the transposed tile), H = G_IJ + G_JIᵀ, dX_I += H X_J, dX_J += Hᵀ X_I, all in
//            the worker's L2. 0.5 GEMM recompute + 1 GEMM of products.
// A contract may reduce a tile itself (the `fused` callbacks: both sides from S_IJ, no transpose); the
// transposing code above is then only its fallback.

// Tile size: LTCL_CPU_SYM_BLOCK, else LTCL_CPU_BLOCK_ROWS, else 256 (fp32 from N = 8192 on: 512, a 1 MB tile
// whose GEMMs pack half as much per product and whose rows merge half as many partials; measured on the
// 2-core Intel machine, docs/performance_cpu.md) grown until there are at most 64 blocks; rounded up to the
// vector width.
template <typename T>
int64_t sym_block(int64_t N, bool grow = true) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  int64_t b = env_int("LTCL_CPU_SYM_BLOCK", env_int("LTCL_CPU_BLOCK_ROWS", 0));
  if (b <= 0) {
    b = (sizeof(T) == 4 && N >= 8192) ? 512 : 256;
    while (grow && (N + b - 1) / b > 64) b *= 2;
  }
  return std::max<int64_t>(W, (b + W - 1) / W * W);
}

// Whether the symmetric forward fits: its partial statistics take a slot per (row, column block), so their
// memory grows as N^2 / b; b * Npad elements within LTCL_CPU_SYM_FWD_BYTES (default 96 MB: fp32 up to
// N ~ 40000). A larger problem takes the general forward (1 GEMM-equivalent instead of 0.5); its backward
// stays symmetric (sym_bwd_block: the backward keeps no per-block state, only each worker's tiles).
template <typename T>
bool sym_fwd_fits(int64_t N, int64_t Npad) {
  const int64_t b = sym_block<T>(N);
  return b * Npad * static_cast<int64_t>(sizeof(T)) <= env_int("LTCL_CPU_SYM_FWD_BYTES", int64_t(96) << 20);
}

// Tile size of the symmetric backward: the forward's (the same tile GEMMs, so the backward recomputes the
// forward's logits bit for bit) when the forward is symmetric too, else sym_block without its growth (any
// number of blocks: 3 b x (b + 16) elements per worker whatever N).
template <typename T>
int64_t sym_bwd_block(int64_t N, int64_t Npad) {
  return sym_block<T>(N, /*grow=*/sym_fwd_fits<T>(N, Npad));
}

// A per-thread buffer of at least n elements kept from call to call (slot: which one), so that the large
// buffers of the symmetric path (H, the partial statistics) are not faulted in and zeroed by the kernel on
// every call. Contents are unspecified on entry.
template <typename T>
T* workspace(size_t n, int slot) {
  thread_local std::vector<T> ws[4];
  if (ws[slot].size() < n) {
    ws[slot].clear();
    ws[slot].shrink_to_fit();
    ws[slot].resize(n);
  }
  return ws[slot].data();
}

// LTCL_CPU_SYM_FUSED: 1 (default) the fused symmetric tiles where they apply, 0 never, 2 as 1 but a tile of an
// eligible problem that its accuracy guards send to the generic tile code is an error (tests use it to check
// that the fused code is what ran, and that the guards trip where they must).
inline int sym_fused_mode() {
  const char* v = std::getenv("LTCL_CPU_SYM_FUSED");
  return (v == nullptr || *v == 0) ? 1 : std::atoi(v);
}

// A tile the fused code declines (guards): false, or an error under LTCL_CPU_SYM_FUSED=2.
inline bool sym_fused_declined(int mode, const char* why) {
  TORCH_CHECK(mode != 2, "ltcl_fused: LTCL_CPU_SYM_FUSED=2 and a fused symmetric tile fell back (", why, ")");
  return false;
}

// The fused backward tiles' guards on the log-sum-exps L of a tile's rows (h = L / 2, E = exp(h - mid)):
// |L| <= kFusedAbs (the rounding of x - h_i - h_j stays that of x - L) and max h - min h <= kFusedRange
// (E within e^(+-kFusedRange / 2); a p above e^-(87 - kFusedRange) cannot underflow in fp32).
template <typename T>
constexpr T kFusedAbs = sizeof(T) == 4 ? T(64) : T(1024);
template <typename T>
constexpr T kFusedRange = sizeof(T) == 4 ? T(40) : T(600);

struct SymGrid {
  int64_t N, b, nb;
  explicit SymGrid(int64_t N_, int64_t b_) : N(N_), b(b_), nb((N_ + b_ - 1) / b_) {}
  int64_t r0(int64_t I) const { return I * b; }
  int64_t len(int64_t I) const { return std::min(b, N - I * b); }
};

// tile (rows x cols, leading dimension ld) = X_I X_Jᵀ
template <typename T>
void gemm_tile(const T* X, int64_t D, const SymGrid& g, int64_t I, int64_t J, T* tile, int64_t ld) {
  const int64_t nr = g.len(I), nc = g.len(J);
  if (D == 0) {
    for (int64_t r = 0; r < nr; ++r) std::fill(tile + r * ld, tile + r * ld + nc, T(0));
    return;
  }
  at::Tensor o = view2d(tile, nr, nc, ld, 1);
  at::mm_out(o, view2d(X + g.r0(I) * D, nr, D, D, 1), view2d(X + g.r0(J) * D, nc, D, D, 1).t());
}

// 16 x 16 float block, in registers (the unpack / shuffle sequence of FBGEMM's transpose):
// dst[c][r] = src[r][c] (+ add[c][r] when ADD).
#if defined(CPU_CAPABILITY_AVX512)
template <bool ADD>
inline void tr16x16(const float* src, int64_t ls, float* dst, int64_t ld, const float* add, int64_t la) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ls);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0x88);
      t[8 * i + k + 4] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
  for (int i = 0; i < 16; ++i) {
    if (ADD) r[i] = _mm512_add_ps(r[i], _mm512_loadu_ps(add + i * la));
    _mm512_storeu_ps(dst + i * ld, r[i]);
  }
}
#endif

// dst (cols x rows, ld_dst) = srcᵀ (+ add, cols x rows, ld_add, when ADD); src: rows x cols, ld_src.
template <bool ADD, typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst,
                    const T* add = nullptr, int64_t ld_add = 0) {
  constexpr int64_t K = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += K)
    for (int64_t c0 = 0; c0 < cols; c0 += K) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same<T, float>::value) {
        if (r0 + K <= rows && c0 + K <= cols) {
          tr16x16<ADD>(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst,
                       ADD ? add + c0 * ld_add + r0 : nullptr, ld_add);
          continue;
        }
      }
#endif
      const int64_t r1 = std::min(rows, r0 + K), c1 = std::min(cols, c0 + K);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r)
          dst[c * ld_dst + r] = src[r * ld_src + c] + (ADD ? add[c * ld_add + r] : T(0));
    }
}

template <typename T>
void transpose_tile(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  transpose_into<false, T>(src, rows, cols, ld_src, dst, ld_dst);
}

// h (rows x cols, ld_h) = a + btᵀ (a: rows x cols, ld_a; bt: cols x rows, ld_b)
template <typename T>
void add_transposed(const T* a, int64_t ld_a, const T* bt, int64_t ld_b, int64_t rows, int64_t cols, T* h,
                    int64_t ld_h) {
  transpose_into<true, T>(bt, cols, rows, ld_b, h, ld_h, a, ld_a);
}

// Workers over the tickets 0 .. n-1, dealt out one at a time: worker(take) sets up its thread's state once,
// then runs t = take() while t >= 0. A thread that a busy neighbour slows down takes fewer tickets (a static
// split would leave the other thread waiting for it: measured on the 2-core Intel machine, 10-15 % of the
// symmetric backward's time). The caller's results must not depend on which worker ran a ticket.
template <typename Worker>
void ticket_workers(int64_t n, Worker worker) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nw = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nw, 1, [&](int64_t, int64_t) {
    worker([&]() -> int64_t {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      return t < n ? t : -1;
    });
  });
}

// The order in which the row blocks of an output receive their contributions, fixed whatever thread adds
// them: block k takes contribution number ord (its place among the tickets that touch k, in ticket order)
// once it holds ord of them. A worker waits only for tickets taken before its own, which are running, so
// the wait ends; a worker that failed (an exception) releases the others through fail().
class BlockOrder {
 public:
  explicit BlockOrder(int64_t nblocks) : done_(new std::atomic<int64_t>[static_cast<size_t>(nblocks)]) {
    for (int64_t k = 0; k < nblocks; ++k) done_[k].store(0, std::memory_order_relaxed);
  }
  // false when another worker failed
  bool wait(int64_t k, int64_t ord) {
    for (int spin = 0; done_[k].load(std::memory_order_acquire) != ord; ++spin) {
      if (failed_.load(std::memory_order_relaxed)) return false;
      if (spin >= 64) std::this_thread::yield();
    }
    return true;
  }
  void added(int64_t k) { done_[k].fetch_add(1, std::memory_order_release); }
  void fail() { failed_.store(true, std::memory_order_relaxed); }

 private:
  std::unique_ptr<std::atomic<int64_t>[]> done_;
  std::atomic<bool> failed_{false};
};

// Forward driver: rows(scratch, r0, nr, c0, nc, J, x, ld) reduces rows r0..r0+nr of S over the columns
// c0..c0+nc (column block J), x their raw similarities (nr x ld, clobbered). Every ordered block pair is
// visited once, each unordered pair by one ticket (one GEMM; its results go to that pair's own slots, so any
// worker may run it). fused(scratch, I, J, r0, nr, c0, nc, x, ld), when it returns true, has reduced both the
// rows of I over J and the rows of J over I from the tile S_IJ itself (x read-only: no transpose, one
// exponential per element); false leaves the tile to rows().
template <typename T, typename MakeScratch, typename Rows, typename Fused>
void sym_forward_tiles(const T* X, int64_t N, int64_t D, MakeScratch make, Rows rows, Fused fused) {
  const SymGrid g(N, sym_block<T>(N));
  const int64_t b = g.b, ld = b + 16;  // not a power of two: the transposes' rows fall in different cache sets
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t I = 0; I < g.nb; ++I)
    for (int64_t J = I; J < g.nb; ++J) pairs.emplace_back(I, J);
  ticket_workers(static_cast<int64_t>(pairs.size()), [&](auto&& take) {
    SequentialBlas seq;
    std::vector<T> buf(static_cast<size_t>(b * ld)), tbuf(static_cast<size_t>(b * ld));
    auto scratch = make();
    for (int64_t p; (p = take()) >= 0;) {
      const int64_t I = pairs[p].first, J = pairs[p].second;
      gemm_tile<T>(X, D, g, I, J, buf.data(), ld);
      if (fused(scratch, I, J, g.r0(I), g.len(I), g.r0(J), g.len(J), buf.data(), ld)) continue;
      if (I != J) transpose_tile<T>(buf.data(), g.len(I), g.len(J), ld, tbuf.data(), ld);
      rows(scratch, g.r0(I), g.len(I), g.r0(J), g.len(J), J, buf.data(), ld);
      if (I != J) rows(scratch, g.r0(J), g.len(J), g.r0(I), g.len(I), I, tbuf.data(), ld);
    }
  });
}

// Backward driver: rows(scratch, r0, nr, c0, nc, x, ld) turns the raw similarities x (nr x ld) of rows
// r0.. over columns c0..c0+nc into G in place (0 at every column it does not own: self, padding).
// dX (N x D; N, D > 0; its contents on entry are never read) = alpha · (G + Gᵀ) X: every row block has its
// diagonal tile at least, and its first contribution is written with beta 0.
// fused(scratch, r0, nr, c0, nc, s, ld, h), when it returns true, has written H = G_IJ + G_JIᵀ of the tile
// (rows r0.., columns c0..; s the raw S_IJ, nr x ld) into h (nr x ld) straight from S_IJ, with one exponential
// per tile element instead of two and no transposes; false (it cannot guarantee the accuracy for this tile)
// leaves the tile to rows() on S_IJ and its transpose.
//
// Schedule: the tile pairs (I, J), I < J, in the rounds of a round-robin tournament (circle method), then
// one round of the diagonal tiles, dealt out in that order as tickets (ticket_workers). Every dX_K receives
// its contributions in ticket order (BlockOrder: a worker waits, if it must, before its two products only),
// so the sums are the same for any thread count; a block's consecutive contributions lie about nb / 2
// tickets apart, so the waits are rare. Per tile everything stays in the worker's L2: S_IJ (one GEMM), G_IJ
// on it and G_JI on its transpose, H = G_IJ + G_JIᵀ, then dX_I += alpha H X_J and dX_J += alpha Hᵀ X_I
// (two b x b x D GEMMs).
template <typename T, typename MakeScratch, typename Rows, typename Fused>
void sym_backward_tiles(const T* X, int64_t N, int64_t D, int64_t block, T alpha, T* dX, MakeScratch make,
                        Rows rows, Fused fused) {
  const SymGrid g(N, block);
  const int64_t b = g.b, nb = g.nb, ld = b + 16;
  const int64_t np = nb + (nb & 1);  // even number of players (the last one a bye when nb is odd)
  std::vector<std::pair<int64_t, int64_t>> tiles;
  auto add = [&](int64_t u, int64_t v) {
    if (u < nb && v < nb && u != v) tiles.emplace_back(std::min(u, v), std::max(u, v));
  };
  for (int64_t r = 0; r + 1 < np; ++r) {
    add(r, np - 1);
    for (int64_t k = 1; k < np / 2; ++k) add((r + k) % (np - 1), (r - k + (np - 1)) % (np - 1));
  }
  for (int64_t I = 0; I < nb; ++I) tiles.emplace_back(I, I);
  // ord[t]: tile t's place among the tiles touching its blocks I and J (ticket order)
  std::vector<std::pair<int64_t, int64_t>> ord(tiles.size());
  {
    std::vector<int64_t> seen(static_cast<size_t>(nb), 0);
    for (size_t t = 0; t < tiles.size(); ++t) {
      const int64_t I = tiles[t].first, J = tiles[t].second;
      ord[t].first = seen[I]++;
      ord[t].second = I == J ? ord[t].first : seen[J]++;
    }
  }
  BlockOrder order(nb);
  // a block's first contribution overwrites it (beta 0: its old contents, NaN included, are not read)
  auto beta = [](int64_t o) { return o == 0 ? 0 : 1; };
  ticket_workers(static_cast<int64_t>(tiles.size()), [&](auto&& take) {
    SequentialBlas seq;
    T* buf = workspace<T>(static_cast<size_t>(3 * b * ld), 3);  // S / G_IJ, S^T / G_JI, H
    T* tbuf = buf + b * ld;
    T* h = tbuf + b * ld;
    auto scratch = make();
    try {
      for (int64_t t; (t = take()) >= 0;) {
        const int64_t I = tiles[t].first, J = tiles[t].second;
        const int64_t nI = g.len(I), nJ = g.len(J);
        gemm_tile<T>(X, D, g, I, J, buf, ld);
        at::Tensor outI = view2d(dX + g.r0(I) * D, nI, D, D, 1);
        const bool done = fused(scratch, g.r0(I), nI, g.r0(J), nJ, buf, ld, h);
        if (I == J) {
          if (!done) {
            rows(scratch, g.r0(I), nI, g.r0(I), nI, buf, ld);
            add_transposed<T>(buf, ld, buf, ld, nI, nI, h, ld);
          }
          if (!order.wait(I, ord[t].first)) return;
          at::addmm_out(outI, outI, view2d<T>(h, nI, nI, ld, 1), view2d(X + g.r0(I) * D, nI, D, D, 1),
                        beta(ord[t].first), alpha);
          order.added(I);
          continue;
        }
        if (!done) {
          transpose_tile<T>(buf, nI, nJ, ld, tbuf, ld);
          rows(scratch, g.r0(I), nI, g.r0(J), nJ, buf, ld);
          rows(scratch, g.r0(J), nJ, g.r0(I), nI, tbuf, ld);
          add_transposed<T>(buf, ld, tbuf, ld, nI, nJ, h, ld);
        }
        at::Tensor outJ = view2d(dX + g.r0(J) * D, nJ, D, D, 1);
        if (!order.wait(I, ord[t].first)) return;
        at::addmm_out(outI, outI, view2d<T>(h, nI, nJ, ld, 1), view2d(X + g.r0(J) * D, nJ, D, D, 1),
                      beta(ord[t].first), alpha);
        order.added(I);
        if (!order.wait(J, ord[t].second)) return;
        at::addmm_out(outJ, outJ, view2d<T>(h, nJ, nI, 1, ld), view2d(X + g.r0(I) * D, nI, D, D, 1),
                      beta(ord[t].second), alpha);
        order.added(J);
      }
    } catch (...) {
      order.fail();
      throw;
    }
  });
}

}  // namespace strip
}  // namespace cpu
}  // namespace ltcl
