// CPU kernels of the row-statistics engine (contract: ltcl_fused/engine/contract.py).
//
// Forward: parallel over blocks of bm anchor rows. Per block one GEMM (MKL through at::mm_out)
// writes the bm x N strip of raw similarities into a thread-local buffer; the fused epilogue then
// walks each row while it sits in L1/L2: positives' sum, bias + self mask + running max (pass A),
// exp and sum (pass B, giving lse), and for focal losses the second pass on the same strip
// (negatives vectorised with at::vec / Sleef, positives through a per-label column list).
// The focal forward therefore costs one GEMM, not two.
//
// Backward: rows are processed in super-blocks of R rows (R fixed by N and dtype, never by the
// thread count). Phase 1, parallel over row blocks: recompute the strip, form G in place, and
// dA_blk = inv_tau * G_blk C (one GEMM per block). Phase 2, parallel over column blocks:
// dC_cols += inv_tau * G_sb[:, cols]^T A_sb. Every GEMM has a shape that does not depend on the
// number of threads and every output element is reduced in a fixed order, so results are
// bit-identical for any thread count.
//
// Symmetric path (symmetric=True: C is A, c_lab equal to a_lab, self_offset 0): the tiles of
// strip::sym_forward_tiles / sym_backward_tiles, one GEMM per pair of row blocks. Fused tiles
// (sym_fused_fwd_tile, sym_fused_tile) reduce both rows I and rows J from S_IJ itself with one exponential
// per element; a tile their accuracy guards decline takes the generic tile code, whose per-element
// epilogues (backward_cols, neg_focal_acc, the ltcl_math.h terms) are the general path's.
// GEMM-equivalents forward+backward: general 4, symmetric 2, focal included: the focal forward is one pass
// over the tiles, the negatives' f-/u- summed from power sums of that pass's exponentials (exact where a
// block holds a negative with p >= kSeriesMaxP), the positives' terms from their logits kept by the pass.
// docs/performance_cpu.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../common/ltcl_math.h"
#include "../symmetric_check.h"
#include "strip_common.h"

// MKL (linked into torch's CPU wheels) is asked to run every GEMM of a worker single-threaded, so a
// GEMM gives the same bits whether called from one thread or from inside the parallel region
// (otherwise MKL may split the k dimension differently). Weak: torch builds without MKL skip it.
// (MKL_Set_Num_Threads_Local is the by-value C entry point; the lower-case name is the Fortran one.)

namespace ltcl {
namespace cpu {

using strip::hmax;
using strip::hsum;

using at::Tensor;
using at::vec::Vectorized;
namespace cm = ltcl::common;

// Columns grouped by label: the positives of an anchor are one contiguous run of `perm`.
struct LabelIndex {
  std::vector<int32_t> cid;    // dense label id of every column
  std::vector<int32_t> aid;    // dense label id of every anchor, -1 when no column has its label
  std::vector<int64_t> perm;   // columns sorted by (label, index)
  std::vector<int64_t> start;  // run of label id k: perm[start[k] .. start[k+1])
};

static LabelIndex build_index(const int64_t* alab, int64_t M, const int64_t* clab, int64_t N) {
  LabelIndex ix;
  ix.perm.resize(N);
  std::iota(ix.perm.begin(), ix.perm.end(), int64_t(0));
  std::stable_sort(ix.perm.begin(), ix.perm.end(), [&](int64_t a, int64_t b) { return clab[a] < clab[b]; });
  ix.cid.assign(N, 0);
  std::vector<int64_t> uniq;
  for (int64_t k = 0; k < N; ++k) {
    const int64_t j = ix.perm[k];
    if (k == 0 || clab[j] != clab[ix.perm[k - 1]]) {
      uniq.push_back(clab[j]);
      ix.start.push_back(k);
    }
    ix.cid[j] = static_cast<int32_t>(uniq.size() - 1);
  }
  ix.start.push_back(N);
  ix.aid.assign(M, -1);
  for (int64_t i = 0; i < M; ++i) {
    auto it = std::lower_bound(uniq.begin(), uniq.end(), alab[i]);
    if (it != uniq.end() && *it == alab[i]) ix.aid[i] = static_cast<int32_t>(it - uniq.begin());
  }
  return ix;
}

template <typename T>
struct Problem {
  const T* A;
  const T* C;
  int64_t M, N, D, Npad;
  const T* clabf;  // [Npad] dense label ids as T (padding: -2, never an anchor id)
  const T* bs;     // [Npad] bias_same (padding 0) or nullptr
  const T* bo;     // [Npad] bias_other (padding 0) or nullptr
  const LabelIndex* ix;
  int64_t self_offset;
  T inv_tau, gamma;
  bool focal;
  // symmetric path: blk[k * (nblk + 1) + J] = offset in label k's run of its first column >= J * bsz
  const int64_t* blk = nullptr;
  int64_t bsz = 0, nblk = 0;

  int64_t self_col(int64_t i) const {
    if (self_offset < 0) return -1;
    const int64_t j = i + self_offset;
    return j < N ? j : -1;
  }
  const int64_t* pos_list(int64_t i, int64_t* n) const {
    const int32_t id = ix->aid[i];
    if (id < 0) {
      *n = 0;
      return nullptr;
    }
    *n = ix->start[id + 1] - ix->start[id];
    return ix->perm.data() + ix->start[id];
  }
  // the positives of anchor i among the columns [c0, c1) (a sub-run: a run is sorted by column index)
  const int64_t* pos_range(int64_t i, int64_t c0, int64_t c1, int64_t* n) const {
    int64_t np = 0;
    const int64_t* pl = pos_list(i, &np);
    if (np == 0) {
      *n = 0;
      return nullptr;
    }
    if (blk != nullptr && c0 % bsz == 0) {  // a tile's columns: two table reads
      const int32_t id = ix->aid[i];
      const int64_t J0 = c0 / bsz, J1 = std::min(nblk, (c1 + bsz - 1) / bsz);
      *n = blk[id * (nblk + 1) + J1] - blk[id * (nblk + 1) + J0];
      return pl + blk[id * (nblk + 1) + J0];
    }
    const int64_t* a = std::lower_bound(pl, pl + np, c0);
    const int64_t* b = std::lower_bound(a, pl + np, c1);
    *n = b - a;
    return a;
  }
};

template <typename T>
static inline bool any_lane(const Vectorized<T>& mask) {
  constexpr int W = Vectorized<T>::size();
  const int full = static_cast<int>((W >= 32) ? -1 : ((1u << W) - 1u));
  return mask.zero_mask() != full;
}

// f- = -log1p(-p) and u- = p / (1 - p) summed into fa, ua for the lanes of pn (the negatives' p <= 1/2, 0 on
// every other lane). When every lane is below 2^-7 (the common case: p ~ 1/N; measured: all but 5e-5 of
// the vectors of the N = 8192 benchmark), both are series cut where the next term is below rounding:
// -log1p(-p) = p (1 + p/2 + p^2/3 + ...) and p / (1 - p) = p (1 + p + p^2 + ...), K terms (fp32: 5, the
// first term left out p^5 / 6 < 2^-35 relative; fp64: 8): no Sleef call and no division. Otherwise Sleef's
// log1p and a division. NaN lanes take that branch (NaN in, NaN out).
template <typename T>
static inline void neg_focal_acc(const Vectorized<T>& pn, Vectorized<T>& fa, Vectorized<T>& ua) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  const Vec small = pn < Vec(T(0.0078125));
  if (small.zero_mask() == 0) {
    constexpr int K = sizeof(T) == 4 ? 5 : 8;
    Vec f(T(1) / T(K)), u(one);
    for (int k = K - 1; k >= 1; --k) {
      f = at::vec::fmadd(f, pn, Vec(T(1) / T(k)));
      u = at::vec::fmadd(u, pn, one);
    }
    fa = at::vec::fmadd(f, pn, fa);
    ua = at::vec::fmadd(u, pn, ua);
  } else {
    fa = fa - (Vec(T(0)) - pn).log1p();
    ua = ua + pn / (one - pn);
  }
}

// u- = p / (1 - p) of the lanes of pn (p <= 1/2; 0 elsewhere): the series of neg_focal_acc when every lane
// is below 2^-7, else a division.
template <typename T>
static inline Vectorized<T> neg_u(const Vectorized<T>& pn) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  if ((pn < Vec(T(0.0078125))).zero_mask() != 0) return pn / (one - pn);
  constexpr int K = sizeof(T) == 4 ? 5 : 8;
  Vec u(one);
  for (int k = K - 1; k >= 1; --k) u = at::vec::fmadd(u, pn, one);
  return u * pn;
}

// u+ = -w (1 + gamma rho) of the lanes of a positive off the dominant column (p <= 1/2, logp = log p):
// w = (1 - p)^gamma, rho = -p log p / (1 - p), focal_pos_offtop's formulas; w by repeated squaring for an
// integer gamma in [1, 16] (ngamma), else exp(gamma log1p(-p)); gamma == 0: -1.
template <typename T>
static inline Vectorized<T> pos_u(const Vectorized<T>& p, const Vectorized<T>& logp, T gamma, int ngamma) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  if (gamma == T(0)) return Vec(T(-1));
  Vec w(one);
  if (ngamma > 0) {
    Vec base = one - p;
    for (int k = ngamma; k > 0; k >>= 1) {
      if (k & 1) w = w * base;
      base = base * base;
    }
  } else {
    w = strip::vexp<T>(Vec(gamma) * (Vec(T(0)) - p).log1p());
  }
  const Vec rho = (Vec(T(0)) - p) * logp / (one - p);
  return (Vec(T(0)) - w) * at::vec::fmadd(Vec(gamma), rho, one);
}

// The row's dominant column's own focal terms, from lrest (p and 1 - p as the contract's row_logp gives them
// there): a positive adds f+ and u+ to (fp, up); a negative adds its f- to fn, its u- not (uneg leaves the top
// out, the backward's rt carries it). Shared by the general forward and the symmetric merge.
template <typename T>
static inline void add_top_focal(T lrest, bool is_pos, T gamma, T* fp, T* up, T* fn) {
  T lp, l1, f, u;
  cm::elem_logp<T>(T(0), T(0), true, lrest, &lp, &l1);  // the top branch reads lrest only
  if (is_pos) {
    cm::focal_pos<T>(lp, l1, true, lrest, gamma, &f, &u);
    *fp += f;
    *up += u;
  } else {
    cm::focal_neg<T>(lp, l1, &f, &u);
    *fn += f;
  }
}

// ---------------------------------------------------------------- forward

struct FwdOut {
  void* lse;
  void* pos;
  void* fpos;
  void* fneg;
  void* upos;
  void* uneg;
  int64_t* top;
  void* lrest;
};

// x: raw similarities of row i (Npad wide, clobbered); e: Npad scratch (focal only).
template <typename T>
static void forward_row(const Problem<T>& P, int64_t i, T* x, T* e, const FwdOut& o) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  T* out_lse = static_cast<T*>(o.lse);
  T* out_lrest = static_cast<T*>(o.lrest);
  T* out_f[4] = {static_cast<T*>(o.fpos), static_cast<T*>(o.fneg), static_cast<T*>(o.upos), static_cast<T*>(o.uneg)};
  const T ninf = cm::neg_inf<T>();
  const int64_t self = P.self_col(i);
  const bool has_valid = P.N - (self >= 0 ? 1 : 0) > 0;
  int64_t np = 0;
  const int64_t* pl = P.pos_list(i, &np);
  const int32_t aid = P.ix->aid[i];
  const T li = static_cast<T>(aid);

  T psum = T(0);
  for (int64_t k = 0; k < np; ++k) {
    const int64_t j = pl[k];
    if (j != self) psum += x[j] * P.inv_tau;
  }
  if (self >= 0) x[self] = ninf;
  for (int64_t j = P.N; j < P.Npad; ++j) x[j] = ninf;

  // pass A: x = s * inv_tau + bias (in place), running max
  const Vec vinv(P.inv_tau), vli(li);
  Vec vmax(ninf);
  for (int64_t j = 0; j < P.Npad; j += W) {
    Vec v = Vec::loadu(x + j) * vinv;
    if (P.bs != nullptr) {
      const Vec same = (Vec::loadu(P.clabf + j) == vli);
      v = v + Vec::blendv(Vec::loadu(P.bo + j), Vec::loadu(P.bs + j), same);
    }
    v.store(x + j);
    vmax = at::vec::maximum(vmax, v);
  }
  const T m = hmax(vmax);  // NaN if a logit is NaN
  static_cast<T*>(o.pos)[i] = psum;
  for (T* f : out_f) f[i] = T(0);
  o.top[i] = -1;
  T m2 = m, lse, lrest;  // the other columns' LSE as (m2, s2): see cm::top_rest_finish
  auto finish = [&](T s2) {  // false: a poisoned row (NaN statistics)
    if (cm::top_rest_finish(m, m2, s2, has_valid, &lse, &lrest)) return true;
    out_lse[i] = out_lrest[i] = lse;
    for (T* f : out_f) f[i] = lse;
    return false;
  };
  if (!(m > ninf && m < -ninf)) {  // no dominant column: an empty row (-inf) or a poisoned one (NaN)
    m2 = ninf;
    if (finish(T(0))) out_lse[i] = out_lrest[i] = lse;
    return;
  }
  // the dominant column: first j with x_j = m
  int64_t top = -1;
  const Vec vm(m);
  for (int64_t j = 0; j < P.Npad && top < 0; j += W) {
    if (any_lane<T>(Vec::loadu(x + j) == vm)) {
      for (int64_t l = 0; l < W; ++l) {
        if (x[j + l] == m) {
          top = j + l;
          break;
        }
      }
    }
  }
  // pass B: s2 = sum over the other columns of exp(x - m2), m2 = m (rest itself); keep the exponentials for
  // pass C. Only when that rest is tiny (a lead of more than ~46 nats in fp32, ~460 in fp64), where terms
  // may have underflowed, is it redone relative to the other columns' own max m2 (s2 in [1, n] then): exact
  // at any lead, and no extra work per element on the common path.
  x[top] = ninf;
  auto sum_exp = [&](T ref) {
    const Vec vr(ref);
    Vec acc(T(0));
    for (int64_t j = 0; j < P.Npad; j += W) {
      const Vec ev = (Vec::loadu(x + j) - vr).exp();
      if (P.focal) ev.store(e + j);
      acc = acc + ev;
    }
    return hsum(acc);
  };
  T s2 = sum_exp(m);
  const T tiny = sizeof(T) == 4 ? T(1e-20) : T(1e-200);
  if (s2 < tiny) {
    Vec vm2(ninf);
    for (int64_t j = 0; j < P.Npad; j += W) vm2 = at::vec::maximum(vm2, Vec::loadu(x + j));
    m2 = hmax(vm2);
    s2 = m2 > ninf ? sum_exp(m2) : T(0);  // -inf: the row's only column (e is then all 0)
  }
  x[top] = m;
  if (!finish(s2)) return;
  o.top[i] = top;
  out_lse[i] = lse;
  out_lrest[i] = lrest;
  if (!P.focal) return;

  // pass C, positives (a short list per row)
  T fp = T(0), up = T(0), fn = T(0), un = T(0);
  for (int64_t k = 0; k < np; ++k) {
    const int64_t j = pl[k];
    if (j == self) continue;
    if (j == top) {
      add_top_focal<T>(lrest, true, P.gamma, &fp, &up, &fn);
      continue;
    }
    const T lp = x[j] - lse;
    T f, u;
    cm::focal_pos_offtop<T>(lp, std::exp(lp), P.gamma, &f, &u);
    fp += f;
    up += u;
  }
  // pass C, negatives other than top (p <= 1/2): f- = -log1p(-p), u- = p / (1 - p), p = e exp(m2 - lse)
  if (m2 > ninf) {
    const Vec vis(std::exp(m2 - lse)), zero(T(0));
    Vec fa(T(0)), ua(T(0));
    for (int64_t j = 0; j < P.Npad; j += W) {  // e[top] = 0 and e[self] = 0 contribute 0
      const Vec p = Vec::loadu(e + j) * vis;
      neg_focal_acc<T>(Vec::blendv(zero, p, Vec::loadu(P.clabf + j) != vli), fa, ua);
    }
    fn = hsum(fa);
    un = hsum(ua);
  }
  if (P.ix->cid[top] != aid) add_top_focal<T>(lrest, false, P.gamma, &fp, &up, &fn);  // a negative: its f- only
  static_cast<T*>(o.fpos)[i] = fp;
  static_cast<T*>(o.upos)[i] = up;
  static_cast<T*>(o.fneg)[i] = fn;
  static_cast<T*>(o.uneg)[i] = un;
}

template <typename T>
static void forward_impl(const Problem<T>& P, const FwdOut& o) {
  strip::forward_strips<T>(
      P, [&] { return std::vector<T>(P.focal ? static_cast<size_t>(P.Npad) : 0); },
      [&](std::vector<T>& ebuf, int64_t i, T* x) { forward_row(P, i, x, ebuf.data(), o); });
}

// ---------------------------------------------------------------- symmetric forward (C is A, self_offset 0)
//
// Pass 1 (every unordered tile pair once, strip::sym_forward_tiles): per (row i, column block J) the partial
// state of the contract's streaming form, (m, top, m2, s2) over the block's columns and the positives' raw
// sum; merged per row in column-block order (top_rest_step): lse, lrest, top. Focal, one pass (default): the
// same pass also keeps the power sums Q_k of the negatives' exponentials, their largest logit and the
// positives' logits; the merge then sums f-, u- per block from the series (exact recomputation of the blocks
// with a large p), f+, u+ from the kept logits, and the dominant column's own terms from lrest. Focal, two
// passes (LTCL_CPU_SYM_FOCAL_FWD=2, or when the positives' logits would exceed LTCL_CPU_POS_STASH_BYTES): pass
// 2 recomputes the tiles and sums f+, u+, f-, u- per (row, block) directly.

// The single-pass focal forward sums the negatives' f- = -log1p(-p) and u- = p / (1 - p) from power sums:
// with p = c e, e = exp(x - m2) the block's exponentials (m2 its reference) and c = exp(m2 - lse) known only
// at the merge, f- = sum_k c^k Q_k / k and u- = sum_k c^k Q_k, Q_k = sum e^k over the block's negatives, cut
// after K terms; valid when every negative of the block has p < kSeriesMaxP (its largest logit is kept):
// truncation below rounding (fp32: p^5 / 6 < 2^-27 relative; fp64: p^8 / 9 < 2^-59). Blocks with a larger
// p are recomputed exactly (sym_exact_negatives).
template <typename T>
constexpr int kSeriesTerms = sizeof(T) == 4 ? 5 : 8;
template <typename T>
constexpr T kSeriesMaxP = sizeof(T) == 4 ? T(0.03125) : T(0.0078125);

// log kSeriesMaxP (-5 log 2, -7 log 2): the tests below compare logs (no exponential per row and block)
template <typename T>
constexpr T kLogSeriesMaxP = sizeof(T) == 4 ? T(-3.4657359027997265) : T(-4.852030263919617);

// Whether a block whose largest negative logit (off its top) is xn needs the exact sums, given the row's lse
template <typename T>
static inline bool block_needs_exact(T xn, T lse) {
  return xn > cm::neg_inf<T>() && xn - lse >= kLogSeriesMaxP<T>;
}

// f- and u- of one negative with log p = logp below kLogSeriesMaxP, added: the series of neg_focal_acc
template <typename T>
static inline void neg_terms_series(T logp, T* fn, T* un) {
  constexpr int K = kSeriesTerms<T>;
  const T p = std::exp(logp);
  T f = T(1) / T(K), u = T(1);
  for (int k = K - 1; k >= 1; --k) {
    f = f * p + T(1) / T(k);
    u = u * p + T(1);
  }
  *fn += f * p;
  *un += u * p;
}

// The fused forward's power sums are relative to the tile's largest logit rho (their m2), not to the block's
// own max: past m2 - lse > kSeriesMaxRef a term e^K that matters (p >= ~2^-6) could have underflowed
// (fp32: e^-17.5 per factor), so such a block takes the exact sums too.
template <typename T>
constexpr T kSeriesMaxRef = sizeof(T) == 4 ? T(12) : T(80);

template <typename T>
struct SymParts {  // [nb * N] each, slot J * N + i; per-thread workspaces (strip::workspace), every slot written
  T *m, *m2, *s2, *ps, *fp, *up, *fn, *un;
  int64_t* top;
  // single-pass focal forward only: power sums Q_1..Q_K, the block's largest negative logit (off its top),
  // and the positives' logits (row i's run of its label at pv + pv_off[i]; self and the block tops included)
  T* q[kSeriesTerms<T>] = {};
  T* xn = nullptr;
  T* pv = nullptr;
  const int64_t* pv_off = nullptr;
};

// Pass 1 of row i over the columns [c0, c0 + nc) (x: raw similarities, clobbered).
template <typename T>
static void sym_pass1_row(const Problem<T>& P, int64_t i, int64_t c0, int64_t nc, T* x, SymParts<T>& S,
                          int64_t slot) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t ncp = std::max<int64_t>(W, (nc + W - 1) / W * W);
  const T ninf = cm::neg_inf<T>();
  const int32_t aid = P.ix->aid[i];
  const int64_t self = (i >= c0 && i < c0 + nc) ? i - c0 : -1;
  int64_t np = 0;
  const int64_t* pl = P.pos_range(i, c0, c0 + nc, &np);
  T psum = T(0);
  for (int64_t k = 0; k < np; ++k)
    if (pl[k] != i) psum += x[pl[k] - c0] * P.inv_tau;
  if (self >= 0) x[self] = ninf;
  for (int64_t j = nc; j < ncp; ++j) x[j] = ninf;
  const bool single = S.pv != nullptr;  // the single-pass focal forward
  const T* lab_p = P.clabf + c0;
  const Vec vinv(P.inv_tau), vli(static_cast<T>(aid));
  auto logit = [&](int64_t j) {  // x = s * inv_tau + bias, stored in place
    Vec v = Vec::loadu(x + j) * vinv;
    if (P.bs != nullptr) {
      const Vec same = (Vec::loadu(lab_p + j) == vli);
      v = v + Vec::blendv(Vec::loadu(P.bo + c0 + j), Vec::loadu(P.bs + c0 + j), same);
    }
    v.store(x + j);
    return v;
  };
  Vec vmax0(ninf), vmax1(ninf);  // two chains (max latency, not throughput), in registers
  int64_t j = 0;
  for (; j + 2 * W <= ncp; j += 2 * W) {
    vmax0 = at::vec::maximum(vmax0, logit(j));
    vmax1 = at::vec::maximum(vmax1, logit(j + W));
  }
  if (j < ncp) vmax0 = at::vec::maximum(vmax0, logit(j));
  const T m = hmax(at::vec::maximum(vmax0, vmax1));
  T m2 = ninf, s2 = T(0);
  int64_t top = -1;
  constexpr int K = kSeriesTerms<T>;
  T q[K] = {};
  T xn = ninf;
  if (single && np > 0) {  // the positives' logits (before the block top is masked)
    const int64_t* run = P.ix->perm.data() + P.ix->start[aid];
    T* dst = S.pv + S.pv_off[i] + (pl - run);
    for (int64_t k = 0; k < np; ++k) dst[k] = x[pl[k] - c0];
  }
  if (m > ninf && m < -ninf) {
    const Vec vm(m);
    constexpr int full = static_cast<int>((W >= 32) ? -1 : ((1u << W) - 1u));
    for (int64_t jj = 0; jj < ncp; jj += W) {  // first lane equal to m: the lowest clear bit of the zero mask
      const int eq = ~(Vec::loadu(x + jj) == vm).zero_mask() & full;
      if (eq != 0) {
        top = jj + __builtin_ctz(static_cast<unsigned>(eq));
        break;
      }
    }
    x[top] = ninf;
    auto sum_exp = [&](T ref) {
      const Vec vr(ref);
      Vec acc0(T(0)), acc1(T(0));
      int64_t jj = 0;
      for (; jj + 2 * W <= ncp; jj += 2 * W) {
        acc0 = acc0 + (Vec::loadu(x + jj) - vr).exp();
        acc1 = acc1 + (Vec::loadu(x + jj + W) - vr).exp();
      }
      if (jj < ncp) acc0 = acc0 + (Vec::loadu(x + jj) - vr).exp();
      return hsum(acc0 + acc1);
    };
    // single pass, focal: the same exponentials also give Q_k over the negatives (self, top, padding: e = 0)
    auto sum_exp_q = [&](T ref) {
      const Vec vr(ref), zero(T(0));
      Vec acc(T(0)), vxn(ninf), vq[K];
      for (int k = 0; k < K; ++k) vq[k] = zero;
      for (int64_t jj = 0; jj < ncp; jj += W) {
        const Vec xv = Vec::loadu(x + jj);
        const Vec ev = (xv - vr).exp();
        acc = acc + ev;
        const Vec neg = Vec::loadu(lab_p + jj) != vli;
        vxn = at::vec::maximum(vxn, Vec::blendv(Vec(ninf), xv, neg));
        const Vec en = Vec::blendv(zero, ev, neg);
        Vec pk = en;
        for (int k = 0; k < K; ++k) {
          vq[k] = vq[k] + pk;
          if (k + 1 < K) pk = pk * en;
        }
      }
      for (int k = 0; k < K; ++k) q[k] = hsum(vq[k]);
      xn = hmax(vxn);
      return hsum(acc);
    };
    // (m2, s2) with m2 = m as the reference; redone from the block's own second max when tiny (see forward_row)
    m2 = m;
    s2 = single ? sum_exp_q(m) : sum_exp(m);
    if (s2 < (sizeof(T) == 4 ? T(1e-20) : T(1e-200))) {
      Vec vm2(ninf);
      for (int64_t j = 0; j < ncp; j += W) vm2 = at::vec::maximum(vm2, Vec::loadu(x + j));
      m2 = hmax(vm2);
      s2 = m2 > ninf ? (single ? sum_exp_q(m2) : sum_exp(m2)) : T(0);
    }
    top += c0;
  }
  if (single) {
    for (int k = 0; k < K; ++k) S.q[k][slot] = q[k];
    S.xn[slot] = xn;
  }
  S.m[slot] = m;
  S.top[slot] = top;
  S.m2[slot] = m2;
  S.s2[slot] = s2;
  S.ps[slot] = psum;
}

// Pass 2 of row i over the columns [c0, c0 + nc), given its finished lse, lrest and top.
template <typename T>
static void sym_pass2_row(const Problem<T>& P, int64_t i, int64_t c0, int64_t nc, T* x, T lse, int64_t top,
                          SymParts<T>& S, int64_t slot) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t ncp = std::max<int64_t>(W, (nc + W - 1) / W * W);
  const T ninf = cm::neg_inf<T>();
  T fp = T(0), up = T(0), fn = T(0), un = T(0);
  if (lse > ninf && lse < -ninf && top >= 0) {  // else the row's sums are set at the merge
    const int32_t aid = P.ix->aid[i];
    int64_t np = 0;
    const int64_t* pl = P.pos_range(i, c0, c0 + nc, &np);
    for (int64_t k = 0; k < np; ++k) {  // positives off self and the dominant column
      const int64_t j = pl[k];
      if (j == i || j == top) continue;
      const T lp = x[j - c0] * P.inv_tau + (P.bs != nullptr ? P.bs[j] : T(0)) - lse;
      T f, u;
      cm::focal_pos_offtop<T>(lp, std::exp(lp), P.gamma, &f, &u);
      fp += f;
      up += u;
    }
    if (i >= c0 && i < c0 + nc) x[i - c0] = ninf;
    if (top >= c0 && top < c0 + nc) x[top - c0] = ninf;
    for (int64_t j = nc; j < ncp; ++j) x[j] = ninf;
    const T* lab_p = P.clabf + c0;
    const Vec vinv(P.inv_tau), vli(static_cast<T>(aid)), vl(lse), zero(T(0));
    Vec fa(T(0)), ua(T(0));
    for (int64_t j = 0; j < ncp; j += W) {  // negatives: p = exp(x - lse) <= 1/2
      const Vec neg = (Vec::loadu(lab_p + j) != vli);
      Vec v = Vec::loadu(x + j) * vinv;
      if (P.bo != nullptr) v = v + Vec::loadu(P.bo + c0 + j);
      if (!any_lane<T>(neg)) continue;
      neg_focal_acc<T>(Vec::blendv(zero, (v - vl).exp(), neg), fa, ua);
    }
    fn = hsum(fa);
    un = hsum(ua);
  }
  S.fp[slot] = fp;
  S.up[slot] = up;
  S.fn[slot] = fn;
  S.un[slot] = un;
}

// ---------------------------------------------------------------- symmetric forward, fused tiles
//
// Pass 1 of both the rows of I over the columns J and the rows of J over the columns I from the tile S_IJ
// itself, one exponential per element: with rho the tile's largest logit, e_ij = exp(x_ij - rho) gives row
// i's sum over J (a horizontal sum) and column j's sum over I (a vertical one). Per row and per column the
// first pass finds the max and its first index (the partial's top), which the second leaves out of the sum:
// the rest, kept as (m2, s2) = (rho, rest) with no subtraction. Where the rest is tiny (terms may have
// underflowed against rho) it is redone relative to its own max (m2 = the max of the others), as
// sym_pass1_row does. Focal (the single pass): the same e_ij, masked to
// the negatives, give the power sums Q_k of both sides (their reference m2 = rho; the merge treats a block
// whose reference exceeds lse by more than kSeriesMaxRef as needing the exact sums) and the largest negative
// logit, each side leaving its own top out: a column's top row is masked in the vector pass (and added back
// to that row's sums), a row's top in its one chunk. Tiles with a NaN or +inf logit go to the generic path
// (poisoned rows), as do biased problems and the two-pass focal forward.
template <typename T>
struct SymFwdScratch {
  std::vector<T> cmax, cidx, csum, rmax, ridx, rsum, cxn, rxn;
  std::vector<T> cq, rq;  // focal: [kSeriesTerms][n] power sums of the columns / rows
  explicit SymFwdScratch(int64_t n)
      : cmax(static_cast<size_t>(n)), cidx(cmax), csum(cmax), rmax(cmax), ridx(cmax), rsum(cmax), cxn(cmax),
        rxn(cmax), cq(static_cast<size_t>(n * kSeriesTerms<T>)), rq(cq) {}
};

#if defined(CPU_CAPABILITY_AVX512)
// Passes A and B of sym_fused_fwd_tile for fp32 with AVX-512 mask registers (the generic at::vec code there
// spends a compare-to-vector and a vector-to-mask per blend and three instructions per NaN-aware max). The
// same outputs in sc (rmax, ridx, rsum, rxn, rq of the rows; cmax, cidx, csum, cxn, cq of the columns: the
// caller has reset the column arrays) from the same formulas; returns rho, NaN when a logit is NaN (the tile
// then goes to the generic path). The generic code serves fp64 and the AVX2 / default builds (tested there).
static float fused_fwd_passes_avx512(const Problem<float>& P, SymFwdScratch<float>& sc, bool single, bool diag,
                                     int64_t r0, int64_t nr, int64_t c0, int64_t nc, const float* s, int64_t ld) {
  constexpr int K = kSeriesTerms<float>;
  const int64_t ncp = (nc + 15) / 16 * 16, jlast = ncp - 16;
  const __mmask16 tail = nc % 16 == 0 ? __mmask16(0xFFFF) : __mmask16((1u << (nc % 16)) - 1u);
  const float finf = std::numeric_limits<float>::infinity();
  const __m512 vinv = _mm512_set1_ps(P.inv_tau), ninf = _mm512_set1_ps(-finf), zero = _mm512_setzero_ps();
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  float *cmax = sc.cmax.data(), *cidx = sc.cidx.data(), *csum = sc.csum.data(), *cxn = sc.cxn.data();
  float *cq = sc.cq.data(), *rq = sc.rq.data();
  const float* clab = P.clabf + c0;
  auto logit = [&](const float* xr, int64_t r, int64_t j) {
    __m512 v;
    if (j < jlast || tail == 0xFFFF) {
      v = _mm512_mul_ps(_mm512_loadu_ps(xr + j), vinv);
    } else {
      v = _mm512_mask_mov_ps(ninf, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, xr + j), vinv));
    }
    if (diag && r >= j && r < j + 16) v = _mm512_mask_mov_ps(v, __mmask16(1u << (r - j)), ninf);
    return v;
  };
  // pass A
  __mmask16 bad = 0;
  __m512 vall = ninf;
  for (int64_t r = 0; r < nr; ++r) {
    const float* xr = s + r * ld;
    const __m512 vr = _mm512_set1_ps(static_cast<float>(r));
    __m512 vmax = ninf, vidx = zero;
    for (int64_t j = 0; j < ncp; j += 16) {
      const __m512 v = logit(xr, r, j);
      bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vall = _mm512_max_ps(vall, v);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, gt, v);
      vidx = _mm512_mask_mov_ps(vidx, gt, _mm512_add_ps(iota, _mm512_set1_ps(static_cast<float>(j))));
      const __mmask16 cgt = _mm512_cmp_ps_mask(v, _mm512_loadu_ps(cmax + j), _CMP_GT_OQ);
      _mm512_mask_storeu_ps(cmax + j, cgt, v);
      _mm512_mask_storeu_ps(cidx + j, cgt, vr);
    }
    const float m = _mm512_reduce_max_ps(vmax);
    float idx = -1.0f;
    if (m > -finf) {
      const __mmask16 eq = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(m), _CMP_EQ_OQ);
      idx = _mm512_reduce_min_ps(_mm512_mask_mov_ps(_mm512_set1_ps(finf), eq, vidx));
    }
    sc.rmax[r] = m;
    sc.ridx[r] = idx;
  }
  if (bad != 0) return std::numeric_limits<float>::quiet_NaN();
  const float rho = _mm512_reduce_max_ps(vall);
  if (!(rho < finf)) return rho;
  // pass B
  const __m512 vrho = _mm512_set1_ps(rho > -finf ? rho : 0.0f);
  for (int64_t r = 0; r < nr; ++r) {
    const float* xr = s + r * ld;
    __m512 acc = zero;
    const __m512 vr = _mm512_set1_ps(static_cast<float>(r));
    const int64_t tj = static_cast<int64_t>(sc.ridx[r]), jt = tj < 0 ? -1 : tj - tj % 16;
    const __mmask16 offtop = jt < 0 ? __mmask16(0xFFFF) : __mmask16(~(1u << (tj - jt)));
    if (!single) {
      for (int64_t j = 0; j < ncp; j += 16) {
        const __m512 e = strip::exp16(_mm512_sub_ps(logit(xr, r, j), vrho));
        acc = _mm512_add_ps(acc, j == jt ? _mm512_maskz_mov_ps(offtop, e) : e);
        const __m512 ec = diag ? e : _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(cidx + j), vr, _CMP_NEQ_UQ), e);
        _mm512_storeu_ps(csum + j, _mm512_add_ps(_mm512_loadu_ps(csum + j), ec));
      }
      sc.rsum[r] = _mm512_reduce_add_ps(acc);
      continue;
    }
    const __m512 vli = _mm512_set1_ps(P.clabf[r0 + r]);
    __m512 vq[K], vxn = ninf;
    for (int k = 0; k < K; ++k) vq[k] = zero;
    for (int64_t j = 0; j < ncp; j += 16) {
      const __m512 xv = logit(xr, r, j);
      const __m512 e = strip::exp16(_mm512_sub_ps(xv, vrho));
      acc = _mm512_add_ps(acc, j == jt ? _mm512_maskz_mov_ps(offtop, e) : e);
      const __mmask16 ncol = diag ? __mmask16(0xFFFF) : _mm512_cmp_ps_mask(_mm512_loadu_ps(cidx + j), vr, _CMP_NEQ_UQ);
      _mm512_storeu_ps(csum + j, _mm512_add_ps(_mm512_loadu_ps(csum + j), _mm512_maskz_mov_ps(ncol, e)));
      const __mmask16 neg = _mm512_cmp_ps_mask(_mm512_loadu_ps(clab + j), vli, _CMP_NEQ_UQ) & ncol;
      const __m512 en = _mm512_maskz_mov_ps(neg, e);
      _mm512_mask_storeu_ps(cxn + j, neg, _mm512_max_ps(_mm512_loadu_ps(cxn + j), xv));
      const __mmask16 rneg = j == jt ? __mmask16(neg & offtop) : neg;
      vxn = _mm512_mask_max_ps(vxn, rneg, vxn, xv);
      __m512 pk = en;
      for (int k = 0; k < K; ++k) {
        vq[k] = _mm512_add_ps(vq[k], j == jt ? _mm512_maskz_mov_ps(rneg, pk) : pk);
        _mm512_storeu_ps(cq + k * ncp + j, _mm512_add_ps(_mm512_loadu_ps(cq + k * ncp + j), pk));
        if (k + 1 < K) pk = _mm512_mul_ps(pk, en);
      }
    }
    sc.rsum[r] = _mm512_reduce_add_ps(acc);
    sc.rxn[r] = _mm512_reduce_max_ps(vxn);
    for (int k = 0; k < K; ++k) rq[k * nr + r] = _mm512_reduce_add_ps(vq[k]);
  }
  return rho;
}
#endif

template <typename T>
static bool sym_fused_fwd_tile(const Problem<T>& P, SymParts<T>& S, SymFwdScratch<T>& sc, int mode, int64_t I,
                               int64_t J, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* s, int64_t ld) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int K = kSeriesTerms<T>;
  const bool single = S.pv != nullptr;  // the single-pass focal forward
  if (P.bs != nullptr || (P.focal && !single)) return false;
  const int64_t N = P.N, ncp = (nc + W - 1) / W * W;
  const bool diag = I == J;
  const T ninf = cm::neg_inf<T>();
  const Vec vinv(P.inv_tau), vninf(ninf), iota = Vec::arange(T(0), T(1));
  T *cmax = sc.cmax.data(), *cidx = sc.cidx.data(), *csum = sc.csum.data();
  std::fill(cmax, cmax + ncp, ninf);
  std::fill(cidx, cidx + ncp, T(0));
  std::fill(csum, csum + ncp, T(0));
  // logits of row r, columns j .. j + W: -inf at self and past nc
  auto logit = [&](const T* xr, int64_t r, int64_t j) {
    const int64_t cnt = nc - j;
    Vec v;
    if (cnt >= W) {
      v = Vec::loadu(xr + j) * vinv;
    } else {
      v = Vec::blendv(vninf, Vec::loadu(xr + j, cnt) * vinv, iota < Vec(static_cast<T>(cnt)));
    }
    if (diag && r >= j && r < j + W) v = Vec::blendv(v, vninf, iota == Vec(static_cast<T>(r - j)));
    return v;
  };
  const Vec zero(T(0));
  const T* clab = P.clabf + c0;  // Npad-padded: -2 past N (never a label)
  T *cxn = sc.cxn.data(), *cq = sc.cq.data(), *rq = sc.rq.data();
  if (single) {
    std::fill(cxn, cxn + ncp, ninf);
    std::fill(cq, cq + K * ncp, T(0));
  }
  T rho;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same<T, float>::value) {
    rho = fused_fwd_passes_avx512(P, sc, single, diag, r0, nr, c0, nc, s, ld);
    if (!(rho < -ninf)) return strip::sym_fused_declined(mode, "a NaN or +inf logit");
  } else  // NOLINT(readability/braces)
#endif
  {
  // pass A: maxima and first arg-maxima of the rows and of the columns; NaN / +inf detection
  Vec vall(ninf);
  for (int64_t r = 0; r < nr; ++r) {
    const T* xr = s + r * ld;
    const Vec vr(static_cast<T>(r));
    Vec vmax(ninf), vidx(T(0));
    for (int64_t j = 0; j < ncp; j += W) {
      const Vec v = logit(xr, r, j);
      vall = at::vec::maximum(vall, v);
      const Vec gt = v > vmax;
      vmax = Vec::blendv(vmax, v, gt);
      vidx = Vec::blendv(vidx, iota + Vec(static_cast<T>(j)), gt);
      const Vec cm0 = Vec::loadu(cmax + j), cgt = v > cm0;
      Vec::blendv(cm0, v, cgt).store(cmax + j);
      Vec::blendv(Vec::loadu(cidx + j), vr, cgt).store(cidx + j);
    }
    const T m = hmax(vmax);
    T idx = T(-1);
    if (m > ninf) {
      alignas(64) T mv[W], iv[W];
      vmax.store(mv);
      vidx.store(iv);
      for (int64_t l = 0; l < W; ++l)
        if (mv[l] == m && (idx < T(0) || iv[l] < idx)) idx = iv[l];
    }
    sc.rmax[r] = m;
    sc.ridx[r] = idx;
  }
  rho = hmax(vall);
  if (!(rho < -ninf)) return strip::sym_fused_declined(mode, "a NaN or +inf logit");
  // pass B: e = exp(x - rho), row sums and column sums (rho = -inf: no column at all, a self-only tile)
  const Vec vrho(rho > ninf ? rho : T(0));
  for (int64_t r = 0; r < nr; ++r) {
    const T* xr = s + r * ld;
    Vec acc(T(0));
    const Vec vr(static_cast<T>(r));
    const int64_t tj = static_cast<int64_t>(sc.ridx[r]), jt = tj < 0 ? -1 : tj - tj % W;
    const Vec toplane = iota == Vec(static_cast<T>(jt < 0 ? -1 : tj - jt));
    // each side leaves its own top out of its sum: a row's in its one chunk, a column's by pass A's arg-max
    auto row_part = [&](int64_t j, const Vec& e) { return j == jt ? Vec::blendv(e, zero, toplane) : e; };
    auto col_part = [&](int64_t j, const Vec& e) {
      return diag ? e : Vec::blendv(zero, e, Vec::loadu(cidx + j) != vr);
    };
    if (!single) {
      for (int64_t j = 0; j < ncp; j += W) {
        const Vec e = strip::vexp<T>(logit(xr, r, j) - vrho);
        acc = acc + row_part(j, e);
        (Vec::loadu(csum + j) + col_part(j, e)).store(csum + j);
      }
      sc.rsum[r] = hsum(acc);
      continue;
    }
    const Vec vli(P.clabf[r0 + r]);
    Vec vq[K], vxn(ninf);
    for (int k = 0; k < K; ++k) vq[k] = zero;
    for (int64_t j = 0; j < ncp; j += W) {
      const Vec xv = logit(xr, r, j);
      const Vec e = strip::vexp<T>(xv - vrho);
      acc = acc + row_part(j, e);
      (Vec::loadu(csum + j) + col_part(j, e)).store(csum + j);
      const Vec neg = Vec::loadu(clab + j) != vli;
      // negatives, the columns whose top this row is left out (their sums are the columns'; added back below)
      const Vec negc = diag ? neg : (neg & (Vec::loadu(cidx + j) != vr));
      const Vec xneg = Vec::blendv(vninf, xv, negc), en = Vec::blendv(zero, e, negc);
      at::vec::maximum(Vec::loadu(cxn + j), xneg).store(cxn + j);
      if (j == jt) {  // the row's own top: not in its sums (in the column's, unless it is that column's top)
        const Vec& top = toplane;
        Vec pk = en, pr = Vec::blendv(en, zero, top);
        vxn = at::vec::maximum(vxn, Vec::blendv(xneg, vninf, top));
        for (int k = 0; k < K; ++k) {
          vq[k] = vq[k] + pr;
          (Vec::loadu(cq + k * ncp + j) + pk).store(cq + k * ncp + j);
          pk = pk * en;
          pr = Vec::blendv(pk, zero, top);
        }
        continue;
      }
      vxn = at::vec::maximum(vxn, xneg);
      Vec pk = en;
      for (int k = 0; k < K; ++k) {
        vq[k] = vq[k] + pk;
        (Vec::loadu(cq + k * ncp + j) + pk).store(cq + k * ncp + j);
        if (k + 1 < K) pk = pk * en;
      }
    }
    sc.rsum[r] = hsum(acc);
    sc.rxn[r] = hmax(vxn);
    for (int k = 0; k < K; ++k) rq[k * nr + r] = hsum(vq[k]);
  }
  }
  if (single && !diag) {  // a negative whose column has this row as its top: back into the row's sums
    for (int64_t c = 0; c < nc; ++c) {
      if (!(cmax[c] > ninf)) continue;
      const int64_t r = static_cast<int64_t>(cidx[c]);
      if (c == static_cast<int64_t>(sc.ridx[r]) || P.clabf[c0 + c] == P.clabf[r0 + r]) continue;
      const T xv = s[r * ld + c] * P.inv_tau, e = std::exp(xv - rho);
      sc.rxn[r] = std::max(sc.rxn[r], xv);
      T pk = e;
      for (int k = 0; k < K; ++k, pk *= e) rq[k * nr + r] += pk;
    }
  }
  const T tiny = sizeof(T) == 4 ? T(1e-20) : T(1e-200);
  // one partial: (m, top, m2, s2) from the max tm at tj (local index; -1: none), the sum of the other terms
  // (the rest), and rest_exact(&m2, &s2) for the rest relative to its own max
  // (focal: q[K] and xn, the power sums and largest negative logit off the top, relative to rho; rest_exact
  // redoes them relative to its m2 too)
  auto partial = [&](int64_t slot, T tm, int64_t tj, int64_t base, T rest, T* q, T xn, auto&& rest_exact) {
    S.m[slot] = tm;
    if (!(tm > ninf)) {
      S.top[slot] = -1;
      S.m2[slot] = ninf;
      S.s2[slot] = T(0);
      if (single) {
        for (int k = 0; k < K; ++k) S.q[k][slot] = T(0);
        S.xn[slot] = ninf;
      }
      return;
    }
    T m2 = rho, s2 = rest;
    if (!(rest >= tiny)) rest_exact(&m2, &s2, q, &xn);
    S.top[slot] = base + tj;
    S.m2[slot] = m2;
    S.s2[slot] = s2;
    if (single) {
      for (int k = 0; k < K; ++k) S.q[k][slot] = q[k];
      S.xn[slot] = xn;
    }
  };
  // the positives' logits of row or column i among [a, a + n) (at their places in i's run), for the focal merge
  auto stash = [&](int64_t i, const int64_t* pl, int64_t np, auto&& value) {
    if (!single || np == 0) return;
    const int64_t* run = P.ix->perm.data() + P.ix->start[P.ix->aid[i]];
    T* dst = S.pv + S.pv_off[i] + (pl - run);
    for (int64_t k = 0; k < np; ++k) dst[k] = value(pl[k]);
  };
  T qbuf[K];
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r, tj = static_cast<int64_t>(sc.ridx[r]);
    const T* xr = s + r * ld;
    int64_t np = 0;
    const int64_t* pl = P.pos_range(i, c0, c0 + nc, &np);
    T psum = T(0);
    for (int64_t k = 0; k < np; ++k)
      if (pl[k] != i) psum += xr[pl[k] - c0] * P.inv_tau;
    S.ps[J * N + i] = psum;
    stash(i, pl, np, [&](int64_t j) { return xr[j - c0] * P.inv_tau; });
    for (int k = 0; k < K; ++k) qbuf[k] = single ? rq[k * nr + r] : T(0);
    partial(J * N + i, sc.rmax[r], tj, c0, sc.rsum[r], qbuf, single ? sc.rxn[r] : ninf,
            [&](T* m2, T* s2, T* q, T* xn) {
      const Vec lane(static_cast<T>(tj % W)), vli(P.clabf[i]);
      const int64_t jt = tj - tj % W;
      auto other = [&](int64_t j) {
        const Vec v = logit(xr, r, j);
        return j == jt ? Vec::blendv(v, vninf, iota == lane) : v;
      };
      Vec vm(ninf);
      for (int64_t j = 0; j < ncp; j += W) vm = at::vec::maximum(vm, other(j));
      *m2 = hmax(vm);
      Vec acc(T(0)), vq[K], vxn(ninf);
      for (int k = 0; k < K; ++k) vq[k] = zero;
      if (*m2 > ninf) {
        const Vec vm2(*m2);
        for (int64_t j = 0; j < ncp; j += W) {
          const Vec xv = other(j), e = (xv - vm2).exp();
          acc = acc + e;
          if (!single) continue;
          const Vec neg = Vec::loadu(clab + j) != vli;
          vxn = at::vec::maximum(vxn, Vec::blendv(vninf, xv, neg));
          const Vec en = Vec::blendv(zero, e, neg);
          Vec pk = en;
          for (int k = 0; k < K; ++k, pk = pk * en) vq[k] = vq[k] + pk;
        }
      }
      *s2 = hsum(acc);
      if (single) {
        for (int k = 0; k < K; ++k) q[k] = hsum(vq[k]);
        *xn = hmax(vxn);
      }
    });
  }
  if (diag) return true;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t j = c0 + c, ti = cmax[c] > ninf ? static_cast<int64_t>(cidx[c]) : -1;
    int64_t np = 0;
    const int64_t* pl = P.pos_range(j, r0, r0 + nr, &np);
    T psum = T(0);
    for (int64_t k = 0; k < np; ++k) psum += s[(pl[k] - r0) * ld + c] * P.inv_tau;
    S.ps[I * N + j] = psum;
    stash(j, pl, np, [&](int64_t i) { return s[(i - r0) * ld + c] * P.inv_tau; });
    for (int k = 0; k < K; ++k) qbuf[k] = single ? cq[k * ncp + c] : T(0);
    partial(I * N + j, cmax[c], ti, r0, csum[c], qbuf, single ? cxn[c] : ninf, [&](T* m2, T* s2, T* q, T* xn) {
      T mx = ninf;
      for (int64_t r = 0; r < nr; ++r)
        if (r != ti) mx = std::max(mx, s[r * ld + c] * P.inv_tau);
      T acc = T(0), xm = ninf;
      for (int k = 0; k < K; ++k) q[k] = T(0);
      if (mx > ninf) {
        for (int64_t r = 0; r < nr; ++r) {
          if (r == ti) continue;
          const T xv = s[r * ld + c] * P.inv_tau, e = std::exp(xv - mx);
          acc += e;
          if (single && P.clabf[r0 + r] != P.clabf[j]) {
            xm = std::max(xm, xv);
            T pk = e;
            for (int k = 0; k < K; ++k, pk *= e) q[k] += pk;
          }
        }
      }
      *m2 = mx;
      *s2 = acc;
      *xn = xm;
    });
  }
  return true;
}

// P with the block table of pos_range for tiles of b columns (table: its storage)
template <typename T>
static Problem<T> with_block_index(const Problem<T>& P0, int64_t b, std::vector<int64_t>* table) {
  Problem<T> P = P0;
  const int64_t nb = (P.N + b - 1) / b, nl = static_cast<int64_t>(P.ix->start.size()) - 1;
  table->assign(static_cast<size_t>(std::max<int64_t>(nl, 0) * (nb + 1)), 0);
  for (int64_t k = 0; k < nl; ++k) {
    const int64_t* run = P.ix->perm.data() + P.ix->start[k];
    const int64_t len = P.ix->start[k + 1] - P.ix->start[k];
    for (int64_t J = 0; J <= nb; ++J)
      (*table)[k * (nb + 1) + J] = std::lower_bound(run, run + len, std::min(J * b, P.N)) - run;
  }
  P.blk = table->data();
  P.bsz = b;
  P.nblk = nb;
  return P;
}

// f- = -log1p(-p) and u- = p / (1 - p) of one negative off the dominant column (p = exp(logp) <= 1/2), added
template <typename T>
static inline void neg_terms_exact(T logp, T* fn, T* un) {
  const T p = std::exp(logp);
  *fn -= std::log1p(-p);
  *un += p / (T(1) - p);
}

// Exact f-, u- of the negatives of rows `rows` over the columns of block J (off self and the row's dominant
// column), for the blocks whose largest p is too big for the series of the single-pass forward: one GEMM of
// the gathered rows against the block's columns, then the scalar formulas. Written to S.fn / S.un[J * N + i].
template <typename T>
static void sym_exact_negatives(const Problem<T>& P, int64_t J, int64_t b, const std::vector<int64_t>& rows,
                                const T* lse, const int64_t* tops, SymParts<T>& S) {
  const int64_t c0 = J * b, nc = std::min(b, P.N - c0), nr = static_cast<int64_t>(rows.size());
  std::vector<T> xs(static_cast<size_t>(nr * P.D)), sim(static_cast<size_t>(nr * nc));
  for (int64_t r = 0; r < nr; ++r) std::copy(P.A + rows[r] * P.D, P.A + (rows[r] + 1) * P.D, xs.data() + r * P.D);
  if (P.D > 0) {
    at::Tensor o = strip::view2d(sim.data(), nr, nc, nc, 1);
    at::mm_out(o, strip::view2d(xs.data(), nr, P.D, P.D, 1), strip::view2d(P.A + c0 * P.D, nc, P.D, P.D, 1).t());
  }
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = rows[r];
    const int32_t aid = P.ix->aid[i];
    T fn = T(0), un = T(0);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t j = c0 + c;
      if (j == i || j == tops[i] || P.ix->cid[j] == aid) continue;
      neg_terms_exact<T>(sim[r * nc + c] * P.inv_tau + (P.bo != nullptr ? P.bo[j] : T(0)) - lse[i], &fn, &un);
    }
    S.fn[J * P.N + i] = fn;
    S.un[J * P.N + i] = un;
  }
}

// Bytes of the positives' logits the single-pass focal forward keeps (sum over the anchors of their label's
// column count); above LTCL_CPU_POS_STASH_BYTES (default 128 MB) the focal forward takes two passes.
template <typename T>
static bool pos_stash(const Problem<T>& P, std::vector<int64_t>* off) {
  off->assign(static_cast<size_t>(P.N + 1), 0);
  for (int64_t i = 0; i < P.N; ++i) {
    const int32_t id = P.ix->aid[i];
    (*off)[i + 1] = (*off)[i] + (id < 0 ? 0 : P.ix->start[id + 1] - P.ix->start[id]);
  }
  return (*off)[P.N] * static_cast<int64_t>(sizeof(T)) <= strip::env_int("LTCL_CPU_POS_STASH_BYTES", int64_t(128) << 20);
}

// focal: single pass (power sums; the default when the positives' logits fit pos_stash) or two passes
// (pass 2 recomputes the tiles once lse is known: LTCL_CPU_SYM_FOCAL_FWD=2, or when they do not fit)
template <typename T>
static void sym_forward_impl(const Problem<T>& P0, const FwdOut& o) {
  std::vector<int64_t> table;
  const int64_t b = strip::sym_block<T>(P0.N);
  const Problem<T> P = with_block_index(P0, b, &table);
  const int64_t N = P.N;
  const int64_t nb = strip::SymGrid(N, b).nb;
  constexpr int K = kSeriesTerms<T>;
  std::vector<int64_t> pv_off;
  const bool single = P.focal && strip::env_int("LTCL_CPU_SYM_FOCAL_FWD", 1) != 2 && pos_stash(P, &pv_off);
  SymParts<T> S;
  const size_t slots = static_cast<size_t>(nb * N);
  const size_t narr = P.focal ? (single ? 7 + K : 8) : 4;
  T* ws = strip::workspace<T>(slots * narr, 1);
  S.m = ws;
  S.m2 = ws + slots;
  S.s2 = ws + 2 * slots;
  S.ps = ws + 3 * slots;
  if (P.focal) {
    S.fn = ws + 4 * slots;
    S.un = ws + 5 * slots;
  }
  if (P.focal && !single) {
    S.fp = ws + 6 * slots;
    S.up = ws + 7 * slots;
  }
  if (single) {
    S.xn = ws + 6 * slots;
    for (int k = 0; k < K; ++k) S.q[k] = ws + (7 + k) * slots;
    S.pv = strip::workspace<T>(static_cast<size_t>(std::max<int64_t>(pv_off[N], 1)), 0);
    S.pv_off = pv_off.data();
  }
  S.top = strip::workspace<int64_t>(slots, 2);
  auto none = [] { return 0; };
  const int fused = strip::sym_fused_mode();
  strip::sym_forward_tiles<T>(
      P.A, N, P.D, [&] { return SymFwdScratch<T>(b + Vectorized<T>::size()); },
      [&](SymFwdScratch<T>&, int64_t r0, int64_t nr, int64_t c0, int64_t nc, int64_t J, T* x, int64_t ld) {
        for (int64_t r = 0; r < nr; ++r) sym_pass1_row(P, r0 + r, c0, nc, x + r * ld, S, J * N + r0 + r);
      },
      [&](SymFwdScratch<T>& sc, int64_t I, int64_t J, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* x,
          int64_t ld) { return fused != 0 && sym_fused_fwd_tile(P, S, sc, fused, I, J, r0, nr, c0, nc, x, ld); });
  T* out_lse = static_cast<T*>(o.lse);
  T* out_lrest = static_cast<T*>(o.lrest);
  T* out_pos = static_cast<T*>(o.pos);
  T* out_f[4] = {static_cast<T*>(o.fpos), static_cast<T*>(o.fneg), static_cast<T*>(o.upos), static_cast<T*>(o.uneg)};
  const T ninf = cm::neg_inf<T>();
  const bool has_valid = N > 1;
  at::parallel_for(0, N, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T m = ninf, m2 = ninf, s2 = T(0), psum = T(0);
      int64_t top = -1;
      bool bad = false;
      for (int64_t J = 0; J < nb; ++J) {
        const int64_t sl = J * N + i;
        psum += S.ps[sl];
        const T tm = S.m[sl];
        if (!(tm == tm) || tm == -ninf) {
          bad = true;
          continue;
        }
        cm::top_rest_step<T>(&m, &top, &m2, &s2, tm, S.top[sl], S.m2[sl], S.s2[sl]);
      }
      out_pos[i] = psum;
      for (T* f : out_f) f[i] = T(0);
      o.top[i] = -1;
      T lse, lrest;
      if (bad || !(m > ninf)) {  // poisoned (a NaN or +inf logit) or every logit -inf / no column
        if (bad) s2 = cm::quiet_nan<T>();
        if (!bad) m2 = ninf;
        if (cm::top_rest_finish<T>(m, m2, bad ? s2 : T(0), has_valid, &lse, &lrest)) {
          out_lse[i] = out_lrest[i] = lse;
        } else {
          out_lse[i] = out_lrest[i] = lse;
          for (T* f : out_f) f[i] = lse;
        }
        continue;
      }
      if (!cm::top_rest_finish<T>(m, m2, s2, has_valid, &lse, &lrest)) {
        out_lse[i] = out_lrest[i] = lse;
        for (T* f : out_f) f[i] = lse;
        continue;
      }
      o.top[i] = top;
      out_lse[i] = lse;
      out_lrest[i] = lrest;
    }
  });
  if (!P.focal) return;
  const int64_t* tops = o.top;
  if (single) {
    // the blocks whose largest negative p is too big for the series, recomputed exactly (per column block)
    at::parallel_for(0, nb, 1, [&](int64_t J0, int64_t J1) {
      strip::SequentialBlas seq;
      for (int64_t J = J0; J < J1; ++J) {
        std::vector<int64_t> rows;
        for (int64_t i = 0; i < N; ++i) {
          const T xn = S.xn[J * N + i];
          if (tops[i] >= 0 && (block_needs_exact(xn, out_lse[i]) || S.m2[J * N + i] - out_lse[i] > kSeriesMaxRef<T>))
            rows.push_back(i);
        }
        if (!rows.empty()) sym_exact_negatives<T>(P, J, b, rows, out_lse, tops, S);
      }
    });
  } else {
    strip::sym_forward_tiles<T>(
        P.A, N, P.D, none,
        [&](int, int64_t r0, int64_t nr, int64_t c0, int64_t nc, int64_t J, T* x, int64_t ld) {
          for (int64_t r = 0; r < nr; ++r)
            sym_pass2_row(P, r0 + r, c0, nc, x + r * ld, out_lse[r0 + r], tops[r0 + r], S, J * N + r0 + r);
        },
        [](int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, int64_t) { return false; });
  }
  at::parallel_for(0, N, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t top = tops[i];
      if (top < 0) continue;  // empty or poisoned row: set above
      const T lse = out_lse[i], lrest = out_lrest[i];
      const int32_t aid = P.ix->aid[i];
      T fp = T(0), up = T(0), fn = T(0), un = T(0);
      if (single) {
        const int64_t* run = aid < 0 ? nullptr : P.ix->perm.data() + P.ix->start[aid];
        const T* pv = S.pv + S.pv_off[i];
        for (int64_t k = 0; k < S.pv_off[i + 1] - S.pv_off[i]; ++k) {  // positives off self and top
          const int64_t j = run[k];
          if (j == i || j == top) continue;
          const T lp = pv[k] - lse;
          T f, u;
          cm::focal_pos_offtop<T>(lp, std::exp(lp), P.gamma, &f, &u);
          fp += f;
          up += u;
        }
        for (int64_t J = 0; J < nb; ++J) {  // negatives, block by block
          const int64_t sl = J * N + i;
          const T xn = S.xn[sl];
          if (block_needs_exact(xn, lse) || S.m2[sl] - lse > kSeriesMaxRef<T>) {  // exact (sym_exact_negatives)
            fn += S.fn[sl];
            un += S.un[sl];
            continue;
          }
          if (S.m2[sl] > ninf) {  // the series off the block's top: c = exp(m2 - lse) <= 1
            const T c = std::exp(S.m2[sl] - lse);
            T f = T(0), u = T(0);
            for (int k = K - 1; k >= 0; --k) {
              f = (f + S.q[k][sl] / T(k + 1)) * c;
              u = (u + S.q[k][sl]) * c;
            }
            fn += f;
            un += u;
          }
          const int64_t tj = S.top[sl];  // the block's top, when a negative other than the row's top
          if (tj >= 0 && tj != top && P.ix->cid[tj] != aid) {
            const T lpt = S.m[sl] - lse;
            if (lpt < kLogSeriesMaxP<T>) {
              neg_terms_series<T>(lpt, &fn, &un);
            } else {
              neg_terms_exact<T>(lpt, &fn, &un);
            }
          }
        }
      } else {
        for (int64_t J = 0; J < nb; ++J) {
          const int64_t sl = J * N + i;
          fp += S.fp[sl];
          up += S.up[sl];
          fn += S.fn[sl];
          un += S.un[sl];
        }
      }
      add_top_focal<T>(lrest, P.ix->cid[top] == aid, P.gamma, &fp, &up, &fn);  // the dominant column
      static_cast<T*>(o.fpos)[i] = fp;
      static_cast<T*>(o.upos)[i] = up;
      static_cast<T*>(o.fneg)[i] = fn;
      static_cast<T*>(o.uneg)[i] = un;
    }
  });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct BwdIn {
  const T *lse, *lrest, *cpos, *cposf, *cneg, *r, *rt;
  const int64_t* top;
};

// G_ij of the contract at one valid column j of row i (not self) with logit x = s inv_tau + b: the dominant
// column's formula (from lrest) or the generic one. backward_cols' positives and dominant negative, and the
// special entries of the fused symmetric tiles.
template <typename T>
static inline T grad_entry(const Problem<T>& P, const BwdIn<T>& in, int64_t i, int64_t j, T x) {
  const T lse = in.lse[i], lrest = in.lrest[i], cpos = in.cpos[i], r = in.r[i];
  const T cposf = P.focal ? in.cposf[i] : T(0), cneg = P.focal ? in.cneg[i] : T(0);
  const bool pos = P.ix->cid[j] == P.ix->aid[i];
  if (j == in.top[i]) {
    T lp, l1;
    cm::elem_logp<T>(x, lse, true, lrest, &lp, &l1);
    return cm::grad_top<T>(lp, l1, lrest, pos, P.focal, P.gamma, cpos, cposf, cneg, r);
  }
  // log p = x - lse with x rounded exactly as the forward rounded it (the file is compiled without fp
  // contraction): at large |x| (big norms, small tau) that consistency is what keeps x - lse exact
  return cm::grad_element_offtop<T>(x - lse, lrest, pos, P.focal, P.gamma, cpos, cposf, cneg, r,
                                    P.focal ? in.rt[i] : T(0));
}

// G of row i over the columns [c0, c0 + nc): on entry x holds their raw similarities (padded to a multiple
// of W, c0 a multiple of W), on exit G_ij (0 at self and padding). The general path passes the whole row
// (c0 = 0, nc = N), the symmetric path one tile's columns. posg: scratch, one entry per positive column.
//   G = 1[P] (cpos + cposf u+) + 1[N] cneg u- - r p - rt p / rest   (contract: engine/contract.py)
template <typename T>
static void backward_cols(const Problem<T>& P, int64_t i, int64_t c0, int64_t nc, T* x, const BwdIn<T>& in,
                          T* posg) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t ncp = std::max<int64_t>(W, (nc + W - 1) / W * W);
  const T ninf = cm::neg_inf<T>();
  const T lse = in.lse[i];
  const int64_t top = in.top[i];
  if (lse == ninf) {  // empty row: no valid column, zero gradient (a NaN lse, a poisoned row, gives NaN)
    // (top < 0 with a finite lse: the row's dominant column lies outside these columns, as when the
    // distributed ring passes one block of columns; every column then takes the generic formula)
    std::fill(x, x + ncp, T(0));
    return;
  }
  const T lrest = in.lrest[i], r = in.r[i];
  const T cneg = P.focal ? in.cneg[i] : T(0), rt = P.focal ? in.rt[i] : T(0);
  const int64_t self_g = P.self_col(i);
  const int64_t self = (self_g >= c0 && self_g < c0 + nc) ? self_g - c0 : -1;  // local
  const bool top_here = top >= c0 && top < c0 + nc;
  const int32_t aid = P.ix->aid[i];
  int64_t np = 0;
  const int64_t* pl = P.pos_range(i, c0, c0 + nc, &np);
  auto xval = [&](int64_t jg) {
    return x[jg - c0] * P.inv_tau + (P.bs != nullptr ? (P.ix->cid[jg] == aid ? P.bs[jg] : P.bo[jg]) : T(0));
  };
  for (int64_t k = 0; k < np; ++k) {
    const int64_t j = pl[k];
    if (j != self_g) posg[k] = grad_entry(P, in, i, j, xval(j));
  }
  const bool top_neg = top_here && P.ix->cid[top] != aid;
  const T gtop = top_neg ? grad_entry(P, in, i, top, xval(top)) : T(0);
  for (int64_t j = nc; j < ncp; ++j) x[j] = ninf;
  const T li = static_cast<T>(aid);
  const T* lab_p = P.clabf + c0;
  const T* bs_p = P.bs != nullptr ? P.bs + c0 : nullptr;
  const T* bo_p = P.bo != nullptr ? P.bo + c0 : nullptr;
  const Vec vinv(P.inv_tau), vli(li), vnr(-r), vcn(cneg), zero(T(0)), one(T(1));
  const bool negterm = cneg != T(0);
  // top, positives, self and padding are overwritten below. G = -r p [+ cneg p / (1 - p) on negatives]
  // [- rt p / rest]: with the dominant negative's share, e = exp((x - lse) - lrest) = p / rest <= 1 and
  // p = e rest (one exp per element either way; 1 / rest itself may overflow). x - lse first: lse + lrest
  // would round away the small difference when |lse| is large.
  const bool spread = rt != T(0) && lrest > ninf;
  const Vec vl(lse), vlr(spread ? lrest : T(0)), vrest(spread ? std::exp(lrest) : T(1)), vnrt(-rt);
  for (int64_t j = 0; j < ncp; j += W) {
    Vec xv = Vec::loadu(x + j) * vinv;
    const Vec lab = Vec::loadu(lab_p + j);
    if (bs_p != nullptr) xv = xv + Vec::blendv(Vec::loadu(bo_p + j), Vec::loadu(bs_p + j), lab == vli);
    const Vec d = xv - vl;  // log p
    Vec p, g;
    if (spread) {
      const Vec e = (d - vlr).exp();
      p = e * vrest;
      g = vnrt * e + vnr * p;
    } else {
      p = d.exp();
      g = vnr * p;
    }
    if (negterm) g = g + vcn * neg_u<T>(Vec::blendv(zero, p, lab != vli));
    g.store(x + j);
  }
  for (int64_t k = 0; k < np; ++k) {
    const int64_t j = pl[k];
    if (j != self_g) x[j - c0] = posg[k];
  }
  if (top_neg) x[top - c0] = gtop;
  if (self >= 0) x[self] = T(0);
  for (int64_t j = nc; j < ncp; ++j) x[j] = T(0);
}

template <typename T>
static void backward_impl(const Problem<T>& P, const BwdIn<T>& in, T* dA, T* dC) {
  strip::backward_strips<T>(
      P, dA, dC, [&] { return std::vector<T>(static_cast<size_t>(P.N)); },
      [&](std::vector<T>& posg, int64_t i, T* x) { backward_cols(P, i, 0, P.N, x, in, posg.data()); });
}

// ---------------------------------------------------------------- symmetric backward, fused tiles
//
// H = G_IJ + G_JIᵀ of a tile straight from S_IJ with ONE exponential per element (the generic path takes
// two, p_ij = exp(x - lse_i) and p_ji = exp(x - lse_j), on the tile and on its transpose). With
// h_k = lse_k / 2, c the middle of the tile's h and E_k = exp(h_k - c):
//   e_ij = exp((x_ij - lse_i) + (h_i - h_j)) = exp(x_ij - h_i - h_j) <= 1,
//   p_ij = e_ij E_j / E_i,   p_ji = e_ij E_i / E_j,
// and off the special entries (self, the rows' and columns' dominant columns)
// G_ij = -R_i p_ij + [j in N(i)] cneg_i u-(p_ij) + [j in P(i)] (cpos_i + cposf_i u+(p_ij)),
// R_i = r_i + rt_i exp(-lrest_i), so that
//   no negative terms (cneg = 0): H_ij = e_ij (nu_i E_j + E_i nu_j) + [P] (...),  nu_k = -R_k / E_k;
//   else:   H_ij = -R_i p_ij - R_j p_ji + [N] (cneg_i u-(p_ij) + cneg_j u-(p_ji)) + [P] (...),
// [P] (...) = cpos_i + cpos_j + cposf_i u+(p_ij) + cposf_j u+(p_ji), evaluated only on the vectors that hold a
// positive (u+ by pos_u from p and log p = x - lse, both sides' p <= 1/2 off their tops). The special entries
// are then set from the scalar contract formulas (grad_top, grad_element_offtop) of both rows. Taken only
// where it is as accurate as the generic path (else the tile goes to backward_cols): no bias, every lse
// finite with |lse| <= kFusedAbs, the tile's lse within 2 kFusedRange of each other (so E in
// [e^-kFusedRange / 2, e^kFusedRange / 2] and a p_ij above e^-(87 - kFusedRange) in fp32 cannot underflow in
// e_ij), and rt_i exp(-lrest_i) and every coefficient finite.

template <typename T>
struct SymBwdScratch {
  enum { kH, kE, kIE, kNR, kNU, kCN, kCP, kCPF, kLab, kArrays };
  std::vector<T> posg;   // backward_cols' positives (the generic path)
  std::vector<T> sides;  // [2][kArrays][bpad]: the tile's rows (side 0) and columns (side 1)
  int64_t bpad = 0;
  T* arr(int side, int a) { return sides.data() + (side * kArrays + a) * bpad; }
};


// H of the tile (rows r0 .. r0 + nr, columns c0 .. c0 + nc; s: raw S, h: out, both nr x ld); false: not taken
template <typename T>
static bool sym_fused_tile(const Problem<T>& P, const BwdIn<T>& in, SymBwdScratch<T>& sc, int mode, int64_t r0,
                           int64_t nr, int64_t c0, int64_t nc, const T* s, int64_t ld, T* h) {
  using Vec = Vectorized<T>;
  using SC = SymBwdScratch<T>;
  constexpr int64_t W = Vec::size();
  if (P.bs != nullptr) return false;
  T lo = std::numeric_limits<T>::infinity(), hi = -lo;
  bool focal_terms = false, pos_focal = false;
  auto fill = [&](int side, int64_t k0, int64_t n) {
    T *hh = sc.arr(side, SC::kH), *nR = sc.arr(side, SC::kNR), *cn = sc.arr(side, SC::kCN);
    T *cp = sc.arr(side, SC::kCP), *cpf = sc.arr(side, SC::kCPF), *lab = sc.arr(side, SC::kLab);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = k0 + k;
      const T l = in.lse[i];
      if (!(std::abs(l) <= strip::kFusedAbs<T>)) return false;  // also NaN and -inf (empty rows)
      T R = in.r[i];
      if (P.focal && in.rt[i] != T(0)) R += in.rt[i] * std::exp(-in.lrest[i]);
      const T cnk = P.focal ? in.cneg[i] : T(0), cpfk = P.focal ? in.cposf[i] : T(0);
      if (!std::isfinite(R) || !std::isfinite(cnk) || !std::isfinite(in.cpos[i]) || !std::isfinite(cpfk))
        return false;
      focal_terms = focal_terms || cnk != T(0);
      pos_focal = pos_focal || cpfk != T(0);
      hh[k] = l * T(0.5);
      lo = std::min(lo, hh[k]);
      hi = std::max(hi, hh[k]);
      nR[k] = -R;
      cn[k] = cnk;
      cp[k] = in.cpos[i];
      cpf[k] = cpfk;
      lab[k] = P.clabf[i];
    }
    return true;
  };
  if (!fill(0, r0, nr) || !fill(1, c0, nc)) return strip::sym_fused_declined(mode, "a non-finite or large lse or coefficient");
  if (hi - lo > strip::kFusedRange<T>) return strip::sym_fused_declined(mode, "the tile's lse too far apart");
  const T mid = (hi + lo) * T(0.5);
  const int64_t ncp = (nc + W - 1) / W * W;
  for (int side = 0; side < 2; ++side) {
    const int64_t n = side == 0 ? nr : nc, npad = side == 0 ? n : ncp;
    T *hh = sc.arr(side, SC::kH), *E = sc.arr(side, SC::kE), *iE = sc.arr(side, SC::kIE);
    T *nR = sc.arr(side, SC::kNR), *nu = sc.arr(side, SC::kNU);
    for (int64_t k = 0; k < n; ++k) {
      E[k] = std::exp(hh[k] - mid);
      iE[k] = T(1) / E[k];
      nu[k] = nR[k] * iE[k];
    }
    for (int64_t k = n; k < npad; ++k) {  // padding columns: H = 0 there (never read)
      for (int a = 0; a < SC::kArrays; ++a) sc.arr(side, a)[k] = T(0);
      sc.arr(side, SC::kLab)[k] = T(-3);
    }
  }
  const T *chh = sc.arr(1, SC::kH), *cE = sc.arr(1, SC::kE), *ciE = sc.arr(1, SC::kIE), *cnR = sc.arr(1, SC::kNR);
  const T *cnu = sc.arr(1, SC::kNU), *ccn = sc.arr(1, SC::kCN), *ccp = sc.arr(1, SC::kCP), *clab = sc.arr(1, SC::kLab);
  const T* ccpf = sc.arr(1, SC::kCPF);
  const Vec vinv(P.inv_tau), zero(T(0)), two(T(2));
  const int ngamma = [&] {
    const int n = static_cast<int>(P.gamma);
    return (static_cast<T>(n) == P.gamma && n >= 1 && n <= 16) ? n : 0;
  }();
  // The row loop, compiled for the terms the tile has: the plain softmax-family tile (supcon, cl; the common
  // case) then keeps its few live vectors in registers and adds the positives by a blend, with no branch.
  auto rows = [&](auto focal_c, auto posf_c) {
    constexpr bool kFocal = decltype(focal_c)::value, kPosF = decltype(posf_c)::value;
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = r0 + r;
      const T* xr = s + r * ld;
      T* hr = h + r * ld;
      const Vec vl(in.lse[i]), vh(sc.arr(0, SC::kH)[r]), vE(sc.arr(0, SC::kE)[r]), viE(sc.arr(0, SC::kIE)[r]);
      const Vec vnu(sc.arr(0, SC::kNU)[r]), vnR(sc.arr(0, SC::kNR)[r]), vcn(sc.arr(0, SC::kCN)[r]);
      const Vec vcp(sc.arr(0, SC::kCP)[r]), vcpf(sc.arr(0, SC::kCPF)[r]), vli(sc.arr(0, SC::kLab)[r]);
      for (int64_t j = 0; j < ncp; j += W) {
        const int64_t cnt = std::min<int64_t>(W, nc - j);
        const Vec xv = (cnt == W ? Vec::loadu(xr + j) : Vec::loadu(xr + j, cnt)) * vinv;
        const Vec e = strip::vexp<T>((xv - vl) + (vh - Vec::loadu(chh + j)));
        const Vec lab = Vec::loadu(clab + j), same = lab == vli;
        Vec H;
        if constexpr (!kFocal && !kPosF) {
          H = e * at::vec::fmadd(vnu, Vec::loadu(cE + j), vE * Vec::loadu(cnu + j)) +
              Vec::blendv(zero, vcp + Vec::loadu(ccp + j), same);
        } else {
          const bool has_pos = any_lane<T>(same);
          Vec pr, pc;  // p_ij and p_ji, where a term below needs them
          if (kFocal || has_pos) {
            pr = e * (Vec::loadu(cE + j) * viE);
            pc = e * (vE * Vec::loadu(ciE + j));
          }
          if constexpr (!kFocal) {
            H = e * at::vec::fmadd(vnu, Vec::loadu(cE + j), vE * Vec::loadu(cnu + j));
          } else {
            const Vec neg = lab != vli;
            H = at::vec::fmadd(vnR, pr, Vec::loadu(cnR + j) * pc) + vcn * neg_u<T>(Vec::blendv(zero, pr, neg)) +
                Vec::loadu(ccn + j) * neg_u<T>(Vec::blendv(zero, pc, neg));
          }
          if (has_pos) {  // positives: cpos (+ cposf u+ of a focal loss) of both sides
            Vec hp = vcp + Vec::loadu(ccp + j);
            if constexpr (kPosF) {  // off both sides' tops (their entries are set below): p <= 1/2 on either side
              hp = at::vec::fmadd(vcpf, pos_u<T>(pr, xv - vl, P.gamma, ngamma), hp);
              hp = at::vec::fmadd(Vec::loadu(ccpf + j),
                                  pos_u<T>(pc, xv - two * Vec::loadu(chh + j), P.gamma, ngamma), hp);
            }
            H = H + Vec::blendv(zero, hp, same);
          }
        }
        if (cnt == W) {
          H.store(hr + j);
        } else {
          H.store(hr + j, cnt);
        }
      }
    }
  };
  strip::with_flag(focal_terms, [&](auto fc) { strip::with_flag(pos_focal, [&](auto pc) { rows(fc, pc); }); });
  // the special entries from the scalar formulas of both rows
  auto fix = [&](int64_t i, int64_t j) {
    const int64_t o = (i - r0) * ld + (j - c0);
    const T x = s[o] * P.inv_tau;
    h[o] = grad_entry(P, in, i, j, x) + grad_entry(P, in, j, i, x);
  };
  const bool diag = r0 == c0;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    const int64_t t = in.top[i];
    if (t >= c0 && t < c0 + nc) {
      fix(i, t);
      if (diag) fix(t, i);
    }
  }
  if (diag) {
    for (int64_t r = 0; r < nr; ++r) h[r * ld + r] = T(0);
  } else {
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t t = in.top[c0 + c];
      if (t >= r0 && t < r0 + nr) fix(t, c0 + c);
    }
  }
  return true;
}

// Symmetric backward (C is A): dX = inv_tau (G + Gᵀ) X on the tiles of strip::sym_backward_tiles: H of a tile
// by sym_fused_tile where it applies (LTCL_CPU_SYM_FUSED: sym_fused_mode), else G's rows by the general path's
// backward_cols on S_IJ and on its transpose.
template <typename T>
static void sym_backward_impl(const Problem<T>& P0, const BwdIn<T>& in, T* dX) {
  std::vector<int64_t> table;
  const int64_t b = strip::sym_bwd_block<T>(P0.N, P0.Npad);
  const Problem<T> P = with_block_index(P0, b, &table);
  const int fused = strip::sym_fused_mode();
  strip::sym_backward_tiles<T>(
      P.A, P.N, P.D, b, P.inv_tau, dX,
      [&] {
        SymBwdScratch<T> sc;
        sc.posg.resize(static_cast<size_t>(P.N));
        sc.bpad = b + Vectorized<T>::size();
        sc.sides.resize(static_cast<size_t>(2 * SymBwdScratch<T>::kArrays * sc.bpad));
        return sc;
      },
      [&](SymBwdScratch<T>& sc, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* x, int64_t ld) {
        for (int64_t r = 0; r < nr; ++r) backward_cols(P, r0 + r, c0, nc, x + r * ld, in, sc.posg.data());
      },
      [&](SymBwdScratch<T>& sc, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* x, int64_t ld, T* h) {
        return fused != 0 && sym_fused_tile(P, in, sc, fused, r0, nr, c0, nc, x, ld, h);
      });
}

// ---------------------------------------------------------------- ops

struct Prepared {
  Tensor A, C, clabf, bs, bo;
  LabelIndex ix;
  int64_t M, N, D, Npad;
  at::ScalarType acc, in_dtype;
};

static Prepared prepare(const Tensor& A, const Tensor& C, const Tensor& a_lab, const Tensor& c_lab,
                        const c10::optional<Tensor>& bias_same, const c10::optional<Tensor>& bias_other,
                        const char* op) {
  TORCH_CHECK(A.dim() == 2 && C.dim() == 2, op, ": A and C must be 2-D, got ", A.sizes(), " and ", C.sizes());
  TORCH_CHECK(A.size(1) == C.size(1), op, ": A and C need the same feature size, got ", A.sizes(), " and ",
              C.sizes());
  TORCH_CHECK(A.scalar_type() == C.scalar_type(), op, ": A and C must share a dtype");
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), op, ": floating-point features required, got ",
              A.scalar_type());
  TORCH_CHECK(a_lab.dim() == 1 && a_lab.size(0) == A.size(0) && c_lab.dim() == 1 && c_lab.size(0) == C.size(0),
              op, ": one label per row of A and of C required");
  TORCH_CHECK(bias_same.has_value() == bias_other.has_value(), op, ": pass both bias_same and bias_other or neither");
  Prepared pp;
  pp.in_dtype = A.scalar_type();
  pp.acc = pp.in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  pp.M = A.size(0);
  pp.N = C.size(0);
  pp.D = A.size(1);
  TORCH_CHECK(pp.N < (int64_t(1) << 24), op, ": at most 2^24 contrast columns");
  pp.A = A.to(pp.acc).contiguous();
  pp.C = C.to(pp.acc).contiguous();
  Tensor al = a_lab.to(at::kLong).contiguous(), cl = c_lab.to(at::kLong).contiguous();
  pp.ix = build_index(al.data_ptr<int64_t>(), pp.M, cl.data_ptr<int64_t>(), pp.N);
  const int64_t W = pp.acc == at::kDouble ? Vectorized<double>::size() : Vectorized<float>::size();
  pp.Npad = std::max<int64_t>(W, (pp.N + W - 1) / W * W);
  auto opts = A.options().dtype(pp.acc);
  pp.clabf = at::full({pp.Npad}, -2.0, opts);
  if (pp.N > 0) {
    pp.clabf.narrow(0, 0, pp.N).copy_(at::from_blob(pp.ix.cid.data(), {pp.N}, at::TensorOptions().dtype(at::kInt)));
  }
  if (bias_same.has_value()) {
    TORCH_CHECK(bias_same->numel() == pp.N && bias_other->numel() == pp.N, op, ": biases must have one entry per column");
    pp.bs = at::zeros({pp.Npad}, opts);
    pp.bo = at::zeros({pp.Npad}, opts);
    if (pp.N > 0) {
      pp.bs.narrow(0, 0, pp.N).copy_(bias_same->reshape({-1}));
      pp.bo.narrow(0, 0, pp.N).copy_(bias_other->reshape({-1}));
    }
  }
  return pp;
}

// symmetric=True: the caller guarantees C is A (the same storage), c_lab equal to a_lab and self_offset 0
static void check_symmetric(const Tensor& A, const Tensor& C, const Tensor& a_lab, const Tensor& c_lab,
                            int64_t self_offset, const char* op) {
  check_symmetric_operands(A, C, self_offset, op);
  check_symmetric_labels(a_lab, c_lab, op);
}

template <typename T>
static Problem<T> make_problem(const Prepared& pp, int64_t self_offset, double inv_tau, double gamma, bool focal) {
  Problem<T> P;
  P.A = pp.A.data_ptr<T>();
  P.C = pp.C.data_ptr<T>();
  P.M = pp.M;
  P.N = pp.N;
  P.D = pp.D;
  P.Npad = pp.Npad;
  P.clabf = pp.clabf.data_ptr<T>();
  P.bs = pp.bs.defined() ? pp.bs.data_ptr<T>() : nullptr;
  P.bo = pp.bo.defined() ? pp.bo.data_ptr<T>() : nullptr;
  P.ix = &pp.ix;
  P.self_offset = self_offset;
  P.inv_tau = static_cast<T>(inv_tau);
  P.gamma = static_cast<T>(gamma);
  P.focal = focal;
  return P;
}

using FwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

FwdResult rowstats_fwd_cpu(const Tensor& A, const Tensor& C, const Tensor& a_lab, const Tensor& c_lab,
                           const c10::optional<Tensor>& bias_same, const c10::optional<Tensor>& bias_other,
                           int64_t self_offset, double inv_tau, double gamma, bool focal, bool symmetric) {
  if (symmetric) check_symmetric(A, C, a_lab, c_lab, self_offset, "ltcl_fused::rowstats_fwd");
  Prepared pp = prepare(A, C, a_lab, c_lab, bias_same, bias_other, "ltcl_fused::rowstats_fwd");
  auto opts = A.options().dtype(pp.acc);
  Tensor lse = at::empty({pp.M}, opts), pos = at::empty({pp.M}, opts), fpos = at::empty({pp.M}, opts),
         fneg = at::empty({pp.M}, opts), upos = at::empty({pp.M}, opts), uneg = at::empty({pp.M}, opts),
         top = at::empty({pp.M}, A.options().dtype(at::kLong)), lrest = at::empty({pp.M}, opts);
  if (pp.M > 0) {
    AT_DISPATCH_FLOATING_TYPES(pp.A.scalar_type(), "rowstats_fwd_cpu", [&] {
      auto P = make_problem<scalar_t>(pp, self_offset, inv_tau, gamma, focal);
      FwdOut o{lse.data_ptr(), pos.data_ptr(), fpos.data_ptr(), fneg.data_ptr(), upos.data_ptr(),
               uneg.data_ptr(), top.data_ptr<int64_t>(), lrest.data_ptr()};
      // focal: the symmetric forward in one pass (power sums, sym_forward_impl) unless LTCL_CPU_SYM_FOCAL_FWD
      // asks for two passes (2) or the general forward (3)
      if (symmetric && (!focal || strip::env_int("LTCL_CPU_SYM_FOCAL_FWD", 1) != 3) &&
          strip::sym_fwd_fits<scalar_t>(pp.N, pp.Npad)) {
        sym_forward_impl<scalar_t>(P, o);
      } else {
        forward_impl<scalar_t>(P, o);
      }
    });
  }
  return {lse, pos, fpos, fneg, upos, uneg, top, lrest};
}

std::tuple<Tensor, Tensor> rowstats_bwd_cpu(const Tensor& A, const Tensor& C, const Tensor& a_lab,
                                            const Tensor& c_lab, const c10::optional<Tensor>& bias_same,
                                            const c10::optional<Tensor>& bias_other, int64_t self_offset,
                                            double inv_tau, double gamma, bool focal, const Tensor& lse,
                                            const Tensor& top, const Tensor& lrest, const Tensor& cpos,
                                            const Tensor& cposf, const Tensor& cneg, const Tensor& r,
                                            const Tensor& rt, bool symmetric) {
  // symmetric: returns (dX, an empty [0, D] tensor), dX the gradient through both A and C
  if (symmetric) check_symmetric(A, C, a_lab, c_lab, self_offset, "ltcl_fused::rowstats_bwd");
  Prepared pp = prepare(A, C, a_lab, c_lab, bias_same, bias_other, "ltcl_fused::rowstats_bwd");
  for (const Tensor* t : {&lse, &top, &lrest, &cpos, &cposf, &cneg, &r, &rt})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == pp.M, "ltcl_fused::rowstats_bwd: row statistics must have shape [M]");
  auto opts = A.options().dtype(pp.acc);
  Tensor dA, dC;  // the symmetric tiles overwrite dX: no zero fill (nor a dC) there
  if (pp.M > 0 && pp.N > 0 && pp.D > 0) {
    Tensor l = lse.to(pp.acc).contiguous(), lr = lrest.to(pp.acc).contiguous(), tp = top.to(at::kLong).contiguous(),
           a = cpos.to(pp.acc).contiguous(), b = cposf.to(pp.acc).contiguous(), c = cneg.to(pp.acc).contiguous(),
           rr = r.to(pp.acc).contiguous(), rtt = rt.to(pp.acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(pp.A.scalar_type(), "rowstats_bwd_cpu", [&] {
      auto P = make_problem<scalar_t>(pp, self_offset, inv_tau, gamma, focal);
      BwdIn<scalar_t> in{l.data_ptr<scalar_t>(), lr.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                         b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), rr.data_ptr<scalar_t>(),
                         rtt.data_ptr<scalar_t>(), tp.data_ptr<int64_t>()};
      if (symmetric) {  // any N: the backward's tiles need no per-block state (strip::sym_bwd_block)
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

// The fused tiles' vector exp on a 1-D fp32 tensor (tests only: its error against fp64 exp)
static Tensor vexp_cpu(const Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat, "ltcl_fused::_vexp: a 1-D float32 tensor");
  Tensor xc = x.contiguous(), out = at::empty_like(xc);
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const float* a = xc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = xc.numel();
  for (int64_t j = 0; j < n; j += W) {
    const int64_t cnt = std::min<int64_t>(W, n - j);
    strip::vexp<float>(Vec::loadu(a + j, cnt)).store(o + j, cnt);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(ltcl_fused, m) { m.def("_vexp(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(ltcl_fused, CPU, m) {
  m.impl("_vexp", &vexp_cpu);
  m.impl("rowstats_fwd", &rowstats_fwd_cpu);
  m.impl("rowstats_bwd", &rowstats_bwd_cpu);
}

}  // namespace cpu
}  // namespace ltcl
