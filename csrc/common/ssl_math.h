// Per-element math of the self-supervised row-statistics contract (ltcl_fused/engine/ssl_contract.py),
// shared by the CPU kernels (csrc/cpu/ssl_cpu.cpp) and any CUDA kernel of the same contract.
// Header-only, no torch headers: compiles with a host C++ compiler and with nvcc.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

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

// log ω(count / n): the count -> weight step of the exact ranks (count = #{set values <= s} of the row,
// n = the row's set size; u = count / n in T, as the contract's bayes_omega(u) does).
template <typename T>
LTCL_HD T bayes_count_log_weight(const BayesOmega<T>& omega, int64_t count, int64_t n) {
  return omega.log_weight(static_cast<T>(count) / static_cast<T>(n));
}

// ---------------------------------------------------------------- exact ranks: keys and counts

// Unsigned key with the order of the floating-point values (-0 and +0 get the same key: they compare
// equal, so they tie). Radix sorts (CPU: LSD radix in ssl_cpu.cpp; CUDA: CUB segmented radix sort) sort
// these keys; key_to_value inverts the map (a -0 comes back as +0).
template <typename T>
struct OrderedKey;

template <>
struct OrderedKey<float> {
  using type = uint32_t;
  static constexpr uint32_t kSign = 0x80000000u;
};

template <>
struct OrderedKey<double> {
  using type = uint64_t;
  static constexpr uint64_t kSign = 0x8000000000000000ull;
};

// The bits of a float/double and back (memcpy: well defined, and one register move in host and device code).
template <typename To, typename From>
LTCL_HD To bit_cast_value(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_value: sizes differ");
  To u;
  memcpy(&u, &v, sizeof(u));
  return u;
}
LTCL_HD uint32_t value_bits(float v) { return bit_cast_value<uint32_t>(v); }
LTCL_HD uint64_t value_bits(double v) { return bit_cast_value<uint64_t>(v); }
LTCL_HD float value_from_bits(uint32_t u) { return bit_cast_value<float>(u); }
LTCL_HD double value_from_bits(uint64_t u) { return bit_cast_value<double>(u); }

template <typename T>
LTCL_HD typename OrderedKey<T>::type ordered_key(T v) {
  using K = typename OrderedKey<T>::type;
  const K u = value_bits(v == T(0) ? T(0) : v);  // -0 -> +0
  return (u & OrderedKey<T>::kSign) ? static_cast<K>(~u) : static_cast<K>(u | OrderedKey<T>::kSign);
}

template <typename T>
LTCL_HD T key_to_value(typename OrderedKey<T>::type k) {
  using K = typename OrderedKey<T>::type;
  return value_from_bits(static_cast<K>((k & OrderedKey<T>::kSign) ? (k & ~OrderedKey<T>::kSign) : ~k));
}

// #{q < n : sorted[q] <= v} for ascending sorted[0, n) (an upper bound by binary search). IEEE comparison:
// -0 == +0, so signed zeros tie. The Bayesian count of an element against a row's sorted set values.
template <typename T>
LTCL_HD int64_t count_le(const T* sorted, int64_t n, T v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (sorted[mid] <= v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

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
