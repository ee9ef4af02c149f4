// Per-element math of the row-statistics engine (ltcl_fused/engine/contract.py), shared by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). Header-only, no torch headers: it
// compiles with a host C++ compiler and with nvcc (functions are __host__ __device__ there).
#pragma once

#include <math.h>

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

// Stable softplus log(1 + e^z).
template <typename T>
LTCL_HD T softplus(T z) {
  return z > T(0) ? z + f_log1p(f_exp(-z)) : f_log1p(f_exp(z));
}

// (log p, log(1 - p)) of one valid column (contract: row_logp). The row's dominant column `top`
// takes them from lrest = log(sum of the other columns' exp(x - max)), accurate even when p rounds
// to 1; every other column has p <= 1/2 and uses x - lse and log1mexp.
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

// Positive-pair terms from log p (<= 0) and log(1 - p):
//   f+(q) = -(1-q)^gamma log q,  u+(q) = q f+'(q) = (1-q)^(gamma-1) (gamma q log q - (1-q))
// gamma == 0: f+ = -log q, u+ = -1 exactly. gamma > 0: both 0 at q = 1.
template <typename T>
LTCL_HD void focal_pos(T logp, T log1mp, T gamma, T* f, T* u) {
  if (gamma == T(0)) {
    *f = -logp;
    *u = T(-1);
    return;
  }
  if (!(logp < T(0))) {
    *f = T(0);
    *u = T(0);
    return;
  }
  const T p = f_exp(logp);
  *f = -f_exp(gamma * log1mp) * logp;
  *u = f_exp((gamma - T(1)) * log1mp) * (gamma * p * logp - f_exp(log1mp));
}

// Negative-pair terms: f-(q) = -log(1-q), u-(q) = q f-'(q) = q / (1-q).
template <typename T>
LTCL_HD void focal_neg(T logp, T log1mp, T* f, T* u) {
  *f = -log1mp;
  *u = f_exp(logp - log1mp);
}

// One element of G = dloss/dS (contract backward) of a valid column, from log p and log(1 - p)
// and the row coefficients; r is r_i + rt_i for every column but the dominant one, r_i there.
// A zero coefficient contributes exactly 0. (The dominant column when negative: grad_top_neg.)
template <typename T>
LTCL_HD T grad_element(T logp, T log1mp, bool is_pos, bool focal, T gamma, T cpos, T cposf, T cneg, T r) {
  const T p = f_exp(logp);
  T g = -r * p;
  if (is_pos) {
    g += cpos;
    if (focal && cposf != T(0)) {
      T f, u;
      focal_pos(logp, log1mp, gamma, &f, &u);
      g += cposf * u;
    }
  } else if (focal && cneg != T(0)) {
    T f, u;
    focal_neg(logp, log1mp, &f, &u);
    g += cneg * u;
  }
  return g;
}

// G at the dominant column when it is a negative: cneg u- - p (r + cneg u-) = cneg p - r p exactly.
template <typename T>
LTCL_HD T grad_top_neg(T logp, bool focal, T cneg, T r) {
  const T p = f_exp(logp);
  T g = -r * p;
  if (focal && cneg != T(0)) g += cneg * p;
  return g;
}

}  // namespace common
}  // namespace ltcl
