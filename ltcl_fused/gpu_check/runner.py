"""The parent process: probe, the CUDA extension build, the groups of cases in worker processes, the reports.

It never touches the GPU itself. Order and budget (fractions of ``--budget-s``, ``cases.Profile``):
1. probe (a worker): versions, the GPU, which backends can be tried;
2. the CUDA extension build starts in the background (GPU only; local arch only, see ``machine.build_env``);
3. phase "parallel" (up to ``jobs`` workers at once): correctness, the large-index case, behaviour;
   groups with CUDA-backend cases wait for the build (inside the worker) and are started last;
4. phase "timing" (one worker, alone on the device), then phase "largest";
5. the reports (``report.py``).
A phase starts no group after its deadline; a worker still running ``GRACE_S`` after it is killed (its
current case: ``timeout``, the rest: ``not_run``). Workers that die are restarted for the cases left
(at most ``MAX_RESTARTS`` times per group).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from . import cases as C
from . import machine, report
from .summary import header_text
from .worker import PROGRESS, RESULT

GRACE_S = 10.0
MAX_RESTARTS = 4
POLL_S = 0.2


def _tail(path: str, start: int = 0) -> str:
    """The last line of a log from byte ``start`` on, leaving out the worker's own progress lines."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    lines = [ln for ln in lines if not (ln.startswith(PROGRESS) or ln.startswith(RESULT))]
    return lines[-1][:300] if lines else ""


def _how_it_ended(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


class GroupRun:
    """One group of cases in a worker process, restarted for the cases left when the worker dies."""

    def __init__(self, group: dict, work: str, device: str, build_file: str):
        self.group, self.device, self.build_file = group, device, build_file
        self.name = group["name"]
        self.results: Dict[str, dict] = {}
        self.spec_path = os.path.join(work, self.name + ".spec.json")
        self.results_path = os.path.join(work, self.name + ".jsonl")
        self.log_path = os.path.join(work, self.name + ".log")
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self.markers = 0
        self.log_start = 0
        self.t_start = None

    def remaining(self) -> List[dict]:
        return [c for c in self.group["cases"] if c["id"] not in self.results]

    def set_all(self, status: str, reason: str) -> None:
        for c in self.remaining():
            self.results[c["id"]] = dict(status=status, reason=reason, wall_s=0.0)

    def start(self, deadline: float, env: dict) -> None:
        if self.t_start is None:
            self.t_start = time.time()
        with open(self.spec_path, "w") as f:
            json.dump(dict(device=self.device, deadline=deadline, build_file=self.build_file,
                           results=self.results_path, cases=self.remaining()), f)
        self.log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "ltcl_fused.gpu_check", "--worker", self.spec_path],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._deadline, self._env = deadline, env

    def _read(self) -> None:
        markers = 0
        try:
            with open(self.results_path) as f:
                for line in f:
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if "_restart" in obj:
                        markers += 1
                    elif obj.get("id") in {c["id"] for c in self.group["cases"]}:
                        self.results[obj["id"]] = {k: v for k, v in obj.items() if k != "id"}
        except OSError:
            pass
        self._new_markers, self.markers = markers - self.markers, markers

    def poll(self) -> bool:
        """True when the group is finished (all its cases have a result)."""
        if self.proc is None or self.proc.poll() is None:
            return self.proc is None
        rc = self.proc.returncode
        self._log.close()
        self._read()
        left = self.remaining()
        if not left:
            return True
        if not self._new_markers:  # the worker died inside a case: that case is the crash
            tail = _tail(self.log_path, self.log_start)
            why = f"worker {_how_it_ended(rc)} while running this case" + (f"; last output: {tail}" if tail else "")
            self.results[left[0]["id"]] = dict(status="crash", wall_s="", reason=why[:300])
            left = left[1:]
            if not left:
                return True
        if self.restarts >= MAX_RESTARTS:
            self.set_all("not_run", f"not run: the worker was restarted {MAX_RESTARTS} times")
            return True
        self.restarts += 1
        self.start(self._deadline, self._env)
        return False

    def kill(self, why: str) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker's own process group only
            except OSError:
                pass
            self.proc.wait()
            self._log.close()
        self._read()
        left = self.remaining()
        if left:
            self.results[left[0]["id"]] = dict(status="timeout", reason=why, wall_s="")
        self.set_all("not_run", "not run: " + why)


class Build:
    """``python -m ltcl_fused.ext build`` in the background; its status file is what the workers wait on."""

    def __init__(self, status_file: str, log_path: str):
        self.status_file, self.log_path = status_file, log_path
        self.proc = None
        self.row = dict(id="build/cuda-extension", section="build", kind="build", backend="cuda")
        self.t0 = None
        self.timeout = None

    def _write(self, status: str, reason: str = "") -> None:
        self.row.update(status=status, reason=reason, wall_s=round(time.time() - self.t0, 1) if self.t0 else 0.0)
        tmp = self.status_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(status=status, reason=reason), f)
        os.replace(tmp, self.status_file)

    def skip(self, reason: str) -> None:
        self._write("unavailable", reason)

    def start(self, env: dict, timeout: float, cmd=None) -> None:
        self.t0, self.timeout, self.need_cuda = time.time(), timeout, cmd is None
        self._log = open(self.log_path, "w")
        self._write("running")
        self.proc = subprocess.Popen(cmd or [sys.executable, "-m", "ltcl_fused.ext", "build", "-v"], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.row.get("status") == "running"

    def poll(self) -> None:
        if not self.running or self.proc is None:
            return
        rc = self.proc.poll()
        if rc is None:
            if time.time() - self.t0 > self.timeout:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self._log.close()
                self._write("error", f"the build ran past its {self.timeout:.0f} s budget (log: logs/ext_build.log)")
            return
        self._log.close()
        line = _tail(self.log_path)
        if rc == 0 and "CPU+CUDA" not in line and self.need_cuda:
            self._write("error", f"the extension built without its CUDA sources: {line}")
        elif rc == 0:
            self._write("ok", line)
        elif "no C++ compiler" in line or "ninja not found" in line:
            self._write("unavailable", line)
        else:
            self._write("error", line or f"the build failed ({_how_it_ended(rc)})")


def _all_cuda(group: dict) -> bool:
    return all(C.uses_cuda(c) for c in group["cases"])


def _summary_line(run: GroupRun) -> str:
    counts: Dict[str, int] = {}
    for r in run.results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    took = f" ({time.time() - run.t_start:.0f} s)" if run.t_start else ""
    return f"  {run.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + took


def _print_failures(run: GroupRun) -> None:
    for c in run.group["cases"]:
        r = run.results.get(c["id"], {})
        if r.get("status") in report.FAILED:
            print(f"      {r['status']:>7s} {c['id']}: {r.get('reason', '')[:160]}", flush=True)


def run(args, argv=()) -> int:
    t0 = time.time()
    prof = C.dry_profile() if args.dry_run else C.gpu_profile(os.cpu_count() or 4)
    if args.budget_s:
        prof = prof.replace(budget_s=float(args.budget_s))
    if args.jobs:
        prof = prof.replace(jobs=int(args.jobs))
    out = os.path.abspath(args.out)
    work = os.path.join(out, "logs")
    os.makedirs(work, exist_ok=True)
    for f in os.listdir(work):  # a rerun into the same folder starts clean
        if f.endswith((".jsonl", ".spec.json", ".log", ".json")):
            os.remove(os.path.join(work, f))
    import ltcl_fused
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(ltcl_fused.__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if prof.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    deadline = {ph: t0 + prof.budget_s * frac for ph, frac in prof.phase_end.items()}
    build = Build(os.path.join(work, "build_status.json"), os.path.join(work, "ext_build.log"))

    # 1. probe
    print(f"ltcl_fused.gpu_check: {'dry run (CPU tensors, Triton interpreter)' if args.dry_run else 'GPU run'}, "
          f"budget {prof.budget_s:.0f} s, up to {prof.jobs} workers, output {out}", flush=True)
    probe = GroupRun(dict(name="probe", section="probe", cases=[dict(id="probe", kind="probe")]), work, prof.device,
                     build.status_file)
    build.skip("not started")
    probe.start(t0 + min(180.0, 0.3 * prof.budget_s), env)
    while not probe.poll():
        time.sleep(POLL_S)
        if time.time() > t0 + min(180.0, 0.3 * prof.budget_s) + GRACE_S:
            probe.kill("the probe did not finish")
    meta = dict(probe.results.get("probe", {}))
    if meta.get("status") != "ok":
        print(f"ltcl_fused.gpu_check: the probe failed: {meta.get('status')} {meta.get('reason', '')} "
              f"(log: {probe.log_path})", flush=True)
        report.write_all(out, dict(meta, mode=prof.name, budget_s=prof.budget_s, wall_s=time.time() - t0), [],
                         prof)
        return 2
    meta.update(mode=prof.name, budget_s=prof.budget_s, argv=" ".join(["python -m ltcl_fused.gpu_check"] + list(argv)),
                jobs=prof.jobs,
                date=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)))
    print(header_text(meta), flush=True)

    # 2. the CUDA extension build (GPU only)
    backends = tuple(args.backends.split(",")) if args.backends else None
    sections = tuple(args.sections.split(",")) if args.sections else None
    cuda_reason = meta["backends"].get("cuda")
    if (backends is None or "cuda" in backends) and cuda_reason is None:
        benv = machine.build_env(meta.get("capability"), meta.get("cuda_home"), max(1, (os.cpu_count() or 4) // 2),
                                 base=env)
        env.update(benv)
        meta["build_env"] = {k: v for k, v in benv.items() if k != "PATH"}
        build.start(env, prof.budget_s * prof.build_timeout_frac)
        setting = ", ".join(f"{k}={v}" for k, v in meta["build_env"].items())
        print(f"  building the CUDA extension in the background ({setting})", flush=True)
    else:
        build.skip(cuda_reason or "backend 'cuda' not selected (--backends)")

    # 3-4. the phases
    groups = C.plan(prof, backends=backends, sections=sections, inject_failure=args.inject_failure)
    runs = [GroupRun(g, work, prof.device, build.status_file) for g in groups]
    for r in runs:  # a group of one backend the probe ruled out needs no worker (cuda: the build decides)
        used = {c.get("backend") or c.get("provider") for c in r.group["cases"]}
        b = used.pop() if len(used) == 1 else None
        if b in C.BACKENDS and b != "cuda" and meta["backends"].get(b):
            r.set_all("unavailable", meta["backends"][b])
    phase_used = {}
    for phase in ("parallel", "timing", "largest"):
        todo = [r for r in runs if r.group["phase"] == phase]
        if not todo:
            continue
        tp = time.time()
        _run_phase(todo, prof.jobs if phase == "parallel" else 1, deadline[phase], env, build)
        phase_used[phase] = round(time.time() - tp, 1)
    while build.running:  # only when every phase ended before the build
        build.poll()
        time.sleep(POLL_S)
    meta.update(wall_s=round(time.time() - t0, 1), phase_s=phase_used,
                phase_deadline_s={k: round(v - t0, 1) for k, v in deadline.items()})

    # 5. the reports
    rows = [build.row]
    for r in runs:
        for c in r.group["cases"]:
            rows.append(dict(c, **r.results.get(c["id"], dict(status="not_run", reason="not scheduled"))))
    code = report.write_all(out, meta, rows, prof)
    print(f"ltcl_fused.gpu_check: {'FAILED' if code else 'passed'} in {time.time() - t0:.0f} s; wrote "
          f"{os.path.join(out, 'summary.md')}, gpu_check.json, gpu_check.csv", flush=True)
    return code


def _run_phase(todo: List[GroupRun], jobs: int, deadline: float, env: dict, build: Build) -> None:
    pending, running = [r for r in todo if r.remaining()], []
    for r in todo:
        if not r.remaining():
            print(_summary_line(r), flush=True)
    while pending or running:
        build.poll()
        for r in list(running):
            if r.poll():
                running.remove(r)
                print(_summary_line(r), flush=True)
                _print_failures(r)
        now = time.time()
        if now > deadline + GRACE_S:
            for r in running:
                r.kill("the phase's time budget ran out")
                print(_summary_line(r), flush=True)
            running = []
        # groups of CUDA-backend cases only: resolved here when the build failed, else started last
        for r in list(pending):
            if _all_cuda(r.group) and not build.running and build.row["status"] != "ok":
                r.set_all("unavailable", build.row.get("reason") or "the CUDA extension is unavailable")
                pending.remove(r)
                print(_summary_line(r), flush=True)
        if now >= deadline:
            for r in pending:
                r.set_all("not_run", "not run: the phase's time budget ran out before this group started")
                print(_summary_line(r), flush=True)
            pending = []
        while pending and len(running) < jobs:
            ready = [r for r in pending if not r.group["needs_cuda"] or not build.running]
            r = ready[0] if ready else pending[0]  # a CUDA group's worker waits for the build itself
            pending.remove(r)
            r.start(deadline, env)
            running.append(r)
        time.sleep(POLL_S)
