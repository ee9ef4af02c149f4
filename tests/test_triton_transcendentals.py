"""Transcendental operations per tile element of every shipped Triton kernel (issue 12).

``codegen.compile_report`` counts, in a kernel's TTIR, the operations of ``codegen.TRANSCENDENTAL_OPS``
(exp, exp2, log, log2, sqrt, rsqrt, pow, every floating-point division or reciprocal) whose result is a
[BLOCK_M, BLOCK_N] tile (or its transpose); row vectors are not counted (``codegen.tile_transcendentals``).
The expected figures below are written by hand from the kernels' formulas (comments), not read from the
compiler: a change that adds a transcendental to a tile fails here, one that removes one must update the
table. Every kernel variant is compiled once (f_large / fp32 / sm_80, in a subprocess without
TRITON_INTERPRET); ``tests/test_triton_codegen.py`` and ``tests/test_triton_ssl_codegen.py`` check the same
figures on every shipped configuration, dtype and architecture of their sweeps.

Before issue 12 the focal kernels evaluated log1mexp(log p) with both of its branches on every tile element and
the dominant column's formulas on the whole tile: forward 9 (4 exp, 3 log, 2 div; 8 at γ = 0), dA / dC 9 each
(4 exp, 3 log, 2 div; 8 at γ = 0). Now: forward 5 (pass 2: 4; γ = 0: 4), dA / dC 4 each (γ = 0: 2).
"""
import pytest

from _codegen import SCRIPT_HEAD, load_triton_kernels, run_compile_script

load_triton_kernels()
from ltcl_fused.triton_kernels import codegen, ssl_codegen  # noqa: E402


#: (kernel, variant) -> {TTIR op: count} per tile element, from the formulas.
EXPECTED = {
    # ---- row statistics (rowstats.py) ----
    # forward pass 1 (every variant): exp(x − tm2) of the other columns' sum
    ("rowstats_fwd_kernel", "plain"): {"math.exp": 1},
    # + pass 2 (focal), off the dominant column with l = log p: p = exp(l), 1/(1 − p) [one reciprocal: log(1 − p)'s
    # rounding correction and u⁻ = p/(1 − p)], log(1 − p), w = (1 − p)^γ = exp(γ log(1 − p)); the dominant
    # column's values are row vectors
    ("rowstats_fwd_kernel", "focal_bias"): {"math.exp": 3, "arith.divf": 1, "math.log": 1},
    ("rowstats_fwd_kernel", "focal_g0"): {"math.exp": 2, "arith.divf": 1, "math.log": 1},  # no w at γ = 0
    # a split sweep (ops.split_plan): pass 1 alone, pass 2 alone (bias, γ ≠ 0); the merges have no tile
    ("rowstats_fwd_kernel", "split1"): {"math.exp": 1},
    ("rowstats_fwd_kernel", "split2"): {"math.exp": 2, "arith.divf": 1, "math.log": 1},
    ("rowstats_fwd_merge_kernel", "merge"): {},
    ("rowstats_fwd_sum_kernel", "merge"): {},
    # backward G tile: SupCon / CL: p = exp(log p)
    ("rowstats_bwd_da_kernel", "plain"): {"math.exp": 1},
    ("rowstats_bwd_dc_kernel", "plain"): {"math.exp": 1},
    # focal: e = p/rest = exp(l − lrest) (p = e·rest, rest a row vector), 1/(1 − p), log(1 − p), w = exp(γ log(1 − p))
    ("rowstats_bwd_da_kernel", "focal_bias"): {"math.exp": 2, "arith.divf": 1, "math.log": 1},
    ("rowstats_bwd_dc_kernel", "focal_bias"): {"math.exp": 2, "arith.divf": 1, "math.log": 1},
    # γ = 0: u⁺ = −1 and G needs no f⁻: e and u⁻ = p·1/(1 − p) only (log(1 − p) fed w alone)
    ("rowstats_bwd_da_kernel", "focal_g0"): {"math.exp": 1, "arith.divf": 1},
    ("rowstats_bwd_dc_kernel", "focal_g0"): {"math.exp": 1, "arith.divf": 1},
    # symmetric backward: two G tiles per recomputed S tile (G_ij from row i, G_ji from row j), each as dA's
    ("rowstats_bwd_sym_kernel", "plain"): {"math.exp": 2},
    ("rowstats_bwd_sym_kernel", "focal_bias"): {"math.exp": 4, "arith.divf": 2, "math.log": 2},
    ("rowstats_bwd_sym_kernel", "focal_g0"): {"math.exp": 2, "arith.divf": 2},
    # ---- SSL (ssl_rowstats.py) ----
    # forward: one online-LSE exp(c_k s − m) per scale (K2: two scales); STRIP (Bayesian) stores s only
    ("ssl_fwd_kernel", "k2_both"): {"math.exp": 2},
    ("ssl_fwd_kernel", "hcl"): {"math.exp": 2},
    ("ssl_fwd_kernel", "bayes"): {},
    # backward: k c exp(c s − lse) per scale; G_STRIP (Bayesian) loads G
    ("ssl_bwd_da_kernel", "k2_both"): {"math.exp": 2},
    ("ssl_bwd_da_kernel", "hcl"): {"math.exp": 2},
    ("ssl_bwd_da_kernel", "bayes"): {},
    ("ssl_bwd_dc_kernel", "k2_both"): {"math.exp": 2},
    ("ssl_bwd_dc_kernel", "hcl"): {"math.exp": 2},
    ("ssl_bwd_dc_kernel", "bayes"): {},
    # symmetric backward: two G tiles per recomputed S tile (G_ij from row i, G_ji from row j), each as dA's
    ("ssl_bwd_sym_kernel", "k2_both"): {"math.exp": 4},
    ("ssl_bwd_sym_kernel", "hcl"): {"math.exp": 4},
    # their 2-D grids (SPLIT: a column range per program): the same per element
    ("rowstats_bwd_sym_kernel", "split_focal_bias"): {"math.exp": 4, "arith.divf": 2, "math.log": 2},
    ("ssl_bwd_sym_kernel", "k2_both_split"): {"math.exp": 4},
    # Bayesian weighting pass: log ω(u): u = cnt/nset, x = 2u/(b + sqrt(b² + 4au)), ψ_htn/den, ψ_htn/(…),
    # log w; then one exp: the online LSE (forward) or the strip of G (backward)
    ("ssl_bayes_kernel", "fwd"): {"arith.divf": 4, "math.sqrt": 1, "math.log": 1, "math.exp": 1},
    ("ssl_bayes_kernel", "bwd"): {"arith.divf": 4, "math.sqrt": 1, "math.log": 1, "math.exp": 1},
    # the 2-D grid (column ranges): the same per element
    ("ssl_bayes_kernel", "fwd_split"): {"arith.divf": 4, "math.sqrt": 1, "math.log": 1, "math.exp": 1},
    ("ssl_bayes_kernel", "bwd_split"): {"arith.divf": 4, "math.sqrt": 1, "math.log": 1, "math.exp": 1},
}
for _k in ("ssl_fwd_kernel", "ssl_bwd_da_kernel", "ssl_bwd_dc_kernel", "ssl_bwd_sym_kernel"):  # one scale: one exp
    for _v in ("dcl", "mttv_low_self", "mttv_both", "mttv_low", "mttv_both_self"):  # (symmetric: one per G tile)
        EXPECTED[(_k, _v)] = {"math.exp": 2 if _k == "ssl_bwd_sym_kernel" else 1}


def expected(kernel, variant):
    return EXPECTED[(kernel, variant)]


_SCRIPT = SCRIPT_HEAD + r"""
from ltcl_fused.triton_kernels import codegen, ssl_codegen
rs = [j for j in codegen.jobs(full=True) if j[1:4] in (("f_large", "fp32", 80), ("merge", "fp32", 80))]
ss = [j for j in ssl_codegen.jobs(full=True) if j[1:4] in (("f_large", "fp32", 80), ("bayes", "fp32", 80))]
out = codegen.run(2, True, lambda full: rs, codegen.compile_one) + codegen.run(2, True, lambda full: ss,
                                                                              ssl_codegen.compile_one)
print("@@JSON@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def counted():
    return {(r["kernel"], r["variant"]): r for r in run_compile_script(_SCRIPT, fp_fusion=True)}


def test_table_covers_every_variant():
    have = {(j[0], j[4][0]) for j in codegen.jobs(full=True)} | {(j[0], j[4][0]) for j in ssl_codegen.jobs(full=True)}
    assert have == set(EXPECTED)


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}")
def test_tile_transcendentals(counted, key):
    r = counted[key]
    assert "error" not in r, r.get("error")
    want = EXPECTED[key]
    assert r["tile_transcendental_ops"] == want, (r["tile_transcendental_ops"], want)
    assert r["tile_transcendentals"] == sum(want.values())


def test_focal_budget():
    """Issue 12: at most 5 per tile element in the focal forward's pass 2 (6 with pass 1), 5 per backward."""
    pass1 = sum(EXPECTED[("rowstats_fwd_kernel", "plain")].values())
    for v in ("focal_bias", "focal_g0"):
        assert sum(EXPECTED[("rowstats_fwd_kernel", v)].values()) - pass1 <= 5
        assert sum(EXPECTED[("rowstats_fwd_kernel", v)].values()) <= 6
        for k in ("rowstats_bwd_da_kernel", "rowstats_bwd_dc_kernel"):
            assert sum(EXPECTED[(k, v)].values()) <= 5


def test_counter_on_a_ttir_snippet():
    """The counter reads tile-shaped results only and every op of TRANSCENDENTAL_OPS."""
    ttir = "\n".join([
        "%a = math.exp %x : tensor<32x16xf32> loc(#l1)",
        "%b = math.exp %x : tensor<16x32xf32> loc(#l1)",      # the transposed tile (dC)
        "%c = math.log %r : tensor<32xf32> loc(#l2)",         # a row vector
        "%d = math.log %r : tensor<32x1xf32> loc(#l2)",
        "%e = arith.divf %x, %y : tensor<32x16xf64> loc(#l3)",
        "%f = tt.precise_sqrt %x : tensor<32x16xf32>",
        "%g = arith.mulf %x, %y : tensor<32x16xf32>",
        "%h = math.exp2 %x : tensor<32x16xbf16>",
    ])
    n, ops = codegen.tile_transcendentals(ttir, (32, 16))
    assert ops == {"math.exp": 2, "arith.divf": 1, "tt.precise_sqrt": 1, "math.exp2": 1}
    assert n == 5
