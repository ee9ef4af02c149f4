"""csrc/common/ssl_math.h on its own (host C++): the exact-rank pieces the CPU and CUDA Bayesian kernels share.

A small program compiled with the host compiler checks, for float and double, that ``ordered_key`` orders
exactly like the values (−0 and +0 one key; ±inf, subnormals, extremes), that ``key_to_value`` inverts it
(−0 comes back as +0), and that ``count_le`` equals a brute-force count on sorted rows with ties; it prints
``bayes_count_log_weight`` for a grid of (count, n), compared here with ``bayes_omega`` of the contract.
"""
import math
import os
import shutil
import subprocess

import pytest
import torch

from ltcl_fused.engine.ssl_contract import bayes_omega

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <random>
#include <vector>
#include <algorithm>
#include <cstring>
#include "common/ssl_math.h"
namespace cm = ltcl::common;

template <typename T> int check_keys(unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<T> v = {T(0), -T(0), T(1), -T(1), std::numeric_limits<T>::infinity(),
                      -std::numeric_limits<T>::infinity(), std::numeric_limits<T>::denorm_min(),
                      -std::numeric_limits<T>::denorm_min(), std::numeric_limits<T>::max(),
                      std::numeric_limits<T>::lowest(), std::numeric_limits<T>::min(), -std::numeric_limits<T>::min()};
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int k = 0; k < 3000; ++k) {
    double x = nd(rng) * std::pow(10.0, (int)(rng() % 20) - 10);
    v.push_back(static_cast<T>(x));
    v.push_back(static_cast<T>(std::round(x)));  // ties
  }
  int bad = 0;
  for (size_t a = 0; a < v.size(); a += 7)
    for (size_t b = 0; b < v.size(); ++b) {
      const auto ka = cm::ordered_key(v[a]), kb = cm::ordered_key(v[b]);
      if ((ka < kb) != (v[a] < v[b]) || (ka == kb) != (v[a] == v[b])) ++bad;
    }
  for (T x : v) {
    const T y = cm::key_to_value<T>(cm::ordered_key(x));
    const T want = x == T(0) ? T(0) : x;
    if (std::memcmp(&y, &want, sizeof(T)) != 0) ++bad;
  }
  // count_le against brute force on a sorted row with many ties and signed zeros
  std::vector<T> row;
  for (int k = 0; k < 200; ++k) row.push_back(static_cast<T>((int)(rng() % 9) - 4) / T(2));
  row.push_back(-T(0));
  row.push_back(T(0));
  std::sort(row.begin(), row.end());
  for (int n = 0; n <= (int)row.size(); n += 13)
    for (T q : {T(-3), T(-0.5), -T(0), T(0), T(0.5), T(1.75), T(2), T(5)}) {
      long long brute = 0;
      for (int k = 0; k < n; ++k) brute += row[k] <= q;
      if (cm::count_le(row.data(), n, q) != brute) ++bad;
    }
  return bad;
}

int main() {
  int bad = check_keys<float>(1) + check_keys<double>(2);
  std::printf("bad %d\n", bad);
  const double ab[3][3] = {{0.5, 1.0, 0.1}, {0.8, 0.6, 0.3}, {1.0, 0.75, 0.0}};
  for (const auto& p : ab) {
    cm::BayesOmega<double> om(p[0], p[1], p[2]);
    cm::BayesOmega<float> omf(p[0], p[1], p[2]);
    for (int n : {1, 7, 1000})
      for (int c : {0, 1, 3, 7, 500, 1000})
        if (c <= n)
          std::printf("w %g %g %g %d %d %.17g %.9g\n", p[0], p[1], p[2], c, n, cm::bayes_count_log_weight(om, c, n),
                      (double)cm::bayes_count_log_weight(omf, c, n));
  }
  return 0;
}
"""


def _cxx():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.skipif(_cxx() is None, reason="no host C++ compiler")
def test_ssl_math_header_keys_counts_and_weights(tmp_path):
    src = tmp_path / "t.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "t"
    proc = subprocess.run([_cxx(), "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "bad 0", out[0]
    lines = [ln.split() for ln in out[1:]]
    assert len(lines) > 30
    for _, a, b, tp, c, n, w64, w32 in lines:
        u = torch.tensor(int(c) / int(n), dtype=torch.float64)
        w = float(bayes_omega(u, float(a), float(b), float(tp)))
        want = math.log(w) if w > 0 else -math.inf
        got64, got32 = float(w64), float(w32)
        if want == -math.inf:
            assert got64 == -math.inf and got32 == -math.inf
        else:
            assert abs(got64 - want) <= 1e-12 * max(1.0, abs(want)), (a, b, tp, c, n, got64, want)
            assert abs(got32 - want) <= 1e-5 * max(1.0, abs(want)), (a, b, tp, c, n, got32, want)
