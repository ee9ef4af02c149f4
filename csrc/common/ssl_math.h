// Per-element math of the self-supervised row-statistics contract (ltcl_fused/engine/ssl_contract.py),
// shared by the CPU kernels (csrc/cpu/ssl_cpu.cpp) and any CUDA kernel of the same contract.
// Header-only, no torch headers: compiles with a host C++ compiler and with nvcc.
#pragma once

#include <math.h>

#include "ltcl_math.h"

namespace ltcl {
namespace common {

LTCL_HD float f_sqrt(float x) { return sqrtf(x); }
LTCL_HD double f_sqrt(double x) { return sqrt(x); }

// Element filter on the raw dot product g (MTTV): 0 none, 1 "both" (drop a < lower or a > upper), 2 "low"
// (drop a < lower), a = min(|g|, 1) (a cosine rounded to 1 + 2e-16 is 1). A NaN is never dropped.
enum SSLFilter : int { kFilterNone = 0, kFilterBoth = 1, kFilterLow = 2 };

template <typename T>
LTCL_HD bool ssl_filter_keep(T g, int filter, T lower, T upper) {
  T a = g < T(0) ? -g : g;
  a = a > T(1) ? T(1) : a;  // NaN stays NaN
  if (filter == kFilterBoth) return !(a < lower || a > upper);
  if (filter == kFilterLow) return !(a < lower);
  return true;
}

// Constants of the Bayesian importance weight ω(u) (SPEC.md section 5), computed once per call.
template <typename T>
struct BayesOmega {
  T b, b2, four_a;  // x = 2u / (b + sqrt(b^2 + 4 a u)), the root (-b + sqrt(b^2 + 4 a u)) / (2a) without cancellation
  T alpha, tau_minus, tau_plus, htn1, htn2, htn_den;

  LTCL_HD BayesOmega() : b(0), b2(0), four_a(0), alpha(0), tau_minus(0), tau_plus(0), htn1(0), htn2(0), htn_den(1) {}
  LTCL_HD BayesOmega(double al, double be, double tp) {
    const double tm = 1.0 - tp;
    const double a = (1.0 - 2.0 * al) * (tm - tp) + 1e-3;
    const double bb = 2.0 * (al * tm + (1.0 - al) * tp);
    // the same operations in T as the torch formula (a, b, the ψ_HTN coefficients are Python floats there)
    b = T(bb);
    b2 = T(bb * bb);
    four_a = T(4.0 * a);
    alpha = T(al);
    tau_minus = T(tm);
    tau_plus = T(tp);
    htn1 = T(al * (1.0 - be));
    htn2 = T((1.0 - al) * be);
    htn_den = T(al * (1.0 - be) + (1.0 - al) * be + 1e-3);
  }

  // ω(u) for u in [0, 1]; same order of operations as ltcl_fused.engine.ssl_contract.bayes_omega.
  LTCL_HD T operator()(T u) const {
    const T x = (u + u) / (b + f_sqrt(b2 + four_a * u));
    const T phi1 = T(2) * (T(1) - x);
    const T phi2 = T(2) * x;
    const T psi_tn = alpha * phi1 + (T(1) - alpha) * phi2;
    const T psi_fn = (T(1) - alpha) * phi1 + alpha * phi2;
    const T psi_htn = (htn1 * phi1 + htn2 * phi2) / htn_den;
    return psi_htn / (tau_minus * psi_tn + tau_plus * psi_fn);
  }

  // log ω(u), -inf where ω(u) <= 0 (that element then contributes nothing, as in the contract)
  LTCL_HD T log_weight(T u) const {
    const T w = (*this)(u);
    return w > T(0) ? f_log(w) : neg_inf<T>();
  }
};

// The row's log-sum-exp from its running maximum m and sum of exp(t - m): -inf for an empty set.
template <typename T>
LTCL_HD T lse_finish(T m, T sum) {
  return (m > neg_inf<T>() && sum > T(0)) ? m + f_log(sum) : neg_inf<T>();
}

// Max of c * s over the set from the set's max and min of s (c may be 0 or negative).
template <typename T>
LTCL_HD T scaled_max(T c, T smax, T smin) {
  return c > T(0) ? c * smax : (c < T(0) ? c * smin : T(0));
}

}  // namespace common
}  // namespace ltcl
