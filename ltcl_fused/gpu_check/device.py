"""What differs between a GPU run and the dry run, behind small interfaces.

Everything else in ``gpu_check`` is the same code on both: the dry run swaps ``CudaRuntime`` for
``CpuRuntime`` (CPU tensors, Triton interpreter), nothing more. The pieces here are written so that
their logic can be tested without a GPU: the clock takes an event factory, the sync counter takes the
functions that set torch's sync-debug mode, and the error classifiers are plain functions of a message.

- clock: ``mark()`` / ``elapsed_ms(a, b)`` / ``wait()``; CUDA events on the GPU, ``perf_counter`` on CPU.
- memory: ``reset_peak()`` returns the bytes allocated now; ``peak_mb(base)`` the peak above it
  (``torch.cuda.max_memory_allocated``; None on CPU).
- host syncs: ``count_syncs(fn)`` runs ``fn`` under ``torch.cuda.set_sync_debug_mode("warn")`` and counts
  torch's "called a synchronizing CUDA operation" warnings (None on CPU: nothing to count).
- streams and graphs: ``side_stream()``, ``delayed_copy()`` (a copy made late on the current stream, so a
  kernel launched on the wrong stream reads NaN), ``capture(step)`` (a CUDA graph; on CPU the step is
  simply run again at each replay).
- ``compile_backend``: "inductor" on the GPU, "aot_eager" on CPU (what the tests use).
- ``health()``: None while the CUDA context works, else why not (after a sticky error the worker restarts).
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from typing import Callable, List, Optional, Tuple

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"  # c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync

_OOM = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate", "std::bad_alloc")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return any(s in msg for s in _OOM)


# ---------------------------------------------------------------------------------------------------------------
# clocks and the timing loop
# ---------------------------------------------------------------------------------------------------------------
class PerfClock:
    """Host wall clock (the dry run)."""
    kind = "perf_counter"

    def mark(self):
        return time.perf_counter()

    @staticmethod
    def elapsed_ms(a, b) -> float:
        return (b - a) * 1e3

    def wait(self) -> None:
        pass


class EventClock:
    """CUDA events on the current stream: ``mark()`` records one, ``elapsed_ms`` reads the GPU time between two
    after ``wait()`` (a device synchronize). ``event_factory`` and ``synchronize`` are injectable for tests."""
    kind = "cuda_events"

    def __init__(self, event_factory: Optional[Callable] = None, synchronize: Optional[Callable] = None):
        self._new = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._sync = synchronize or torch.cuda.synchronize

    def mark(self):
        e = self._new()
        e.record()
        return e

    @staticmethod
    def elapsed_ms(a, b) -> float:
        return float(a.elapsed_time(b))

    def wait(self) -> None:
        self._sync()


def time_once(clock, fwd: Callable, bwd: Optional[Callable]) -> Tuple[float, float]:
    """(forward ms, backward ms) of one ``bwd(fwd())``; the backward is 0 when ``bwd`` is None."""
    e0 = clock.mark()
    out = fwd()
    e1 = clock.mark()
    if bwd is not None:
        bwd(out)
    e2 = clock.mark()
    clock.wait()
    return clock.elapsed_ms(e0, e1), clock.elapsed_ms(e1, e2)


def measure(clock, fwd: Callable, bwd: Optional[Callable], *, min_repeats: int, max_repeats: int,
            target_s: float, deadline: float, before: Optional[Callable] = None, now=time.monotonic) -> dict:
    """Warm-up run (compiles), one run to size the loop, then the median of ``repeats`` timed runs.

    repeats = ``target_s`` of timed runs, within [min_repeats, max_repeats]; fewer than ``min_repeats`` only
    when ``deadline`` (a ``now()`` value) would be passed, and then ``short=True`` says so. ``before`` runs
    ahead of every run (e.g. clearing gradients), outside the timed region."""
    def run():
        if before is not None:
            before()
        return time_once(clock, fwd, bwd)

    t_warm = now()
    warm = run()
    warm_s = now() - t_warm
    est = run()
    per_run_s = max(1e-6, (est[0] + est[1]) / 1e3)
    reps = int(min(max_repeats, max(min_repeats, target_s // per_run_s)))
    left = deadline - now()
    short = reps * per_run_s > left
    if short:
        reps = int(left // per_run_s)
    samples: List[Tuple[float, float]] = [run() for _ in range(reps)] if reps >= 1 else [est]
    return dict(repeats=len(samples), fwd_ms=statistics.median(s[0] for s in samples),
                bwd_ms=statistics.median(s[1] for s in samples),
                total_ms=statistics.median(s[0] + s[1] for s in samples),
                min_ms=min(s[0] + s[1] for s in samples), warmup_s=warm_s, warm_total_ms=warm[0] + warm[1],
                short=short)


# ---------------------------------------------------------------------------------------------------------------
# host-sync counting
# ---------------------------------------------------------------------------------------------------------------
def count_syncs(fn: Callable, set_mode: Callable, get_mode: Callable):
    """(fn(), number of host syncs torch reported while it ran) under sync-debug mode "warn".

    torch emits one ``UserWarning("called a synchronizing CUDA operation")`` per synchronizing call (``.item()``,
    ``bool()`` of a CUDA tensor, a copy from pageable host memory, ``nonzero``, ...); warnings raised in the
    autograd engine's threads are replayed in the calling thread at the end of ``backward``."""
    prev = get_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            out = fn()
        finally:
            set_mode(prev)
    return out, sum(SYNC_WARNING in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------------------------
# runtimes
# ---------------------------------------------------------------------------------------------------------------
class CpuRuntime:
    """The dry run: CPU tensors (Triton kernels under the interpreter)."""
    name = "cpu"
    compile_backend = "aot_eager"
    streams_note = "CPU: no CUDA streams; the same code ran on the default (only) stream"
    graph_note = "CPU: no CUDA graphs; each replay re-ran the step eagerly"

    def __init__(self):
        self.device = torch.device("cpu")

    def synchronize(self) -> None:
        pass

    def clock(self):
        return PerfClock()

    def reset_peak(self) -> int:
        return 0

    def peak_mb(self, base: int) -> Optional[float]:
        return None

    def total_memory_mb(self) -> Optional[float]:
        return None

    def empty_cache(self) -> None:
        pass

    @contextlib.contextmanager
    def side_stream(self):
        yield None

    def delayed_copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def capture(self, step: Callable, warmup: int = 3) -> Callable:
        for _ in range(warmup):
            step()
        return step

    def count_syncs(self, fn: Callable):
        return fn(), None

    def health(self) -> Optional[str]:
        return None

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)


class CudaRuntime(CpuRuntime):
    name = "cuda"
    compile_backend = "inductor"
    streams_note = ""
    graph_note = ""

    def __init__(self):
        self.device = torch.device("cuda", torch.cuda.current_device())

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def clock(self):
        return EventClock()

    def reset_peak(self) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_mb(self, base: int) -> Optional[float]:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    def total_memory_mb(self) -> Optional[float]:
        return torch.cuda.get_device_properties(self.device).total_memory / 2 ** 20

    def empty_cache(self) -> None:
        import gc
        gc.collect()
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def side_stream(self):
        main = torch.cuda.current_stream()
        s = torch.cuda.Stream()
        s.wait_stream(main)
        with torch.cuda.stream(s):
            yield s
        main.wait_stream(s)

    def delayed_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` filled with NaN (-1 for integers) first and written only after ~50 ms of spinning on
        the current stream: a kernel that ignores the current stream reads the filler."""
        out = torch.full_like(t, float("nan") if t.is_floating_point() else -1)
        torch.cuda._sleep(100_000_000)  # clock cycles (~50 ms at 2 GHz)
        out.copy_(t)
        return out

    def capture(self, step: Callable, warmup: int = 3) -> Callable:
        """Warm ``step`` up on a side stream (as torch.cuda.graphs requires), capture one call, return the replay
        (which returns what the captured call returned: static tensors the replay overwrites)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                step()
        main = torch.cuda.current_stream()
        main.wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = step()
        except BaseException:
            torch.cuda.set_stream(main)  # a failed capture can leave its side stream current
            raise

        def replay():
            graph.replay()
            return out
        replay.graph = graph  # keep the graph (and its memory pool) alive with the replay function
        return replay

    def count_syncs(self, fn: Callable):
        return count_syncs(fn, torch.cuda.set_sync_debug_mode, torch.cuda.get_sync_debug_mode)

    def health(self) -> Optional[str]:
        try:
            torch.cuda.synchronize()
            x = torch.ones(4, device=self.device)
            if float((x + x).sum().item()) != 8.0:
                return "a trivial CUDA computation returned a wrong value"
            return None
        except Exception as e:  # noqa: BLE001 - any failure means the context is gone
            return f"CUDA context unusable: {type(e).__name__}: {last_line(str(e))}"

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def make_runtime(device: str):
    return CudaRuntime() if device == "cuda" else CpuRuntime()


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
