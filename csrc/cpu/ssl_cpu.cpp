// CPU kernels of the self-supervised row-statistics contract (ltcl_fused/engine/ssl_contract.py):
// DCL, HCL, the Bayesian contrastive loss and MTTV (SPEC.md sections 5 and 6).
//
// Forward: parallel over blocks of bm anchor rows (at::parallel_for). Per block one GEMM (MKL through
// at::mm_out, single-threaded inside the worker) writes the bm x N strip of raw dot products g into a
// thread-local buffer sized for L2; the fused epilogue then walks each row while it is in cache:
//   1. s = inv_tau * g, with the element filter on |g| (MTTV), the self column and (DCL/HCL/Bayes)
//      the partner column masked to -inf, the positive's value and whether it stayed in the set;
//   2. plain sets: the max and min of s over the set, then one vectorised pass per scale c_k for
//      sum exp(c_k s - max_k) (two-pass LSE on the cached row);
//      Bayesian sets: the row's set values are copied with their columns and sorted (LSD radix sort on
//      order-preserving integer keys, O(n) per row); every entry of a run of equal values has
//      count = the run's end (exact ranks, ties count as <=), u = count / n, t = log ω(u) + c s
//      in place (a table of log ω(c/n), c = 1..n, per thread, rebuilt when n changes), then the LSE of t.
//      Column blocks (ssl_fwd_ranked / ssl_bwd_ranked, for ltcl_fused.distributed's ring): the row's
//      ascending set values over all blocks come in as a rank reference and a run's count is
//      #{reference values <= s} (cm::count_le) instead of the run's end; ssl_set_values returns one
//      block's sorted set values (the same strip, masks and radix sort) to build that reference.
// Backward: the same super-block scheme as rowstats_cpu.cpp. Rows go in super-blocks of R rows (R a
// function of N and the dtype, never of the thread count). Phase 1, parallel over row blocks:
// recompute the strip and the epilogue's masks/weights, form G in place, dA_blk = inv_tau G_blk C.
// Phase 2, parallel over column blocks: dC_cols += inv_tau G_sb[:, cols]^T A_sb. Every GEMM shape and
// every reduction order is independent of the thread count: 1 and 2 threads give identical bits.
// Inputs of any floating dtype are computed in fp32 (fp64 for fp64) and the gradients cast back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/ssl_math.h"
#include "../symmetric_check.h"
#include "strip_common.h"


namespace ltcl {
namespace cpu {
namespace {

using at::Tensor;
using at::vec::Vectorized;
namespace cm = ltcl::common;

constexpr int kMaxScales = 8;

// f(std::integral_constant<int, KC>{}) with KC = K for one or two scales (dcl, mttv; hcl), else 0 (any K, read
// at run time): the fused tiles' loops compiled for the common scale counts
template <typename F>
inline decltype(auto) with_scales(int K, F&& f) {
  if (K == 1) return f(std::integral_constant<int, 1>{});
  if (K == 2) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 0>{});
}

using strip::hmax;
using strip::hmin;
using strip::hsum;

template <typename T>
struct Problem {
  const T* A;
  const T* C;
  const int64_t* partner;
  int64_t M, N, D, Npad, self_offset;
  T inv_tau, lower, upper;
  int filter;
  bool exclude_partner, include_self, bayes;
  int K;
  T scales[kMaxScales];
  cm::BayesOmega<T> omega;
  // rank reference (column blocks, ssl_fwd_ranked / ssl_bwd_ranked): row i's ascending set values over
  // ALL blocks in ref[i * ref_ld, + ref_n[i]); the count of an element is then #{ref values <= s}
  const T* ref = nullptr;
  const int64_t* ref_n = nullptr;
  int64_t ref_ld = 0;
};

// ---------------------------------------------------------------- exact ranks

// Per-thread scratch of the rank pass: the set's keys (cm::ordered_key: -0 and +0 share a key) and column
// indices, sorted by an LSD radix sort (8-bit digits; a digit that every key shares is skipped). O(n) per
// row, stable.
template <typename T>
struct RankScratch {
  using Key = typename cm::OrderedKey<T>::type;
  std::vector<Key> key, key2;
  std::vector<uint32_t> idx, idx2;
  std::vector<T> logw;  // log ω(c / n) for c = 1..n (every row of a plain two-view batch has the same n)
  int64_t logw_n = -1;
  explicit RankScratch(int64_t n) : key(n), key2(n), idx(n), idx2(n), logw(n) {}

  const T* log_weights(const cm::BayesOmega<T>& omega, int64_t n) {
    if (n != logw_n) {
      if (static_cast<int64_t>(logw.size()) < n) logw.resize(static_cast<size_t>(n));  // a rank reference's n
      for (int64_t c = 1; c <= n; ++c) logw[c - 1] = cm::bayes_count_log_weight(omega, c, n);
      logw_n = n;
    }
    return logw.data();
  }

  // sorts key[0, n) / idx[0, n) in place (by key)
  void sort(int64_t n) {
    Key* k0 = key.data();
    Key* k1 = key2.data();
    uint32_t* i0 = idx.data();
    uint32_t* i1 = idx2.data();
    for (int shift = 0; shift < static_cast<int>(8 * sizeof(Key)); shift += 8) {
      int64_t cnt[256] = {0};
      for (int64_t q = 0; q < n; ++q) ++cnt[(k0[q] >> shift) & 0xFF];
      if (cnt[(k0[0] >> shift) & 0xFF] == n) continue;  // every key has this digit
      int64_t off = 0;
      for (int d = 0; d < 256; ++d) {
        const int64_t c = cnt[d];
        cnt[d] = off;
        off += c;
      }
      for (int64_t q = 0; q < n; ++q) {
        const int64_t dst = cnt[(k0[q] >> shift) & 0xFF]++;
        k1[dst] = k0[q];
        i1[dst] = i0[q];
      }
      std::swap(k0, k1);
      std::swap(i0, i1);
    }
    if (k0 != key.data()) {
      std::copy(k0, k0 + n, key.data());
      std::copy(i0, i0 + n, idx.data());
    }
  }
};

// Collects row x's set values (x > -inf) with their columns into rs and sorts them by key; returns n.
template <typename T>
int64_t sort_set(const Problem<T>& P, const T* x, RankScratch<T>* rs) {
  const T ninf = cm::neg_inf<T>();
  int64_t n = 0;
  for (int64_t j = 0; j < P.N; ++j) {
    if (x[j] > ninf) {
      rs->key[n] = cm::ordered_key(x[j]);
      rs->idx[n++] = static_cast<uint32_t>(j);
    }
  }
  if (n > 0) rs->sort(n);
  return n;
}

struct RowInfo {
  double pos = 0;         // s of the partner column (0 when it is not among the columns)
  bool pos_in = false;    // the partner column is among the columns and in the set
  bool poisoned = false;  // a NaN or +-inf dot product among the columns: the row's LSEs are NaN
};

// The element filter's drop mask of raw dot products g (P.filter != kFilterNone): a = min(|g|, 1) dropped when
// a < lower [or a > upper]; a NaN compares false and is kept (cm::ssl_filter_keep, one element)
template <typename T>
Vectorized<T> filter_drop(const Problem<T>& P, const Vectorized<T>& g) {
  using Vec = Vectorized<T>;
  const Vec a = at::vec::minimum(g.abs(), Vec(T(1)));
  Vec drop = a < Vec(P.lower);
  if (P.filter == cm::kFilterBoth) drop = drop | (a > Vec(P.upper));
  return drop;
}

// Row i over the columns [c0, c0 + nc): on entry x holds their raw dot products (nc valid, padded to ncp =
// nc rounded up to the vector width, at least one vector); on exit x_j = s_ij on the set, -inf elsewhere
// (padding included). The general path passes the whole row (c0 = 0, nc = N, ncp = Npad), the symmetric
// path one tile's columns.
template <typename T>
RowInfo mask_cols(const Problem<T>& P, int64_t i, int64_t c0, int64_t nc, int64_t ncp, T* x) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T ninf = cm::neg_inf<T>();
  RowInfo info;
  const int64_t p = P.partner[i];
  const bool p_here = p >= c0 && p < c0 + nc;
  if (p_here) info.pos = static_cast<double>(x[p - c0] * P.inv_tau);
  for (int64_t j = nc; j < ncp; ++j) x[j] = T(0);

  // s = inv_tau * g with the filter on a = min(|g|, 1) (drop a < lower [or a > upper]; NaN compares false
  // and is kept); bad = sum of g * 0 is NaN iff some g is NaN or +-inf (the row is then poisoned)
  const Vec vinv(P.inv_tau), vninf(ninf), vzero(T(0));
  Vec bad(T(0));
  for (int64_t j = 0; j < ncp; j += W) {
    const Vec g = Vec::loadu(x + j);
    bad = at::vec::fmadd(g, vzero, bad);
    Vec s = g * vinv;
    if (P.filter != cm::kFilterNone) s = Vec::blendv(s, vninf, filter_drop(P, g));
    s.store(x + j);
  }
  for (int64_t j = nc; j < ncp; ++j) x[j] = ninf;
  info.poisoned = hsum(bad) != T(0);
  if (P.self_offset >= 0 && !P.include_self) {
    const int64_t js = i + P.self_offset;
    if (js >= c0 && js < c0 + nc) x[js - c0] = ninf;
  }
  if (p_here && P.exclude_partner) x[p - c0] = ninf;
  info.pos_in = p_here && x[p - c0] != ninf;  // a NaN s stays in the set (the filter never drops a NaN)
  return info;
}

// max and min of x over the set (x > -inf) of ncp entries
template <typename T>
void set_range(const T* x, int64_t ncp, T* smax, T* smin) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T ninf = cm::neg_inf<T>(), pinf = -ninf;
  Vec vmax(ninf), vmin(pinf);
  const Vec vpinf(pinf), vninf(ninf);
  for (int64_t j = 0; j < ncp; j += W) {
    const Vec v = Vec::loadu(x + j);
    vmax = at::vec::maximum(vmax, v);
    vmin = at::vec::minimum(vmin, Vec::blendv(vpinf, v, v > vninf));
  }
  *smax = hmax(vmax);
  *smin = hmin(vmin);
}

// On entry x holds the raw dot products of row i (N valid, Npad wide). On exit:
//   plain sets: x_j = s_ij on the set, -inf elsewhere; *smax / *smin = max / min of s over the set;
//   Bayesian:   x_j = log ω(u_ij) + c s_ij on the set (-inf where ω <= 0), -inf elsewhere; *smax = max x.
// rs: scratch of the rank pass (Bayesian only).
template <typename T>
RowInfo prepare_row(const Problem<T>& P, int64_t i, T* x, RankScratch<T>* rs, T* smax, T* smin) {
  const T ninf = cm::neg_inf<T>(), pinf = -ninf;
  const RowInfo info = mask_cols(P, i, 0, P.N, P.Npad, x);

  if (!P.bayes) {
    set_range(x, P.Npad, smax, smin);
    return info;
  }
  // Bayesian: exact within-row ranks of the set values. Radix-sort the set's (key, column) pairs; every
  // entry of a run of equal values has count = the end of its run (ties count as <=), so ω is
  // evaluated once per distinct value and written to the run's columns as t = log ω(u) + c s.
  // With a rank reference (column blocks) the count is #{ref values <= s} over the whole row instead
  // and n the row's whole set size.
  const int64_t n = sort_set(P, x, rs);
  *smax = ninf;
  *smin = pinf;
  if (n == 0) return info;
  const int64_t nw = P.ref != nullptr ? P.ref_n[i] : n;  // the denominator of u
  if (nw <= 0) {  // an empty reference: no weights
    for (int64_t q = 0; q < n; ++q) x[rs->idx[q]] = ninf;
    return info;
  }
  const T* lwt = rs->log_weights(P.omega, nw);
  const T* ref_row = P.ref != nullptr ? P.ref + i * P.ref_ld : nullptr;
  const T c = P.scales[0];
  T m = ninf;
  for (int64_t q = n; q > 0;) {  // runs from the largest value down
    const int64_t end = q;
    const auto k = rs->key[q - 1];
    int64_t q0 = q - 1;
    while (q0 > 0 && rs->key[q0 - 1] == k) --q0;
    const int64_t cnt = ref_row != nullptr ? cm::count_le(ref_row, nw, x[rs->idx[q0]]) : end;
    const T lw = cnt > 0 ? lwt[cnt - 1] : cm::bayes_count_log_weight(P.omega, 0, nw);  // log ω(cnt / n)
    for (int64_t r = q0; r < end; ++r) {
      const int64_t j = rs->idx[r];
      const T t = lw + c * x[j];
      x[j] = t;
      m = std::max(m, t);
    }
    q = q0;
  }
  *smax = m;
  return info;
}

// ---------------------------------------------------------------- forward

// Per scale k, over a plain set (x = s on the set, -inf elsewhere; ncp entries, smax / smin of the set):
// m_k = max of c_k s, sum_k = sum exp(c_k s - m_k).
template <typename T>
void scaled_sums(const Problem<T>& P, const T* x, int64_t ncp, T smax, T smin, T* m, T* sum) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vninf(cm::neg_inf<T>()), zero(T(0));
  for (int k = 0; k < P.K; ++k) {
    const T c = P.scales[k];
    m[k] = cm::scaled_max(c, smax, smin);
    const Vec vc(c), vm(m[k]);
    Vec acc(T(0));
    if (c == T(1)) {  // exp(-inf - m) = 0 outside the set: no mask needed
      for (int64_t j = 0; j < ncp; j += W) acc = acc + (Vec::loadu(x + j) - vm).exp();
    } else {
      for (int64_t j = 0; j < ncp; j += W) {
        const Vec v = Vec::loadu(x + j);
        acc = acc + Vec::blendv(zero, (vc * v - vm).exp(), v > vninf);
      }
    }
    sum[k] = hsum(acc);
  }
}

template <typename T>
void forward_row(const Problem<T>& P, int64_t i, T* x, RankScratch<T>* rs, T* lse, T* pos, T* pos_in) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T ninf = cm::neg_inf<T>();
  T smax, smin;
  const RowInfo info = prepare_row(P, i, x, rs, &smax, &smin);
  pos[i] = static_cast<T>(info.pos);
  pos_in[i] = info.pos_in ? T(1) : T(0);
  if (info.poisoned || smax == ninf) {  // poisoned (NaN), or an empty set / every weight 0 (-inf)
    for (int k = 0; k < P.K; ++k) lse[k * P.M + i] = info.poisoned ? cm::quiet_nan<T>() : ninf;
    return;
  }
  if (P.bayes) {
    const Vec vm(smax);
    Vec acc(T(0));
    for (int64_t j = 0; j < P.Npad; j += W) acc = acc + (Vec::loadu(x + j) - vm).exp();
    lse[i] = cm::lse_finish(smax, hsum(acc));
    return;
  }
  T m[kMaxScales], sum[kMaxScales];
  scaled_sums(P, x, P.Npad, smax, smin, m, sum);
  for (int k = 0; k < P.K; ++k) lse[k * P.M + i] = cm::lse_finish(m[k], sum[k]);
}

template <typename T>
void forward_impl(const Problem<T>& P, T* lse, T* pos, T* pos_in) {
  strip::forward_strips<T>(
      P, [&] { return RankScratch<T>(P.bayes ? P.N : 0); },
      [&](RankScratch<T>& rs, int64_t i, T* x) { forward_row(P, i, x, &rs, lse, pos, pos_in); });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct BwdIn {
  const T* lse;   // [K, M]
  const T* coef;  // [K, M]
  const T* cpos;  // [M]
};

// x: row i's prepared values over ncp columns (prepare_row / mask_cols: s, or log w + c s, on the set, -inf
// elsewhere); on exit G_ij there (0 outside the set and in the padding), cpos_i added at the partner's local
// column p (-1: not among these columns). vbuf: ncp scratch when there are several scales.
template <typename T>
void grad_cols(const Problem<T>& P, int64_t i, T* x, int64_t nc, int64_t ncp, int64_t p, T* vbuf, const BwdIn<T>& in) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vninf(cm::neg_inf<T>()), zero(T(0));
  T* dst = P.K == 1 ? x : vbuf;  // one scale: G in place; several: accumulated in vbuf
  bool first = true;
  for (int k = 0; k < P.K; ++k) {
    const T L = in.lse[k * P.M + i], ck = in.coef[k * P.M + i], c = P.scales[k];
    if (ck == T(0) || !std::isfinite(L)) continue;  // a dead term contributes exactly 0
    const Vec va(ck * c), vL(L), vc(c);
    for (int64_t j = 0; j < ncp; j += W) {
      const Vec v = Vec::loadu(x + j);
      Vec g = P.bayes ? va * (v - vL).exp()  // x = log w + c s; -inf -> 0
                      : Vec::blendv(zero, va * (vc * v - vL).exp(), v > vninf);
      if (!first) g = g + Vec::loadu(dst + j);
      g.store(dst + j);
    }
    first = false;
  }
  if (first) {
    std::fill(x, x + ncp, T(0));
  } else if (dst != x) {
    std::copy(vbuf, vbuf + ncp, x);
  }
  for (int64_t j = nc; j < ncp; ++j) x[j] = T(0);
  if (p >= 0) x[p] = in.cpos[i] + x[p];
}

// On entry x holds the raw dot products of row i; on exit G_i (0 outside the set and in the padding).
template <typename T>
void backward_row(const Problem<T>& P, int64_t i, T* x, RankScratch<T>* rs, T* vbuf, const BwdIn<T>& in) {
  T smax, smin;
  prepare_row(P, i, x, rs, &smax, &smin);
  const int64_t p = P.partner[i];
  grad_cols(P, i, x, P.N, P.Npad, (p >= 0 && p < P.N) ? p : -1, vbuf, in);
}

template <typename T>
struct BwdScratch {
  RankScratch<T> rs;
  std::vector<T> vbuf;  // G accumulated over the scales
};

template <typename T>
void backward_impl(const Problem<T>& P, const BwdIn<T>& in, T* dA, T* dC) {
  strip::backward_strips<T>(
      P, dA, dC,
      [&] { return BwdScratch<T>{RankScratch<T>(P.bayes ? P.N : 0),
                                 std::vector<T>(P.K > 1 ? static_cast<size_t>(P.Npad) : 0)}; },
      [&](BwdScratch<T>& s, int64_t i, T* x) { backward_row(P, i, x, &s.rs, s.vbuf.data(), in); });
}

// ---------------------------------------------------------------- symmetric path (C is A, self_offset 0, no bayes)
//
// The tiles of strip::sym_forward_tiles / sym_backward_tiles (csrc/cpu/strip_common.h): one GEMM per pair of
// row blocks I <= J serves rows I over columns J and, transposed, rows J over columns I. Forward: per
// (row i, column block J) the partial state (m_k, sum_k per scale, poisoned, pos, pos_in) of the block's
// columns (the fused tile below, or mask_cols and scaled_sums on the tile and its transpose), merged per row
// in block order: lse_k = M + log sum_J sum_kJ exp(m_kJ - M), M = max_J m_kJ over the blocks with sum_kJ > 0
// (bit-identical for any thread count). Backward: dX = inv_tau (G + Gᵀ) X,
// G's rows formed by the same mask_cols + grad_cols as the general path's. 2 GEMM-equivalents per step
// instead of 4.

// The symmetric backward runs for any N; the forward while its per-block partials fit (strip::sym_fwd_fits).
template <typename T>
bool sym_ok(const Problem<T>& P, bool forward) {
  return !P.bayes && P.self_offset == 0 && P.M == P.N && (!forward || strip::sym_fwd_fits<T>(P.N, P.Npad));
}

// The partial statistics of the symmetric forward: per scale k and slot J * N + i (row i over column block J)
// m_kJ and sum_kJ (sum exp(c_k s - m_kJ) over the block's part of row i's set), and per slot whether the block
// holds a NaN or +-inf dot product, the partner's s and whether it is in the set.
template <typename T>
struct SslParts {
  T *pm, *ps, *pbad, *ppos, *pin;
  size_t slots;
};

// One row's partial over the columns [c0, c0 + nc) from its raw dot products x (ncp wide, clobbered): the
// general path's mask_cols, set_range and scaled_sums on the block's columns.
template <typename T>
void sym_row_partial(const Problem<T>& P, const SslParts<T>& S, int64_t i, int64_t c0, int64_t nc, int64_t ncp,
                     int64_t sl, T* x) {
  const RowInfo info = mask_cols(P, i, c0, nc, ncp, x);
  T smax, smin, m[kMaxScales], sum[kMaxScales];
  set_range(x, ncp, &smax, &smin);
  if (smax > cm::neg_inf<T>()) {
    scaled_sums(P, x, ncp, smax, smin, m, sum);
  } else {
    for (int k = 0; k < P.K; ++k) m[k] = cm::neg_inf<T>(), sum[k] = T(0);
  }
  for (int k = 0; k < P.K; ++k) {
    S.pm[k * S.slots + sl] = m[k];
    S.ps[k * S.slots + sl] = sum[k];
  }
  S.pbad[sl] = info.poisoned ? T(1) : T(0);
  S.ppos[sl] = static_cast<T>(info.pos);
  S.pin[sl] = info.pos_in ? T(1) : T(0);
}

// Fused forward tile (strip::sym_forward_tiles' `fused`): the partials of the rows of I over the columns J and
// of the rows of J over the columns I straight from S_IJ, one exponential per element and scale (the generic
// tile takes two, on the tile and on its transpose, after a masking and a range pass per side). With rho_k =
// c_k max s (c_k < 0: c_k min s) over the tile's dot products off self,
//   e_k = exp(c_k s_ij - rho_k) <= 1,  row i: sum_k += e_k over its set,  column j: sum_k += e_k over j's set,
// kept as (m_kJ, sum_kJ) = (rho_k, sum_k). The two sets differ only at the partners (row i leaves out
// (i, partner[i]), column j (partner[j], j) when exclude_partner). A side whose sum of some scale is below
// `tiny` (an empty set, or a set whose terms lie more than ~46 nats (fp32) below rho_k: they may have
// underflowed) is redone relative to its own max by sym_row_partial. Tiles with a NaN or +-inf dot product
// (poisoned rows) go to the generic tile.
template <typename T>
struct SslFwdScratch {
  std::vector<T> csum;   // [K][bpad] the columns' sums
  std::vector<T> cpart;  // [bpad] the local row of each column's partner (-1: not among the rows)
  std::vector<T> x;      // [bpad] one row or column for sym_row_partial
  int64_t bpad = 0;
  explicit SslFwdScratch(int64_t b) : bpad(b + 16) {
    csum.resize(static_cast<size_t>(kMaxScales * bpad));
    cpart.resize(static_cast<size_t>(bpad));
    x.resize(static_cast<size_t>(bpad));
  }
};

template <typename T, int KC>
bool ssl_fused_fwd_tile_k(const Problem<T>& P, const SslParts<T>& S, SslFwdScratch<T>& sc, int mode, int64_t I,
                          int64_t J, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* s, int64_t ld) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int K = KC > 0 ? KC : P.K;
  const int64_t N = P.N, ncp = (nc + W - 1) / W * W;
  const bool diag = I == J, noself = diag && !P.include_self;
  const T ninf = cm::neg_inf<T>(), pinf = -ninf;
  const Vec vinv(P.inv_tau), zero(T(0)), vninf(ninf), vpinf(pinf), iota = Vec::arange(T(0), T(1));
  // the tile's dot products (padding: 0, outside every set and the range)
  auto load = [&](const T* xr, int64_t j) { return nc - j >= W ? Vec::loadu(xr + j) : Vec::loadu(xr + j, nc - j); };
  auto in_mask = [&](int64_t r, int64_t j) {  // in the tile, not self where self is left out
    Vec in = nc - j >= W ? (zero == zero) : (iota < Vec(static_cast<T>(nc - j)));
    if (noself && r >= j && r < j + W) in = in & (iota != Vec(static_cast<T>(r - j)));
    return in;
  };
  auto keep_mask = [&](const Vec& g, int64_t r, int64_t j) {  // ... and kept by the filter
    const Vec in = in_mask(r, j);
    return P.filter != cm::kFilterNone ? Vec::blendv(in, zero, filter_drop(P, g)) : in;
  };
  // pass A: the range of the dot products; NaN / +-inf detection (g * 0 is NaN exactly there)
  Vec vmax(ninf), vmin(pinf), bad(T(0));
  for (int64_t r = 0; r < nr; ++r) {
    const T* xr = s + r * ld;
    for (int64_t j = 0; j < ncp; j += W) {
      const Vec g = load(xr, j);
      bad = at::vec::fmadd(g, zero, bad);
      if (nc - j >= W && !(noself && r >= j && r < j + W)) {
        vmax = at::vec::maximum(vmax, g);
        vmin = at::vec::minimum(vmin, g);
      } else {
        const Vec in = in_mask(r, j);  // (the filter plays no part in the range)
        vmax = at::vec::maximum(vmax, Vec::blendv(vninf, g, in));
        vmin = at::vec::minimum(vmin, Vec::blendv(vpinf, g, in));
      }
    }
  }
  if (hsum(bad) != T(0)) return strip::sym_fused_declined(mode, "a NaN or +-inf dot product");
  const T gmax = hmax(vmax), gmin = hmin(vmin);
  if (!(gmax >= gmin)) {  // no element off self (a 1 x 1 diagonal tile): the generic tile
    return false;
  }
  T rho[kMaxScales];
  Vec vc[kMaxScales], vrho[kMaxScales];
  for (int k = 0; k < K; ++k) {
    rho[k] = cm::scaled_max(P.scales[k], gmax * P.inv_tau, gmin * P.inv_tau);
    vc[k] = Vec(P.scales[k]);
    vrho[k] = Vec(rho[k]);
  }
  T* csum = sc.csum.data();
  T* cpart = sc.cpart.data();
  const bool colpart = P.exclude_partner && !diag;
  if (!diag) {
    std::fill(csum, csum + K * sc.bpad, T(0));
    if (colpart) {
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t q = P.partner[c0 + c];
        cpart[c] = (q >= r0 && q < r0 + nr) ? static_cast<T>(q - r0) : T(-1);
      }
      for (int64_t c = nc; c < ncp; ++c) cpart[c] = T(-1);
    }
  }
  const T tiny = sizeof(T) == 4 ? T(1e-20) : T(1e-200);
  // pass B: e_k = exp(c_k s - rho_k); the rows' sums in registers, the columns' in csum
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r, p = P.partner[i];
    const T* xr = s + r * ld;
    const int64_t pj = (P.exclude_partner && p >= c0 && p < c0 + nc) ? p - c0 : -1, pjc = pj < 0 ? -1 : pj - pj % W;
    const Vec vr(static_cast<T>(r));
    Vec acc[kMaxScales];
    for (int k = 0; k < K; ++k) acc[k] = zero;
    for (int64_t j = 0; j < ncp; j += W) {
      const Vec g = load(xr, j), v = g * vinv;
      const Vec keep = keep_mask(g, r, j);
      const Vec rkeep = j == pjc ? keep & (iota != Vec(static_cast<T>(pj - j))) : keep;
      const Vec ckeep = colpart ? keep & (Vec::loadu(cpart + j) != vr) : keep;
      for (int k = 0; k < K; ++k) {
        const Vec e = strip::vexp<T>(at::vec::fmsub(vc[k], v, vrho[k]));
        acc[k] = acc[k] + Vec::blendv(zero, e, rkeep);
        if (!diag) (Vec::loadu(csum + k * sc.bpad + j) + Vec::blendv(zero, e, ckeep)).store(csum + k * sc.bpad + j);
      }
    }
    const int64_t sl = J * N + i;
    bool small = false;
    for (int k = 0; k < K; ++k) {
      const T sum = hsum(acc[k]);
      small = small || !(sum >= tiny);
      S.pm[k * S.slots + sl] = rho[k];
      S.ps[k * S.slots + sl] = sum;
    }
    if (small) {
      std::copy(xr, xr + nc, sc.x.data());
      sym_row_partial(P, S, i, c0, nc, ncp, sl, sc.x.data());
      continue;
    }
    S.pbad[sl] = T(0);
    const bool here = p >= c0 && p < c0 + nc;
    const T gp = here ? xr[p - c0] : T(0);
    S.ppos[sl] = here ? gp * P.inv_tau : T(0);
    S.pin[sl] = here && !P.exclude_partner && !(noself && p == i) &&
                cm::ssl_filter_keep<T>(gp, P.filter, P.lower, P.upper) ? T(1) : T(0);
  }
  if (diag) return true;
  const int64_t nrp = (nr + W - 1) / W * W;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t j = c0 + c, q = P.partner[j], sl = I * N + j;
    bool small = false;
    for (int k = 0; k < K; ++k) {
      const T sum = csum[k * sc.bpad + c];
      small = small || !(sum >= tiny);
      S.pm[k * S.slots + sl] = rho[k];
      S.ps[k * S.slots + sl] = sum;
    }
    if (small) {
      for (int64_t r = 0; r < nr; ++r) sc.x[r] = s[r * ld + c];
      sym_row_partial(P, S, j, r0, nr, nrp, sl, sc.x.data());
      continue;
    }
    S.pbad[sl] = T(0);
    const bool here = q >= r0 && q < r0 + nr;
    const T gq = here ? s[(q - r0) * ld + c] : T(0);
    S.ppos[sl] = here ? gq * P.inv_tau : T(0);
    S.pin[sl] = here && !P.exclude_partner && cm::ssl_filter_keep<T>(gq, P.filter, P.lower, P.upper) ? T(1) : T(0);
  }
  return true;
}

template <typename T>
bool ssl_fused_fwd_tile(const Problem<T>& P, const SslParts<T>& S, SslFwdScratch<T>& sc, int mode, int64_t I,
                        int64_t J, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* s, int64_t ld) {
  return with_scales(P.K, [&](auto kc) {
    return ssl_fused_fwd_tile_k<T, decltype(kc)::value>(P, S, sc, mode, I, J, r0, nr, c0, nc, s, ld);
  });
}

template <typename T>
void sym_forward_impl(const Problem<T>& P, T* lse, T* pos, T* pos_in) {
  const int64_t N = P.N, K = P.K, b = strip::sym_block<T>(N);
  const int64_t nb = strip::SymGrid(N, b).nb;
  const size_t slots = static_cast<size_t>(nb * N);
  T* ws = strip::workspace<T>(slots * static_cast<size_t>(2 * K + 3), 1);
  SslParts<T> S;
  S.slots = slots;
  S.pm = ws;                   // [K][nb * N] m_kJ
  S.ps = ws + K * slots;       // [K][nb * N] sum_kJ
  S.pbad = ws + 2 * K * slots; // 1 where the block holds a NaN or +-inf dot product
  S.ppos = S.pbad + slots;     // the partner's s (0 unless the partner is in the block)
  S.pin = S.ppos + slots;      // 1 where the partner is in the block and in the set
  const int mode = strip::sym_fused_mode();
  strip::sym_forward_tiles<T>(
      P.A, N, P.D, [&] { return SslFwdScratch<T>(b); },
      [&](SslFwdScratch<T>&, int64_t r0, int64_t nr, int64_t c0, int64_t nc, int64_t J, T* x, int64_t ld) {
        const int64_t ncp = (nc + Vectorized<T>::size() - 1) / Vectorized<T>::size() * Vectorized<T>::size();
        for (int64_t r = 0; r < nr; ++r) sym_row_partial(P, S, r0 + r, c0, nc, ncp, J * N + r0 + r, x + r * ld);
      },
      [&](SslFwdScratch<T>& sc, int64_t I, int64_t J, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* x,
          int64_t ld) { return mode != 0 && ssl_fused_fwd_tile(P, S, sc, mode, I, J, r0, nr, c0, nc, x, ld); });
  at::parallel_for(0, N, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      bool bad = false;
      T p = T(0), pi = T(0);
      for (int64_t J = 0; J < nb; ++J) {
        const int64_t sl = J * N + i;
        bad = bad || S.pbad[sl] != T(0);
        p += S.ppos[sl];
        pi += S.pin[sl];
      }
      pos[i] = p;
      pos_in[i] = pi;
      for (int64_t k = 0; k < K; ++k) {
        const T* pm = S.pm + k * slots + i;
        const T* ps = S.ps + k * slots + i;
        T M = cm::neg_inf<T>();
        for (int64_t J = 0; J < nb; ++J)
          if (ps[J * N] > T(0)) M = std::max(M, pm[J * N]);
        T sum = T(0);
        if (M > cm::neg_inf<T>()) {
          for (int64_t J = 0; J < nb; ++J)
            if (ps[J * N] > T(0)) sum += ps[J * N] * std::exp(pm[J * N] - M);
        }
        lse[k * N + i] = bad ? cm::quiet_nan<T>() : cm::lse_finish(M, sum);
      }
    }
  });
}

// Fused backward tile (strip::sym_backward_tiles' `fused`): H = G_IJ + G_JIᵀ straight from the tile with one
// exponential per element and scale instead of two. On the set, G_ij = sum_k a_ik c_k exp(c_k s_ij - L_ik)
// (a = coef, L = lse); with h = L / 2, mid_k the middle of the tile's h_k and E = exp(h - mid):
//   e_k = exp(c_k s - h_ik - h_jk) <= 1,   H_ij = sum_k e_k (nu_ik E_jk + E_ik nu_jk),  nu = c a / E,
// 0 off the set (the filter on g, self unless include_self: a property of the pair, so of both rows);
// the partners' entries (cpos, and exclude_partner) from the scalar formulas of both rows. Taken when the
// partners pair up (partner[partner[i]] = i) and, per tile, every L is finite with |L| <= kFusedAbs, each
// scale's h within kFusedRange, the coefficients finite; else the tile takes mask_cols + grad_cols.
template <typename T>
struct SslBwdScratch {
  std::vector<T> vbuf;   // grad_cols' scratch (several scales)
  std::vector<T> sides;  // [2 sides][K][3: h, E, nu][bpad]
  int64_t bpad = 0;
  T* arr(int side, int k, int a) { return sides.data() + ((side * kMaxScales + k) * 3 + a) * bpad; }
};

template <typename T>
bool ssl_fused_tile(const Problem<T>& P, const BwdIn<T>& in, SslBwdScratch<T>& sc, int mode, int64_t r0,
                    int64_t nr, int64_t c0, int64_t nc, const T* g, int64_t ld, T* h) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t M = P.M, ncp = (nc + W - 1) / W * W;
  const T inf = std::numeric_limits<T>::infinity();
  for (int k = 0; k < P.K; ++k) {
    T lo = inf, hi = -inf;
    for (int side = 0; side < 2; ++side) {
      const int64_t k0 = side == 0 ? r0 : c0, n = side == 0 ? nr : nc;
      T* hh = sc.arr(side, k, 0);
      for (int64_t t = 0; t < n; ++t) {
        const T L = in.lse[k * M + k0 + t], a = in.coef[k * M + k0 + t];
        if (!(std::abs(L) <= strip::kFusedAbs<T>) || !std::isfinite(a) || !std::isfinite(in.cpos[k0 + t]))
          return strip::sym_fused_declined(mode, "a non-finite or large lse or coefficient");
        hh[t] = L * T(0.5);
        lo = std::min(lo, hh[t]);
        hi = std::max(hi, hh[t]);
      }
    }
    if (hi - lo > strip::kFusedRange<T>) return strip::sym_fused_declined(mode, "the tile's lse too far apart");
    const T mid = (hi + lo) * T(0.5);
    for (int side = 0; side < 2; ++side) {
      const int64_t k0 = side == 0 ? r0 : c0, n = side == 0 ? nr : nc, npad = side == 0 ? n : ncp;
      T *hh = sc.arr(side, k, 0), *E = sc.arr(side, k, 1), *nu = sc.arr(side, k, 2);
      for (int64_t t = 0; t < n; ++t) {
        E[t] = std::exp(hh[t] - mid);
        nu[t] = P.scales[k] * in.coef[k * M + k0 + t] / E[t];
      }
      for (int64_t t = n; t < npad; ++t) hh[t] = E[t] = nu[t] = T(0);  // padding: H = 0 (never read)
    }
  }
  const bool diag = r0 == c0;
  const Vec vinv(P.inv_tau), zero(T(0));
  const Vec iota = Vec::arange(T(0), T(1));
  // the row loop, compiled for one and two scales (dcl, mttv; hcl) and with or without the |g| filter: the
  // rows' per-scale constants then stay in registers (KC = 0: any number of scales, read per vector)
  auto rows = [&](auto kc, auto filt_c) {
    constexpr int KC = decltype(kc)::value;
    constexpr bool kFilter = decltype(filt_c)::value;
    constexpr int KR = KC > 0 ? KC : kMaxScales;
    const int K = KC > 0 ? KC : P.K;
    for (int64_t r = 0; r < nr; ++r) {
      const T* gr = g + r * ld;
      T* hr = h + r * ld;
      Vec vc[KR], vh[KR], vE[KR], vnu[KR];
      const T *ch[KR], *cE[KR], *cnu[KR];
      for (int k = 0; k < K; ++k) {
        vc[k] = Vec(P.scales[k]);
        vh[k] = Vec(sc.arr(0, k, 0)[r]);
        vE[k] = Vec(sc.arr(0, k, 1)[r]);
        vnu[k] = Vec(sc.arr(0, k, 2)[r]);
        ch[k] = sc.arr(1, k, 0);
        cE[k] = sc.arr(1, k, 1);
        cnu[k] = sc.arr(1, k, 2);
      }
      for (int64_t j = 0; j < ncp; j += W) {
        const int64_t cnt = std::min<int64_t>(W, nc - j);
        const Vec gv = cnt == W ? Vec::loadu(gr + j) : Vec::loadu(gr + j, cnt);
        const Vec v = gv * vinv;
        Vec keep = cnt == W ? (zero == zero) : (iota < Vec(static_cast<T>(cnt)));
        if constexpr (kFilter) keep = Vec::blendv(keep, zero, filter_drop(P, gv));
        if (diag && !P.include_self && r >= j && r < j + W) keep = keep & (iota != Vec(static_cast<T>(r - j)));
        Vec H = zero;
        for (int k = 0; k < K; ++k) {
          const Vec e = strip::vexp<T>(vc[k] * v - (vh[k] + Vec::loadu(ch[k] + j)));
          H = at::vec::fmadd(e, at::vec::fmadd(vnu[k], Vec::loadu(cE[k] + j), vE[k] * Vec::loadu(cnu[k] + j)), H);
        }
        H = Vec::blendv(zero, H, keep);
        if (cnt == W) {
          H.store(hr + j);
        } else {
          H.store(hr + j, cnt);
        }
      }
    }
  };
  with_scales(P.K, [&](auto kc) { strip::with_flag(P.filter != cm::kFilterNone, [&](auto fc) { rows(kc, fc); }); });
  // the partners' entries: both rows' set terms (the general path's mask_cols rules) and cpos
  auto set_term = [&](int64_t a, int64_t b, T gab) {
    if (!cm::ssl_filter_keep<T>(gab, P.filter, P.lower, P.upper)) return T(0);
    if ((a == b && !P.include_self) || (P.exclude_partner && b == P.partner[a])) return T(0);
    T t = T(0);
    for (int k = 0; k < P.K; ++k)
      t += in.coef[k * M + a] * P.scales[k] * std::exp(P.scales[k] * (gab * P.inv_tau) - in.lse[k * M + a]);
    return t;
  };
  auto fix = [&](int64_t i, int64_t j) {
    const int64_t o = (i - r0) * ld + (j - c0);
    h[o] = set_term(i, j, g[o]) + set_term(j, i, g[o]) + in.cpos[i] + in.cpos[j];
  };
  for (int64_t r = 0; r < nr; ++r) {  // (the pairs are mutual: a column's partner entry is its partner row's)
    const int64_t i = r0 + r, p = P.partner[i];
    if (p >= c0 && p < c0 + nc) fix(i, p);
  }
  return true;
}

template <typename T>
void sym_backward_impl(const Problem<T>& P, const BwdIn<T>& in, T* dX) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t b = strip::sym_bwd_block<T>(P.N, P.Npad);
  bool paired = true;  // the fused tiles need partner[partner[i]] = i (a pair's entries are then symmetric)
  for (int64_t i = 0; i < P.N && paired; ++i) {
    const int64_t p = P.partner[i];
    paired = p < 0 || (p < P.N && P.partner[p] == i);
  }
  const int mode = paired ? strip::sym_fused_mode() : 0;
  strip::sym_backward_tiles<T>(
      P.A, P.N, P.D, b, P.inv_tau, dX,
      [&] {
        SslBwdScratch<T> sc;
        sc.vbuf.resize(P.K > 1 ? static_cast<size_t>(b) : 0);
        sc.bpad = b + W;
        sc.sides.resize(static_cast<size_t>(2 * kMaxScales * 3 * sc.bpad));
        return sc;
      },
      [&](SslBwdScratch<T>& sc, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* x, int64_t ld) {
        const int64_t ncp = std::max<int64_t>(W, (nc + W - 1) / W * W);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = r0 + r, p = P.partner[i];
          T* xr = x + r * ld;
          mask_cols(P, i, c0, nc, ncp, xr);
          grad_cols(P, i, xr, nc, ncp, (p >= c0 && p < c0 + nc) ? p - c0 : -1, sc.vbuf.data(), in);
        }
      },
      [&](SslBwdScratch<T>& sc, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* x, int64_t ld, T* h) {
        return mode != 0 && ssl_fused_tile(P, in, sc, mode, r0, nr, c0, nc, x, ld, h);
      });
}

// symmetric=True: the caller guarantees C is A (the same storage) and self_offset 0
void check_symmetric(const Tensor& A, const Tensor& C, int64_t self_offset, c10::ArrayRef<double> bayes,
                     const char* op) {
  check_symmetric_operands(A, C, self_offset, op);
  check_symmetric_no_bayes(bayes, op);
}

// ---------------------------------------------------------------- ops

struct Prepared {
  Tensor A, C, partner;
  int64_t M, N, D, Npad;
  at::ScalarType acc, in_dtype;
};

Prepared prepare(const Tensor& A, const Tensor& C, const Tensor& partner, c10::ArrayRef<double> scales,
                 int64_t filter, c10::ArrayRef<double> bayes, const char* op) {
  TORCH_CHECK(A.dim() == 2 && C.dim() == 2, op, ": A and C must be 2-D, got ", A.sizes(), " and ", C.sizes());
  TORCH_CHECK(A.size(1) == C.size(1), op, ": A and C need the same feature size, got ", A.sizes(), " and ",
              C.sizes());
  TORCH_CHECK(A.scalar_type() == C.scalar_type(), op, ": A and C must share a dtype");
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), op, ": floating-point features required, got ", A.scalar_type());
  TORCH_CHECK(C.size(0) < (int64_t(1) << 32), op, ": fewer than 2^32 contrast columns required");
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == A.size(0), op, ": `partner` must have shape [M]");
  TORCH_CHECK(!scales.empty() && scales.size() <= static_cast<size_t>(kMaxScales), op, ": 1 to ", kMaxScales,
              " scales expected, got ", scales.size());
  TORCH_CHECK(filter >= 0 && filter <= 2, op, ": filter must be 0 (none), 1 (both) or 2 (low)");
  TORCH_CHECK(bayes.empty() || (bayes.size() == 3 && scales.size() == 1), op,
              ": `bayes` is [] or [alpha, beta, tau_plus] with one scale");
  Prepared pp;
  pp.in_dtype = A.scalar_type();
  pp.acc = pp.in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  pp.M = A.size(0);
  pp.N = C.size(0);
  pp.D = A.size(1);
  pp.A = A.to(pp.acc).contiguous();
  pp.C = C.to(pp.acc).contiguous();
  pp.partner = partner.to(at::kLong).contiguous();
  const int64_t W = pp.acc == at::kDouble ? Vectorized<double>::size() : Vectorized<float>::size();
  pp.Npad = std::max<int64_t>(W, (pp.N + W - 1) / W * W);
  return pp;
}

template <typename T>
Problem<T> make_problem(const Prepared& pp, int64_t self_offset, double inv_tau, c10::ArrayRef<double> scales,
                        bool exclude_partner, bool include_self, int64_t filter, double lower, double upper,
                        c10::ArrayRef<double> bayes) {
  Problem<T> P;
  P.A = pp.A.data_ptr<T>();
  P.C = pp.C.data_ptr<T>();
  P.partner = pp.partner.data_ptr<int64_t>();
  P.M = pp.M;
  P.N = pp.N;
  P.D = pp.D;
  P.Npad = pp.Npad;
  P.self_offset = self_offset;
  P.inv_tau = static_cast<T>(inv_tau);
  P.lower = static_cast<T>(lower);
  P.upper = static_cast<T>(upper);
  P.filter = static_cast<int>(filter);
  P.exclude_partner = exclude_partner;
  P.include_self = include_self;
  P.K = static_cast<int>(scales.size());
  for (int k = 0; k < P.K; ++k) P.scales[k] = static_cast<T>(scales[k]);
  P.bayes = !bayes.empty();
  if (P.bayes) P.omega = cm::BayesOmega<T>(bayes[0], bayes[1], bayes[2]);
  return P;
}

// The rank reference of the *_ranked ops, checked and converted to the accumulation dtype.
struct RankRef {
  Tensor ref, n;
  bool on = false;
};

RankRef prepare_ref(const Prepared& pp, c10::ArrayRef<double> bayes, const Tensor& rank_ref, const Tensor& rank_n,
                    const char* op) {
  TORCH_CHECK(!bayes.empty(), op, ": a rank reference is only used with the Bayesian weights (`bayes` given)");
  TORCH_CHECK(rank_ref.dim() == 2 && rank_ref.size(0) == pp.M, op, ": rank_ref must have shape [M, L], got ",
              rank_ref.sizes());
  TORCH_CHECK(rank_n.dim() == 1 && rank_n.size(0) == pp.M, op, ": rank_n must have shape [M]");
  RankRef rr;
  rr.ref = rank_ref.to(pp.acc).contiguous();
  rr.n = rank_n.to(at::kLong).contiguous();
  if (pp.M > 0) {
    TORCH_CHECK(rr.n.min().item<int64_t>() >= 0 && rr.n.max().item<int64_t>() <= rank_ref.size(1), op,
                ": rank_n must lie in [0, L]");
  }
  rr.on = true;
  return rr;
}

template <typename T>
void attach_ref(Problem<T>& P, const RankRef& rr) {
  if (!rr.on) return;
  P.ref = rr.ref.data_ptr<T>();
  P.ref_n = rr.n.data_ptr<int64_t>();
  P.ref_ld = rr.ref.size(1);
}

std::tuple<Tensor, Tensor, Tensor> ssl_fwd_run(const Tensor& A, const Tensor& C, const Tensor& partner,
                                               int64_t self_offset, double inv_tau, c10::ArrayRef<double> scales,
                                               bool exclude_partner, bool include_self, int64_t filter, double lower,
                                               double upper, c10::ArrayRef<double> bayes, const Tensor* rank_ref,
                                               const Tensor* rank_n, const char* op, bool symmetric = false) {
  if (symmetric) check_symmetric(A, C, self_offset, bayes, op);
  Prepared pp = prepare(A, C, partner, scales, filter, bayes, op);
  const RankRef rr = rank_ref != nullptr ? prepare_ref(pp, bayes, *rank_ref, *rank_n, op) : RankRef();
  const int64_t K = static_cast<int64_t>(scales.size());
  auto opts = A.options().dtype(pp.acc);
  Tensor lse = at::empty({K, pp.M}, opts), pos = at::empty({pp.M}, opts), pos_in = at::empty({pp.M}, opts);
  if (pp.M > 0) {
    AT_DISPATCH_FLOATING_TYPES(pp.A.scalar_type(), "ssl_fwd_cpu", [&] {
      auto P = make_problem<scalar_t>(pp, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower,
                                      upper, bayes);
      attach_ref(P, rr);
      if (symmetric && sym_ok(P, /*forward=*/true)) {
        sym_forward_impl<scalar_t>(P, lse.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(), pos_in.data_ptr<scalar_t>());
      } else {
        forward_impl<scalar_t>(P, lse.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(), pos_in.data_ptr<scalar_t>());
      }
    });
  }
  return {lse, pos, pos_in};
}

std::tuple<Tensor, Tensor, Tensor> ssl_fwd_cpu(const Tensor& A, const Tensor& C, const Tensor& partner,
                                               int64_t self_offset, double inv_tau, c10::ArrayRef<double> scales,
                                               bool exclude_partner, bool include_self, int64_t filter, double lower,
                                               double upper, c10::ArrayRef<double> bayes, bool symmetric) {
  return ssl_fwd_run(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower, upper,
                     bayes, nullptr, nullptr, "ltcl_fused::ssl_fwd", symmetric);
}

std::tuple<Tensor, Tensor, Tensor> ssl_fwd_ranked_cpu(const Tensor& A, const Tensor& C, const Tensor& partner,
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
                                       const Tensor& lse, const Tensor& coef, const Tensor& cpos,
                                       bool symmetric = false) {
  // symmetric: returns (dX, an empty [0, D] tensor), dX the gradient through both A and C
  if (symmetric) check_symmetric(A, C, self_offset, bayes, "ltcl_fused::ssl_bwd");
  Prepared pp = prepare(A, C, partner, scales, filter, bayes, "ltcl_fused::ssl_bwd");
  const RankRef rr =
      rank_ref != nullptr ? prepare_ref(pp, bayes, *rank_ref, *rank_n, "ltcl_fused::ssl_bwd_ranked") : RankRef();
  const int64_t K = static_cast<int64_t>(scales.size());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == K && lse.size(1) == pp.M && coef.sizes() == lse.sizes(),
              "ltcl_fused::ssl_bwd: lse and coef must have shape [K, M]");
  TORCH_CHECK(cpos.dim() == 1 && cpos.size(0) == pp.M, "ltcl_fused::ssl_bwd: cpos must have shape [M]");
  auto opts = A.options().dtype(pp.acc);
  Tensor dA, dC;  // the symmetric tiles overwrite dX: no zero fill (nor a dC) there
  if (pp.M > 0 && pp.N > 0 && pp.D > 0) {
    Tensor l = lse.to(pp.acc).contiguous(), cf = coef.to(pp.acc).contiguous(), cp = cpos.to(pp.acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(pp.A.scalar_type(), "ssl_bwd_cpu", [&] {
      auto P = make_problem<scalar_t>(pp, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower,
                                      upper, bayes);
      attach_ref(P, rr);
      BwdIn<scalar_t> in{l.data_ptr<scalar_t>(), cf.data_ptr<scalar_t>(), cp.data_ptr<scalar_t>()};
      if (symmetric && sym_ok(P, /*forward=*/false)) {
        dA = at::empty({pp.M, pp.D}, opts);
        sym_backward_impl<scalar_t>(P, in, dA.data_ptr<scalar_t>());
      } else {
        dA = at::zeros({pp.M, pp.D}, opts);
        dC = at::zeros({pp.N, pp.D}, opts);
        backward_impl<scalar_t>(P, in, dA.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>());
        if (symmetric) dA.add_(dC);
      }
    });
  }
  if (!dA.defined()) dA = at::zeros({pp.M, pp.D}, opts);
  if (symmetric) return {dA.to(pp.in_dtype), at::empty({0, pp.D}, A.options())};
  if (!dC.defined()) dC = at::zeros({pp.N, pp.D}, opts);
  return {dA.to(pp.in_dtype), dC.to(pp.in_dtype)};
}

std::tuple<Tensor, Tensor> ssl_bwd_cpu(const Tensor& A, const Tensor& C, const Tensor& partner, int64_t self_offset,
                                       double inv_tau, c10::ArrayRef<double> scales, bool exclude_partner,
                                       bool include_self, int64_t filter, double lower, double upper,
                                       c10::ArrayRef<double> bayes, const Tensor& lse, const Tensor& coef,
                                       const Tensor& cpos, bool symmetric) {
  return ssl_bwd_run(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower, upper,
                     bayes, nullptr, nullptr, lse, coef, cpos, symmetric);
}

std::tuple<Tensor, Tensor> ssl_bwd_ranked_cpu(const Tensor& A, const Tensor& C, const Tensor& partner,
                                              int64_t self_offset, double inv_tau, c10::ArrayRef<double> scales,
                                              bool exclude_partner, bool include_self, int64_t filter, double lower,
                                              double upper, c10::ArrayRef<double> bayes, const Tensor& rank_ref,
                                              const Tensor& rank_n, const Tensor& lse, const Tensor& coef,
                                              const Tensor& cpos) {
  return ssl_bwd_run(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower, upper,
                     bayes, &rank_ref, &rank_n, lse, coef, cpos);
}

// ---------------------------------------------------------------- set values (the rank sweep of column blocks)

// Row i of vals = the ascending s values of set(i) in this block (+inf after the first cnt_i), through the
// same strip GEMM and masks as the forward, so a ranked forward on the same block sees the same bits.
template <typename T>
void set_values_impl(const Problem<T>& P, T* vals, int64_t* cnt) {
  strip::forward_strips<T>(
      P, [&] { return RankScratch<T>(P.N); },
      [&](RankScratch<T>& rs, int64_t i, T* x) {
        T smax, smin;
        prepare_row(P, i, x, &rs, &smax, &smin);  // P.bayes is false: x = s on the set, -inf elsewhere
        const int64_t n = sort_set(P, x, &rs);
        T* out = vals + i * P.N;
        for (int64_t q = 0; q < n; ++q) out[q] = x[rs.idx[q]];
        for (int64_t q = n; q < P.N; ++q) out[q] = -cm::neg_inf<T>();
        cnt[i] = n;
      });
}

std::tuple<Tensor, Tensor> ssl_set_values_cpu(const Tensor& A, const Tensor& C, const Tensor& partner,
                                              int64_t self_offset, double inv_tau, bool exclude_partner,
                                              bool include_self, int64_t filter, double lower, double upper) {
  const double one[1] = {1.0};
  const c10::ArrayRef<double> scales(one, 1), no_bayes;
  Prepared pp = prepare(A, C, partner, scales, filter, no_bayes, "ltcl_fused::ssl_set_values");
  Tensor vals = at::empty({pp.M, pp.N}, A.options().dtype(pp.acc));
  Tensor cnt = at::zeros({pp.M}, A.options().dtype(at::kLong));
  if (pp.M > 0 && pp.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(pp.A.scalar_type(), "ssl_set_values_cpu", [&] {
      auto P = make_problem<scalar_t>(pp, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower,
                                      upper, no_bayes);
      set_values_impl<scalar_t>(P, vals.data_ptr<scalar_t>(), cnt.data_ptr<int64_t>());
    });
  }
  return {vals, cnt};
}

}  // namespace
}  // namespace cpu
}  // namespace ltcl

TORCH_LIBRARY_FRAGMENT(ltcl_fused, m) {
  // SSL row statistics of S = A C^T * inv_tau (contract: ltcl_fused/engine/ssl_contract.py):
  // (lse [K, M], pos [M], pos_in [M]) in the accumulation dtype. filter: 0 none, 1 "both", 2 "low";
  // bayes: [] or [alpha, beta, tau_plus].
  m.def(
      "ssl_fwd(Tensor A, Tensor C, Tensor partner, int self_offset, float inv_tau, float[] scales, "
      "bool exclude_partner, bool include_self, int filter, float lower, float upper, float[] bayes, "
      "bool symmetric=False) -> (Tensor, Tensor, Tensor)");
  // symmetric=True (C is A, self_offset 0, no bayes): the CPU kernels visit each pair of row blocks once; the
  // CUDA kernels run the general forward and one (G + G^T) X backward kernel.
  // Gradient (dA, dC) of sum_k sum_i coef_ki lse_ki + sum_i cpos_i pos_i, recomputing S; symmetric=True
  // returns (dX, an empty [0, D] tensor), dX the gradient through both A and C.
  m.def(
      "ssl_bwd(Tensor A, Tensor C, Tensor partner, int self_offset, float inv_tau, float[] scales, "
      "bool exclude_partner, bool include_self, int filter, float lower, float upper, float[] bayes, "
      "Tensor lse, Tensor coef, Tensor cpos, bool symmetric=False) -> (Tensor, Tensor)");
  // Column blocks (the contract's rank reference): (vals [M, N], cnt [M] int64), row i's ascending set values
  // in this block, +inf after the first cnt_i.
  m.def(
      "ssl_set_values(Tensor A, Tensor C, Tensor partner, int self_offset, float inv_tau, bool exclude_partner, "
      "bool include_self, int filter, float lower, float upper) -> (Tensor, Tensor)");
  // ssl_fwd / ssl_bwd with the Bayesian counts taken against rank_ref [M, L] (row i's ascending set values over
  // all blocks, the first rank_n[i] of them): u = #{rank_ref values <= s} / rank_n.
  m.def(
      "ssl_fwd_ranked(Tensor A, Tensor C, Tensor partner, int self_offset, float inv_tau, float[] scales, "
      "bool exclude_partner, bool include_self, int filter, float lower, float upper, float[] bayes, "
      "Tensor rank_ref, Tensor rank_n) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ssl_bwd_ranked(Tensor A, Tensor C, Tensor partner, int self_offset, float inv_tau, float[] scales, "
      "bool exclude_partner, bool include_self, int filter, float lower, float upper, float[] bayes, "
      "Tensor rank_ref, Tensor rank_n, Tensor lse, Tensor coef, Tensor cpos) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ltcl_fused, CPU, m) {
  m.impl("ssl_fwd", &ltcl::cpu::ssl_fwd_cpu);
  m.impl("ssl_bwd", &ltcl::cpu::ssl_bwd_cpu);
  m.impl("ssl_set_values", &ltcl::cpu::ssl_set_values_cpu);
  m.impl("ssl_fwd_ranked", &ltcl::cpu::ssl_fwd_ranked_cpu);
  m.impl("ssl_bwd_ranked", &ltcl::cpu::ssl_bwd_ranked_cpu);
}
