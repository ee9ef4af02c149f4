// Per-element math of the row-statistics engine (ltcl_fused/engine/contract.py), shared by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). Header-only, no torch headers: it
// compiles with a host C++ compiler and with nvcc (functions are __host__ __device__ there).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define LTCL_HD __host__ __device__ __forceinline__
#else
#define LTCL_HD inline
#endif

namespace ltcl {
namespace common {

// Overloads that resolve to the float or double libm / CUDA math function in both compilers.
LTCL_HD float f_exp(float x) { return expf(x); }
LTCL_HD double f_exp(double x) { return exp(x); }
LTCL_HD float f_log(float x) { return logf(x); }
LTCL_HD double f_log(double x) { return log(x); }
LTCL_HD float f_log1p(float x) { return log1pf(x); }
LTCL_HD double f_log1p(double x) { return log1p(x); }
LTCL_HD float f_expm1(float x) { return expm1f(x); }
LTCL_HD double f_expm1(double x) { return expm1(x); }

template <typename T>
LTCL_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <typename T>
LTCL_HD T quiet_nan() {
  return static_cast<T>(NAN);
}

// log(1 - exp(x)) for x <= 0, accurate on the whole range (-inf at x = 0).
template <typename T>
LTCL_HD T log1mexp(T x) {
  return x > T(-0.69314718055994530942) ? f_log(-f_expm1(x)) : f_log1p(-f_exp(x));
}

// Per-column bias of the contract: bias_same[j] for positives, bias_other[j] otherwise.
template <typename T>
LTCL_HD T column_bias(const T* bias_same, const T* bias_other, long long j, bool is_pos) {
  if (bias_same == nullptr) return T(0);
  return is_pos ? bias_same[j] : bias_other[j];
}

// Stable softplus log(1 + e^z) (no threshold: exact to rounding for every z).
template <typename T>
LTCL_HD T softplus(T z) {
  return z > T(0) ? z + f_log1p(f_exp(-z)) : f_log1p(f_exp(z));
}

// ---------------------------------------------------------------- row statistics (forward)
//
// A row streams (m, top, m2, s2): m = max_j x_j, top = its first argmax, and the other columns'
// log-sum-exp held as m2 = max_{j != top} x_j and s2 = sum_{j != top} exp(x_j - m2) (in [1, n] once
// non-empty). lrest = (m2 - m) + log s2 is then exact however far the dominant column leads (a linear
// rest = sum exp(x_j - m) underflows past ~104 nats in fp32), and lse = m + softplus(lrest).

// (m2, s2) <- the log-sum-exp merge of (m2, s2), (a, sa) and (b, sb) (pairs of max and scaled sum;
// a pair with max -inf is empty). A NaN in any pair makes s2 NaN.
template <typename T>
LTCL_HD void rest_merge(T* m2, T* s2, T a, T sa, T b, T sb) {
  T nm = *m2 > a ? *m2 : a;
  nm = nm > b ? nm : b;
  if (nm == neg_inf<T>()) return;  // every pair empty (s2 stays 0)
  *s2 = *s2 * f_exp(*m2 - nm) + sa * f_exp(a - nm) + sb * f_exp(b - nm);
  *m2 = nm;
}

// One column tile (tm, tj, tm2, ts2: its max, first argmax (-1 if none), the max and scaled sum of its
// other columns) merged into the row state. If the tile's top leads, the old top joins the rest;
// otherwise the whole tile does. Row-level work only: no transcendental per tile element.
template <typename T>
LTCL_HD void top_rest_step(T* m, int64_t* top, T* m2, T* s2, T tm, int64_t tj, T tm2, T ts2) {
  if (tm > *m) {
    rest_merge(m2, s2, *m, *top >= 0 ? T(1) : T(0), tm2, ts2);
    *m = tm;
    *top = tj;
  } else {
    rest_merge(m2, s2, tm, T(1), tm2, ts2);
  }
}

// Finished (lse, lrest) of a row from its streamed state; has_valid: the row has at least one column.
// Returns false for a poisoned row: a NaN or +inf among its logits, or every one of them -inf; its
// statistics are then NaN (a non-finite input never gives a finite loss). An empty row: -inf, -inf.
template <typename T>
LTCL_HD bool top_rest_finish(T m, T m2, T s2, bool has_valid, T* lse, T* lrest) {
  const T ninf = neg_inf<T>();
  if (!(s2 == s2) || !(m == m) || m == -ninf || (has_valid && m == ninf)) {
    *lse = *lrest = quiet_nan<T>();
    return false;
  }
  if (m == ninf) {
    *lse = *lrest = ninf;
    return true;
  }
  *lrest = m2 == ninf ? ninf : (m2 - m) + f_log(s2);
  *lse = m + softplus(*lrest);
  return true;
}

// ---------------------------------------------------------------- per element

// (log p, log(1 - p)) of one valid column (contract: row_logp). The row's dominant column `top`
// takes them from lrest, accurate even when p rounds to 1; every other column has p <= 1/2 and uses
// x - lse and log1mexp.
template <typename T>
LTCL_HD void elem_logp(T x, T lse, bool is_top, T lrest, T* logp, T* log1mp) {
  if (is_top) {
    *logp = -softplus(lrest);
    *log1mp = -softplus(-lrest);
  } else {
    *logp = x - lse;
    *log1mp = log1mexp(*logp);
  }
}

// rho = -q log q / (1 - q) in [0, 1] at the dominant column, from lrest: q = 1/(1 + rest), so
// rho = softplus(lrest) e^-lrest (-> 1 - e^lrest/2 as lrest -> -inf, where e^-lrest would overflow).
template <typename T>
LTCL_HD T top_rho(T lrest) {
  return lrest < T(-20) ? T(1) - T(0.5) * f_exp(lrest) : softplus(lrest) * f_exp(-lrest);
}

// Positive-pair terms from log p (<= 0) and log(1 - p), with w = (1-q)^gamma and rho as above:
//   f+(q) = -(1-q)^gamma log q = -w log q,
//   u+(q) = q f+'(q) = (1-q)^(gamma-1) (gamma q log q - (1-q)) = -w (1 + gamma rho).
// The second form never meets (1-q)^(gamma-1) (which overflows for gamma < 1 when q -> 1); off the
// dominant column p <= 1/2 and rho = -p log p / (1 - p) directly. gamma == 0: f+ = -log q, u+ = -1.
// Both vanish at q = 1 for gamma > 0; NaN in, NaN out.
template <typename T>
LTCL_HD void focal_pos(T logp, T log1mp, bool is_top, T lrest, T gamma, T* f, T* u) {
  if (gamma == T(0)) {
    *f = -logp;
    *u = T(-1);
    return;
  }
  const T w = f_exp(gamma * log1mp);
  T rho;
  if (is_top) {
    rho = top_rho(lrest);
  } else {
    const T p = f_exp(logp);
    rho = -p * logp / (T(1) - p);
  }
  *f = -w * logp;
  *u = -w * (T(1) + gamma * rho);
}

// (1-p)^gamma for 1 - p = q: repeated squaring for an integer gamma in [1, 16] (no libm call), else
// exp(gamma log1p(-p)) (p <= 1/2 here, so q and log1p(-p) are accurate to rounding).
template <typename T>
LTCL_HD T pow_1mp(T p, T gamma) {
  const int n = static_cast<int>(gamma);
  if (static_cast<T>(n) == gamma && n >= 1 && n <= 16) {
    T base = T(1) - p, w = T(1);
    for (int k = n; k > 0; k >>= 1) {
      if (k & 1) w *= base;
      base *= base;
    }
    return w;
  }
  return f_exp(gamma * f_log1p(-p));
}

// focal_pos off the dominant column (p <= 1/2) given p = e^logp: w = pow_1mp(p, gamma), rho = -p log p / (1 - p),
// f+ = -w log p, u+ = -w (1 + gamma rho); gamma == 0: -log p and -1. No libm call for an integer gamma <= 16
// (focal_pos spends two: exp(gamma log(1-p)) and p again, after log1mexp's two for log(1-p)).
template <typename T>
LTCL_HD void focal_pos_offtop(T logp, T p, T gamma, T* f, T* u) {
  if (gamma == T(0)) {
    *f = -logp;
    *u = T(-1);
    return;
  }
  const T w = pow_1mp(p, gamma);
  const T rho = -p * logp / (T(1) - p);
  *f = -w * logp;
  *u = -w * (T(1) + gamma * rho);
}

// Negative-pair terms: f-(q) = -log(1-q), u-(q) = q f-'(q) = q / (1-q).
template <typename T>
LTCL_HD void focal_neg(T logp, T log1mp, T* f, T* u) {
  *f = -log1mp;
  *u = f_exp(logp - log1mp);
}

// One element of G = dloss/dS (contract backward) at a valid column j != top, from log p = x - lse:
//   1[P] (cpos + cposf u+) + 1[N] cneg u- - r p - rt p / rest,
// the dominant negative's share rt p / rest = rt exp(log p - lrest) (<= rt: log p - lrest <= 0 off the
// top column, so it never overflows when rest underflows). A zero coefficient contributes exactly 0.
// OFFTOP: u+ by focal_pos_offtop from p alone (log1mp is not read: pass anything); otherwise by focal_pos
// from log1mp. Either way one exp, a second one only for the dominant negative's share (rt != 0).
template <bool OFFTOP, typename T>
LTCL_HD T grad_element_from(T logp, T log1mp, T lrest, bool is_pos, bool focal, T gamma, T cpos, T cposf, T cneg,
                            T r, T rt) {
  const T p = f_exp(logp);
  T g = -r * p;
  if (!focal) return is_pos ? g + cpos : g;
  if (rt != T(0)) g -= rt * f_exp(logp - lrest);
  if (is_pos) {
    g += cpos;
    if (cposf != T(0)) {
      T f, u;
      if (OFFTOP) {
        focal_pos_offtop(logp, p, gamma, &f, &u);
      } else {
        focal_pos(logp, log1mp, false, lrest, gamma, &f, &u);
      }
      g += cposf * u;
    }
  } else if (cneg != T(0)) {
    g += cneg * (p / (T(1) - p));  // u- = p / (1 - p), p <= 1/2 here
  }
  return g;
}

template <typename T>
LTCL_HD T grad_element(T logp, T log1mp, T lrest, bool is_pos, bool focal, T gamma, T cpos, T cposf, T cneg, T r,
                       T rt) {
  return grad_element_from<false>(logp, log1mp, lrest, is_pos, focal, gamma, cpos, cposf, cneg, r, rt);
}

// grad_element for a column off the dominant one from log p alone (log(1 - p) is not needed: p <= 1/2).
template <typename T>
LTCL_HD T grad_element_offtop(T logp, T lrest, bool is_pos, bool focal, T gamma, T cpos, T cposf, T cneg, T r,
                              T rt) {
  return grad_element_from<true>(logp, T(0), lrest, is_pos, focal, gamma, cpos, cposf, cneg, r, rt);
}

// G at the dominant column (logp, log1mp from lrest): 1[P] (cpos + cposf u+) + 1[N] cneg p - r p.
// At a negative, cneg u- - p (r + cneg u-) = cneg p - r p exactly (u- (1 - p) = p), and 0 for the cneg
// term when the row has no other column (lrest = -inf: p = 1 whatever the features, f- = +inf is a
// constant, its derivative 0).
template <typename T>
LTCL_HD T grad_top(T logp, T log1mp, T lrest, bool is_pos, bool focal, T gamma, T cpos, T cposf, T cneg, T r) {
  const T p = f_exp(logp);
  T g = -r * p;
  if (is_pos) {
    g += cpos;
    if (focal && cposf != T(0)) {
      T f, u;
      focal_pos(logp, log1mp, true, lrest, gamma, &f, &u);
      g += cposf * u;
    }
  } else if (focal && cneg != T(0) && lrest > neg_inf<T>()) {
    g += cneg * p;
  }
  return g;
}

}  // namespace common
}  // namespace ltcl
