"""Compile the SSL kernels (``ssl_rowstats.py``) to real sm_80 / sm_90 cubins without a GPU.

    python -m ltcl_fused.triton_kernels.ssl_codegen [--jobs 2] [--full]

The forward and dA/dC kernels run with the row-statistics block configurations (``configs.SHIPPED``,
picked by the same heuristic), so every shipped configuration is compiled for the dtypes it serves;
the Bayesian weighting pass (no ``tl.dot``) with ``ssl_ops.BAYES_CONFIG`` in fp32 (and fp64 with
``--full``). Default variants: the heaviest of each kernel (two scales + the "both" filter), MTTV's
"low" filter with the self column, and the Bayesian ones (STRIP forward, G_STRIP dA/dC, both modes
of the weighting pass; the symmetric backward ``ssl_bwd_sym_kernel`` has no Bayesian variant and runs with
``ssl_ops.sym_config``); ``--full`` adds the
other variants the losses use and fp64. Reports come from ``codegen.compile_report``
(shared memory, registers, STACK/LOCAL spills, mma.sync / wgmma in the PTX).
Must run with TRITON_INTERPRET unset. Used by ``tests/test_triton_ssl_codegen.py`` (in a subprocess).
"""
from __future__ import annotations

import sys

from . import codegen
from .codegen import compile_report

KERNELS = ("ssl_fwd_kernel", "ssl_bwd_da_kernel", "ssl_bwd_dc_kernel", "ssl_bwd_sym_kernel")
#: kernels without a Bayesian variant (the symmetric backward: unit weights only)
UNIT_ONLY = ("ssl_bwd_sym_kernel",)
INT_ARGS = ("M", "N", "D", "stride_a", "stride_c", "stride_x", "self_offset", "top_step", "n_steps", "n_per")

# (name, constexpr overrides). Default: HEAVY (two scales + the "both" filter), MTTV_LOW_SELF (the one
# that needed the 4-warp rule of ssl_ops.bwd_config) and BAYES (STRIP / G_STRIP); --full: every variant
# a loss uses (dcl, hcl, the four mttv ones) as well.
HEAVY = ("k2_both", dict(K2=True, FILTER=1, EXCL_PARTNER=True, INCL_SELF=False))
BAYES = ("bayes", dict(K2=False, FILTER=0, EXCL_PARTNER=True, INCL_SELF=False))
MTTV_LOW_SELF = ("mttv_low_self", dict(K2=False, FILTER=2, EXCL_PARTNER=False, INCL_SELF=True))
LOSS_VARIANTS = (
    ("dcl", dict(K2=False, FILTER=0, EXCL_PARTNER=True, INCL_SELF=False)),
    ("hcl", dict(K2=True, FILTER=0, EXCL_PARTNER=True, INCL_SELF=False)),
    ("mttv_both", dict(K2=False, FILTER=1, EXCL_PARTNER=False, INCL_SELF=False)),
    ("mttv_low", dict(K2=False, FILTER=2, EXCL_PARTNER=False, INCL_SELF=False)),
    ("mttv_both_self", dict(K2=False, FILTER=1, EXCL_PARTNER=False, INCL_SELF=True)),
)


def jobs(full: bool = False):
    """(kernel, config name, dtype, cc, variant) for every compiled case."""
    from .configs import shipped
    SHIPPED = shipped("ssl")
    out = []
    for name, cfg in SHIPPED.items():
        dts = [d for d in cfg.dtypes if full or d != "fp64"]
        for dt in dts:
            for cc in (80, 90):
                for k in KERNELS:
                    variants = [HEAVY] + ([] if k in UNIT_ONLY else [BAYES]) + [MTTV_LOW_SELF] + \
                        (list(LOSS_VARIANTS) if full else [])
                    if k == "ssl_bwd_sym_kernel":  # its 2-D grid (SPLIT: column ranges of few row blocks)
                        variants.append((HEAVY[0] + "_split", dict(HEAVY[1], SPLIT=True)))
                    for var in variants:
                        out.append((k, name, dt, cc, var))
    for dt in (("fp32", "fp64") if full else ("fp32",)):
        for cc in (80, 90):
            for bwd in (False, True):
                for split in (False, True):  # SPLIT: the 2-D grid (column ranges) of few row blocks
                    name = ("bwd" if bwd else "fwd") + ("_split" if split else "")
                    out.append(("ssl_bayes_kernel", "bayes", dt, cc, (name, dict(BWD=bwd, SPLIT=split))))
    return out


def compile_one(job):
    try:
        return _compile_one(job)
    except Exception as e:  # noqa: BLE001
        k, cfg_name, dt, cc, var = job
        return dict(kernel=k, config=cfg_name, dtype=dt, cc=cc, variant=var[0],
                    error=f"{type(e).__name__}: {str(e)[-2000:]}")


def _compile_one(job):
    k, cfg_name, dt, cc, (var_name, flags) = job
    from . import ssl_rowstats
    from .configs import shipped
    SHIPPED = shipped("ssl")
    from .ssl_ops import BAYES_CONFIG, bwd_config, sym_config
    kernel = getattr(ssl_rowstats, k)
    acc = "fp64" if dt == "fp64" else "fp32"
    if k == "ssl_bayes_kernel":
        bc = BAYES_CONFIG
        constexprs = dict(BLOCK_M=bc.BLOCK_M, BLOCK_N=bc.BLOCK_N, **flags)
    else:
        kc = SHIPPED[cfg_name]
        if k == "ssl_fwd_kernel":
            bc = kc.fwd
        elif k == "ssl_bwd_sym_kernel":
            bc = sym_config(kc)
        else:
            bc = bwd_config(kc.bwd, var_name == "bayes")
        # the dC program owns BLOCK_M columns (kernel's BLOCK_N) and sweeps BLOCK_N rows (kernel's BLOCK_M)
        bm, bn = (bc.BLOCK_N, bc.BLOCK_M) if k == "ssl_bwd_dc_kernel" else (bc.BLOCK_M, bc.BLOCK_N)
        constexprs = dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bc.BLOCK_D, SINGLE_D=0 < kc.max_d <= bc.BLOCK_D,
                          PREC="ieee", UPCAST=False)
        if k == "ssl_fwd_kernel":
            constexprs["STRIP"] = var_name == "bayes"
        elif k != "ssl_bwd_sym_kernel":
            constexprs["G_STRIP"] = var_name == "bayes"
        else:
            constexprs.setdefault("SPLIT", False)
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
            sig[n] = "*" + dt
        elif n == "PARTNER":
            sig[n] = "*i64"
        elif n == "NSET":
            sig[n] = "*i32"
        else:
            sig[n] = "*" + acc
    r = compile_report(kernel, sig, constexprs, cc, bc.num_warps, bc.num_stages)
    return dict(kernel=k, config=cfg_name, dtype=dt, cc=cc, variant=var_name, **r)


def run(n_jobs: int = 2, full: bool = False):
    return codegen.run(n_jobs, full, jobs, compile_one)


def main(argv=None):
    return codegen.main(argv, run, __doc__, width=18)


if __name__ == "__main__":
    sys.exit(main())
