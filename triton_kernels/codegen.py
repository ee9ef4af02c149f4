"""Compile the shipped kernel configurations to real sm_80 / sm_90 cubins without a GPU and report
shared memory, register use, spills (cuobjdump -res-usage: LOCAL and STACK), tensor-core use and the
transcendental operations per [BLOCK_M, BLOCK_N] tile element in the TTIR (``tile_transcendentals``).

    python -m ltcl_fused.triton_kernels.codegen [--jobs 2] [--full]

Must run with TRITON_INTERPRET unset (under the interpreter the kernels are not JITFunctions).
By default: the heaviest variant of each kernel (bias + focal pass + γ ≠ 0), the γ = 0 forward, the two passes
of a split forward sweep and its row-only merge kernels (config "merge");
``--full`` adds fp64, the tf32 / tf32x3 fp32 paths and every kernel's lighter variants (no focal pass, γ = 0). Used by ``tests/test_triton_codegen.py`` (in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

KERNELS = ("rowstats_fwd_kernel", "rowstats_bwd_da_kernel", "rowstats_bwd_dc_kernel", "rowstats_bwd_sym_kernel")
INT_ARGS = ("M", "N", "D", "stride_a", "stride_c", "stride_x", "self_offset", "n_per", "n_split")
#: the row-only merge kernels of the split forward sweep (one job per dtype class and target, config "merge")
MERGE_KERNELS = ("rowstats_fwd_merge_kernel", "rowstats_fwd_sum_kernel")
#: shared memory per block available on the targets (opt-in maximum): A100 163 KiB, H100 227 KiB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def cuobjdump() -> str:
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(p):
        return p
    return shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"


def jobs(full: bool = False):
    """(kernel, config name, dtype, cc, variant) for every shipped configuration."""
    from .configs import shipped
    SHIPPED = shipped("rowstats")
    heavy = ("focal_bias", True, True, False)  # bias + focal pass + γ ≠ 0
    g0 = ("focal_g0", True, False, True)       # the γ = 0 pass 2 (ACL), allocated differently
    plain = ("plain", False, False, True)      # SupCon / CL: pass 1 only
    split1 = ("split1", True, True, False, 1)  # a split sweep's pass 1 (ops.split_plan)
    split2 = ("split2", True, True, False, 2)  # a split sweep's pass 2 (bias, γ ≠ 0)
    sym_split = ("split_focal_bias", True, True, False, "split")  # the symmetric backward's 2-D grid (SPLIT)
    out = []
    for name, cfg in SHIPPED.items():
        dts = list(cfg.dtypes)
        if not full and dts == ["fp64"]:
            continue
        if full and "fp32" in dts:  # the fp32 precisions of torch's "medium" / "high" (support.fp32_precision)
            dts += ["tf32", "tf32x3"]
        for dt in dts:
            for cc in (80, 90):
                for k in KERNELS:
                    if full:
                        variants = (heavy, plain, g0)
                    else:  # default (CI): the heaviest variant, and γ = 0 for the forward
                        variants = (heavy, g0) if k == "rowstats_fwd_kernel" else (heavy,)
                    if k == "rowstats_fwd_kernel":
                        variants = variants + (split1, split2)
                    elif k == "rowstats_bwd_sym_kernel":
                        variants = variants + (sym_split,)
                    for var in variants:
                        out.append((k, name, dt, cc, var))
    for acc in (("fp32", "fp64") if full else ("fp32",)):
        for cc in (80, 90):
            for k in MERGE_KERNELS:
                out.append((k, "merge", acc, cc, ("merge", False, False, False)))
    return out


def compile_one(job):
    """Compile one job; a failure is reported in the result (key "error") instead of raised."""
    try:
        return _compile_one(job)
    except Exception as e:  # noqa: BLE001
        k, cfg_name, dt, cc, var = job
        return dict(kernel=k, config=cfg_name, dtype=dt, cc=cc, variant=var[0],
                    error=f"{type(e).__name__}: {str(e)[-2000:]}")


def _compile_one(job):
    k, cfg_name, dt, cc, (var_name, focal, bias, gamma_zero, *pass_) = job
    from . import rowstats
    from .configs import shipped
    SHIPPED = shipped("rowstats")
    kernel = getattr(rowstats, k)
    if k in MERGE_KERNELS:
        from .ops import MERGE_BLOCK
        sig = {p.name: "constexpr" if p.is_constexpr else "i32" if p.name in INT_ARGS else
               "*i64" if p.name in ("WTOP", "TOP") else "*" + dt for p in kernel.params}
        r = compile_report(kernel, sig, dict(BLOCK_M=MERGE_BLOCK), cc, 4, 1)
        return dict(kernel=k, config=cfg_name, dtype=dt, cc=cc, variant=var_name, **r)
    kc = SHIPPED[cfg_name]
    bc = kc.fwd_config(cc) if k == "rowstats_fwd_kernel" else kc.sym_config() if k == "rowstats_bwd_sym_kernel" \
        else kc.bwd
    if k == "rowstats_bwd_dc_kernel":  # the dC program owns BLOCK_M columns, sweeps BLOCK_N rows
        bm, bn = bc.BLOCK_N, bc.BLOCK_M
    else:
        bm, bn = bc.BLOCK_M, bc.BLOCK_N
    in_dt = "fp32" if dt in ("tf32", "tf32x3") else dt
    acc = "fp64" if dt == "fp64" else "fp32"
    constexprs = dict(HAS_BIAS=bias, FOCAL=focal, GAMMA_ZERO=gamma_zero, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D=bc.BLOCK_D, SINGLE_D=0 < kc.max_d <= bc.BLOCK_D,
                      PREC=dt if dt in ("tf32", "tf32x3") else "ieee",
                      UPCAST=False)
    if k == "rowstats_fwd_kernel":
        constexprs["PASS"] = pass_[0] if pass_ else 0
    elif k == "rowstats_bwd_sym_kernel":
        constexprs["SPLIT"] = pass_ == ["split"]
    sig = {}
    for p in kernel.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in INT_ARGS:
            sig[n] = "i32"
        elif n.startswith("p_"):  # a float parameter (support.kernel_param): fp32, or fp64 bits as an int64
            sig[n] = "i64" if acc == "fp64" else "fp32"
        elif n in ("A", "C", "X"):
            sig[n] = "*" + in_dt
        elif n in ("ALAB", "CLAB", "LAB", "TOP", "WTOP"):
            sig[n] = "*i64"
        else:
            sig[n] = "*" + acc
    r = compile_report(kernel, sig, constexprs, cc, bc.num_warps, bc.num_stages)
    return dict(kernel=k, config=cfg_name, dtype=dt, cc=cc, variant=var_name, **r)


#: the elementwise transcendental operations counted by ``tile_transcendentals`` (TTIR op names): the
#: exponentials and logarithms, the roots and every floating-point division (a reciprocal ``1.0 / u`` is an
#: ``arith.divf`` too), whatever MLIR dialect spells them in the Triton versions we support
TRANSCENDENTAL_OPS = ("math.exp", "math.exp2", "math.expm1", "math.log", "math.log2", "math.log1p", "math.sqrt",
                      "math.rsqrt", "math.powf", "math.fpowi", "arith.divf", "tt.precise_sqrt", "tt.precise_divf")
_TTIR_OP = re.compile(r"= (%s) [^:]*: tensor<([0-9x]+)x(?:f16|bf16|f32|f64)>" %
                      "|".join(re.escape(o) for o in TRANSCENDENTAL_OPS))


def tile_transcendentals(ttir: str, tile):
    """(total, {op: count}) of the transcendental operations of TRANSCENDENTAL_OPS in a kernel's TTIR whose
    result is a rank-2 tile of shape ``tile`` = (BLOCK_M, BLOCK_N) or its transpose; row vectors ([BLOCK_M],
    [BLOCK_M, 1]) and scalars are not counted. Each operation is counted once where it stands in the TTIR
    (after Triton's inlining, canonicalisation and CSE): an op in a loop body counts once, i.e. the figure is
    the number of transcendentals per tile element of one sweep (pass 1 and pass 2 of the forward together)."""
    shapes = {tuple(tile), tuple(tile)[::-1]}
    ops = {}
    for m in _TTIR_OP.finditer(ttir):
        if tuple(int(v) for v in m.group(2).split("x")) in shapes:
            ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    return sum(ops.values()), dict(sorted(ops.items()))


def compile_report(kernel, signature, constexprs, cc, num_warps, num_stages):
    """Compile one JITFunction for sm_<cc>: shared memory, registers, spills (STACK/LOCAL), tensor-core use,
    and the transcendentals per [BLOCK_M, BLOCK_N] tile element in its TTIR (``tile_transcendentals``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    t0 = time.time()
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = ck.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        res = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    usage = {}
    for line in res.splitlines():
        if "REG:" in line:
            usage = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+(?:\[\d+\])?):(\d+)", line)}
    if "BLOCK_N" in constexprs:
        n_tr, tr_ops = tile_transcendentals(ck.asm["ttir"], (constexprs["BLOCK_M"], constexprs["BLOCK_N"]))
    else:  # a kernel of row vectors only (no tile)
        n_tr, tr_ops = 0, {}
    return dict(tile_transcendentals=n_tr, tile_transcendental_ops=tr_ops, shared=ck.metadata.shared,
                shared_limit=SHARED_LIMIT[cc], reg=usage.get("REG"),
                stack=usage.get("STACK"), local=usage.get("LOCAL"), mma_sync="mma.sync" in ptx, wgmma="wgmma" in ptx,
                seconds=round(time.time() - t0, 2))


def run(n_jobs: int = 2, full: bool = False, jobs_fn=None, compile_fn=None):
    """Compile every job of ``jobs_fn(full)`` with ``compile_fn`` (defaults: this module's kernels)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    js = (jobs_fn or jobs)(full)
    compile_fn = compile_fn or compile_one
    if n_jobs <= 1:
        return [compile_fn(j) for j in js]
    with ProcessPoolExecutor(n_jobs) as ex:
        return list(ex.map(compile_fn, js))


def main(argv=None, run_fn=None, doc=None, width=24):
    """Command line of the compile sweep (also used by ``ssl_codegen``): a table or JSON of reports."""
    ap = argparse.ArgumentParser(description=(doc or __doc__).splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    a = ap.parse_args(argv)
    out = (run_fn or run)(a.jobs, a.full)
    if a.json:
        print(json.dumps(out))
        return
    head = "{kernel:%ds} {config:8s} {dtype:5s} sm_{cc} {variant:11s}" % width
    for r in out:
        if "error" in r:
            print((head + " FAILED {error}").format(**r))
            continue
        print((head + " shared={shared:6d} reg={reg} stack={stack} local={local} mma.sync={mma_sync} "
                      "wgmma={wgmma} tile_transcendentals={tile_transcendentals} {seconds}s").format(**r))


if __name__ == "__main__":
    sys.exit(main())
