"""The C++/CUDA extension: compiled on first use, cached, loaded once per process.

``load()`` builds ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) into torch's extensions
folder (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/<py>_<cu|cpu>/``) and loads it;
the ops appear as ``torch.ops.ltcl_fused.*``. The extension name carries a hash of the source root
(its absolute path), the sources, the compiler flags and the torch version, so a changed source (or
another torch) gets a fresh build and never a stale one, and two source roots (two checkouts, or an
installed copy and a checkout) never share a build folder: torch's ninja file records absolute
paths, so a shared one would be rebuilt on every switch while holding the build lock. An exclusive ``fcntl`` lock around the build makes a second process
wait for the first one's build instead of racing it (the lock dies with its process, so a killed
build never blocks later ones).

Command line: ``python -m ltcl_fused.ext build`` compiles and loads the extension for the
installed torch (with the CUDA sources when torch has CUDA) and exits non-zero with the
compiler's error on failure; ``python -m ltcl_fused.ext info`` prints what would be built.

Environment: ``CXX`` (compiler), ``LTCL_EXT_CPU_ONLY=1`` (skip the CUDA sources),
``LTCL_EXT_EXTRA_INCLUDE`` (extra include folders, ``os.pathsep``-separated),
``LTCL_EXT_VERBOSE=1`` (show the build commands), ``TORCH_CUDA_ARCH_LIST`` (CUDA targets).
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import sys
import threading
from typing import List, Optional

import torch

__all__ = ["load", "unavailable_reason", "has_cuda_kernels", "ExtensionUnavailable", "sources", "main"]


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; ``str(exc)`` is one line saying why."""

    def __init__(self, line: str, details: str = ""):
        super().__init__(line)
        self.details = details or line


_lock = threading.Lock()
_loaded: Optional[dict] = None
_failure: Optional[ExtensionUnavailable] = None


def csrc_dir() -> str:
    """The C++ sources: ``ltcl_fused/csrc`` when installed, the repository's ``csrc/`` in a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(cand, "ops.cpp")):
            return cand
    raise ExtensionUnavailable("the C++ sources (csrc/ops.cpp) are not installed next to ltcl_fused")


def _with_cuda() -> bool:
    if os.environ.get("LTCL_EXT_CPU_ONLY") == "1" or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None


def sources(with_cuda: Optional[bool] = None) -> List[str]:
    root = csrc_dir()
    srcs = [os.path.join(root, "ops.cpp"), os.path.join(root, "cpu", "rowstats_cpu.cpp"),
            os.path.join(root, "cpu", "topk_mining.cpp"), os.path.join(root, "cpu", "ssl_cpu.cpp")]
    if _with_cuda() if with_cuda is None else with_cuda:
        srcs += [os.path.join(root, "cuda", f) for f in ("rowstats_cuda.cu", "mining_cuda.cu", "ssl_cuda.cu",
                                                         "binding_cuda.cpp")]
    return srcs


def _openmp_flags() -> List[str]:
    """at::parallel_for is inline OpenMP code when torch's parallel backend is OpenMP: compile it as such
    (the extension then shares the libgomp that torch already loaded: same soname)."""
    return ["-fopenmp"] if getattr(torch._C, "has_openmp", False) and platform.system() == "Linux" else []


def _cpu_flags() -> List[str]:
    """Vector ISA of the at::vec code: the capability torch itself dispatches to on this CPU."""
    # -ffp-contract=off: every product rounded as written, so the backward recomputes the forward's logits
    # bit for bit (an fma in one of them only breaks x - lse consistency at |x| ~ 1e7)
    flags = ["-O3", "-ffp-contract=off"] + _openmp_flags()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return flags + ["-DCPU_CAPABILITY=DEFAULT"]
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        cap = "DEFAULT"
    if cap.startswith("AVX512"):
        return flags + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                        "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if cap == "AVX2":
        return flags + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags + ["-DCPU_CAPABILITY=DEFAULT"]


def _extra_includes() -> List[str]:
    inc = [p for p in os.environ.get("LTCL_EXT_EXTRA_INCLUDE", "").split(os.pathsep) if p]
    if _with_cuda():  # CUDA wheels of torch keep some CUDA headers in the nvidia/cu13 (cu12: per-lib) packages
        for base in sys.path:
            cand = os.path.join(base, "nvidia", "cu13", "include")
            if os.path.isdir(cand) and cand not in inc:
                inc.append(cand)
    return inc


def _local_archs(with_cuda: bool) -> str:
    """The compute capabilities of the visible GPUs ("" without CUDA): what a default CUDA build targets."""
    if not with_cuda or not torch.cuda.is_available():
        return ""
    return ",".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))


def _build_config():
    root = csrc_dir()
    with_cuda = _with_cuda()
    srcs = sources(with_cuda)
    cflags = _cpu_flags()
    cuda_flags = ["-O3", "--expt-relaxed-constexpr"] if with_cuda else []
    h = hashlib.sha256()
    h.update(root.encode())  # the absolute root, as the sources and includes handed to ninja spell it
    for dirpath, _, files in sorted(os.walk(root)):
        if os.path.relpath(dirpath, root).split(os.sep)[0] == "cuda_emu":  # the tests' CUDA emulator: not built here
            continue
        for f in sorted(files):
            if f.endswith((".cpp", ".h", ".hpp", ".cu", ".cuh")):
                p = os.path.join(dirpath, f)
                h.update(os.path.relpath(p, root).encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    # the ninja that will build it: two ninjas (pip's in a venv, the system's) rebuild each other's build.ninja
    # otherwise; and, for CUDA builds without TORCH_CUDA_ARCH_LIST, the GPUs torch targets by default (a build
    # cached on another GPU model must not be reused)
    h.update(repr((cflags, cuda_flags, torch.__version__, torch.version.cuda, with_cuda,
                   os.environ.get("TORCH_CUDA_ARCH_LIST", "") or _local_archs(with_cuda), shutil.which("ninja"),
                   sys.version_info[:2])).encode())
    name = f"ltcl_fused_ext_{h.hexdigest()[:12]}"
    return dict(name=name, sources=srcs, cflags=cflags, cuda_flags=cuda_flags, with_cuda=with_cuda,
                includes=[root] + _extra_includes())


def _first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pat in (r"\berror\b:", r"fatal error", r"\berror\b", r"not found|No such file"):
        for ln in lines:
            if re.search(pat, ln, re.IGNORECASE) and not ln.startswith("Error building extension"):
                return ln[:300]
    return lines[0][:300] if lines else "unknown error"


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available
    cxx = os.environ.get("CXX", "c++")
    exe = shlex.split(cxx)[0] if cxx.strip() else "c++"
    if shutil.which(exe) is None:
        raise ExtensionUnavailable(f"no C++ compiler: `{exe}` not found (install g++/clang++ or set CXX)")
    if not is_ninja_available():
        raise ExtensionUnavailable("ninja not found (pip install ninja): it is needed to build the C++ extension")


def _register_python_side() -> None:
    """Fake (meta) kernels and the autograd formula of the ops, so opcheck and torch.compile work."""

    @torch.library.register_fake("ltcl_fused::rowstats_fwd")
    def _fwd_fake(A, C, a_lab, c_lab, bias_same, bias_other, self_offset, inv_tau, gamma, focal, symmetric=False):
        acc = torch.float64 if A.dtype == torch.float64 else torch.float32
        M = A.shape[0]
        stats = [A.new_empty((M,), dtype=acc) for _ in range(6)]
        return (*stats, A.new_empty((M,), dtype=torch.int64), A.new_empty((M,), dtype=acc))

    @torch.library.register_fake("ltcl_fused::rowstats_bwd")
    def _bwd_fake(A, C, a_lab, c_lab, bias_same, bias_other, self_offset, inv_tau, gamma, focal,
                  lse, top, lrest, cpos, cposf, cneg, r, rt, symmetric=False):
        if symmetric:  # (dX, an empty [0, D]): dX is the gradient through both A and C
            return A.new_empty(A.shape), C.new_empty((0, C.shape[1]))
        return A.new_empty(A.shape), C.new_empty(C.shape)

    def _setup(ctx, inputs, output):
        A, C, a_lab, c_lab, bias_same, bias_other, self_offset, inv_tau, gamma, focal, *rest = inputs
        symmetric = bool(rest[0]) if rest else False
        lse, _, _, _, upos, uneg, top, lrest = output
        ctx.save_for_backward(A, C, a_lab, c_lab, bias_same, bias_other, lse, upos, uneg, top, lrest)
        ctx.cfg = (self_offset, inv_tau, gamma, focal, symmetric)

    def _backward(ctx, g_lse, g_pos, g_fpos, g_fneg, g_upos, g_uneg, g_top, g_lrest):
        # upos, uneg, top, lrest are auxiliary outputs (inputs of the backward formula): not differentiated.
        A, C, a_lab, c_lab, bias_same, bias_other, lse, upos, uneg, top, lrest = ctx.saved_tensors
        self_offset, inv_tau, gamma, focal, symmetric = ctx.cfg
        from .engine.function import backward_coefficients, dominant_is_negative
        cpos, cposf, cneg, r, rt = backward_coefficients(
            (g_lse, g_pos, g_fpos, g_fneg), lse, upos, uneg, dominant_is_negative(top, a_lab, c_lab), focal)
        with torch.no_grad():  # first-order only: a second differentiation raises (engine/first_order.py)
            dA, dC = torch.ops.ltcl_fused.rowstats_bwd(A, C, a_lab, c_lab, bias_same, bias_other, self_offset,
                                                       inv_tau, gamma, focal, lse, top, lrest, cpos, cposf, cneg,
                                                       r, rt, symmetric)
        if symmetric:  # A and C are one tensor: its whole gradient goes to A
            dC = None
        from .engine.first_order import first_order
        dA, dC = first_order("torch.ops.ltcl_fused.rowstats_fwd", A.device.type, (dA, dC), (A, C))
        return dA, dC, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("ltcl_fused::rowstats_fwd", _backward, setup_context=_setup)
    _register_ssl_python_side()


def _register_ssl_python_side() -> None:
    """Fakes and autograd of ``ssl_fwd`` / ``ssl_bwd`` (contract: ltcl_fused/engine/ssl_contract.py).

    The gradient of (lse, pos) is the contract's backward with coef = the upstream gradient of lse and
    cpos = that of pos; pos_in is not differentiable."""

    @torch.library.register_fake("ltcl_fused::ssl_fwd")
    def _ssl_fwd_fake(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower,
                      upper, bayes, symmetric=False):
        acc = torch.float64 if A.dtype == torch.float64 else torch.float32
        M = A.shape[0]
        return (A.new_empty((len(scales), M), dtype=acc), A.new_empty((M,), dtype=acc),
                A.new_empty((M,), dtype=acc))

    @torch.library.register_fake("ltcl_fused::ssl_bwd")
    def _ssl_bwd_fake(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter, lower,
                      upper, bayes, lse, coef, cpos, symmetric=False):
        if symmetric:  # (dX, an empty [0, D]): dX is the gradient through both A and C
            return A.new_empty(A.shape), C.new_empty((0, C.shape[1]))
        return A.new_empty(A.shape), C.new_empty(C.shape)

    def _ssl_setup(ctx, inputs, output):
        A, C, partner = inputs[:3]
        ctx.save_for_backward(A, C, partner, output[0])
        ctx.cfg = inputs[3:12]
        ctx.symmetric = bool(inputs[12]) if len(inputs) > 12 else False

    def _ssl_backward(ctx, g_lse, g_pos, _g_pos_in):
        A, C, partner, lse = ctx.saved_tensors
        coef = torch.zeros_like(lse) if g_lse is None else g_lse.to(lse.dtype).contiguous()
        cpos = torch.zeros_like(lse[0]) if g_pos is None else g_pos.to(lse.dtype).contiguous()
        with torch.no_grad():  # first-order only: a second differentiation raises (engine/first_order.py)
            dA, dC = torch.ops.ltcl_fused.ssl_bwd(A, C, partner, *ctx.cfg, lse, coef, cpos, ctx.symmetric)
        if ctx.symmetric:  # A and C are one tensor: its whole gradient goes to A
            dC = None
        from .engine.first_order import first_order
        dA, dC = first_order("torch.ops.ltcl_fused.ssl_fwd", A.device.type, (dA, dC), (A, C))
        return (dA, dC) + (None,) * 11

    torch.library.register_autograd("ltcl_fused::ssl_fwd", _ssl_backward, setup_context=_ssl_setup)

    # column blocks (ltcl_fused.distributed's ring mode calls these inside its own autograd Function)
    @torch.library.register_fake("ltcl_fused::ssl_fwd_ranked")
    def _ssl_fwd_ranked_fake(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter,
                             lower, upper, bayes, rank_ref, rank_n):
        return _ssl_fwd_fake(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter,
                             lower, upper, bayes)

    @torch.library.register_fake("ltcl_fused::ssl_bwd_ranked")
    def _ssl_bwd_ranked_fake(A, C, partner, self_offset, inv_tau, scales, exclude_partner, include_self, filter,
                             lower, upper, bayes, rank_ref, rank_n, lse, coef, cpos):
        return A.new_empty(A.shape), C.new_empty(C.shape)

    @torch.library.register_fake("ltcl_fused::ssl_set_values")
    def _ssl_set_values_fake(A, C, partner, self_offset, inv_tau, exclude_partner, include_self, filter, lower,
                             upper):
        acc = torch.float64 if A.dtype == torch.float64 else torch.float32
        return A.new_empty((A.shape[0], C.shape[0]), dtype=acc), A.new_empty((A.shape[0],), dtype=torch.int64)


def load(verbose: Optional[bool] = None) -> dict:
    """Build (if needed) and load the extension once per process; raises ExtensionUnavailable."""
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise _failure
        try:
            _loaded = _build_and_load(verbose if verbose is not None else os.environ.get("LTCL_EXT_VERBOSE") == "1")
            return _loaded
        except ExtensionUnavailable as e:
            _failure = e
            raise
        except Exception as e:  # compiler error, import error, ...
            text = str(e)
            _failure = ExtensionUnavailable(f"the C++ extension failed to build: {_first_error_line(text)}", text)
            raise _failure from e


def _build_and_load(verbose: bool) -> dict:
    import fcntl

    from torch.utils import cpp_extension

    _check_toolchain()
    cfg = _build_config()
    build_dir = cpp_extension._get_build_directory(cfg["name"], verbose)
    lock_path = build_dir.rstrip(os.sep) + ".lock"
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # a second process waits here for the first one's build
        try:
            baton = os.path.join(build_dir, "lock")  # cpp_extension's own baton; stale if a build was killed
            if os.path.exists(baton):
                os.remove(baton)
            so = os.path.join(build_dir, cfg["name"] + ".so")
            if not os.path.exists(so):
                print(f"ltcl_fused: compiling the C++ extension{' with CUDA' if cfg['with_cuda'] else ''} "
                      f"(first use, about a minute) into {build_dir}", file=sys.stderr, flush=True)
            path = cpp_extension.load(
                name=cfg["name"], sources=cfg["sources"], extra_cflags=cfg["cflags"],
                extra_cuda_cflags=cfg["cuda_flags"], extra_include_paths=cfg["includes"],
                extra_ldflags=_openmp_flags(),
                build_directory=build_dir, verbose=verbose, with_cuda=cfg["with_cuda"], is_python_module=False)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    _register_python_side()
    return dict(path=path if isinstance(path, str) else so, name=cfg["name"], with_cuda=cfg["with_cuda"],
                build_dir=build_dir)


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded (building it on first use), else one line saying why not."""
    try:
        load()
        return None
    except ExtensionUnavailable as e:
        return str(e)


def has_cuda_kernels() -> bool:
    try:
        return bool(load()["with_cuda"])
    except ExtensionUnavailable:
        return False


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ltcl_fused.ext", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["build", "info"])
    ap.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = ap.parse_args(argv)
    if args.command == "info":
        cfg = _build_config()
        for k, v in cfg.items():
            print(f"{k}: {v}")
        return 0
    try:
        info = load(verbose=args.verbose)
    except ExtensionUnavailable as e:
        print(e.details, file=sys.stderr)
        print(f"ltcl_fused.ext: {e}", file=sys.stderr)
        return 1
    print(f"ltcl_fused.ext: built and loaded {info['name']} ({'CPU+CUDA' if info['with_cuda'] else 'CPU'}) "
          f"from {info['build_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
