#!/usr/bin/env python
"""Run every code block of README.md and docs/*.md; exit 1 when any block fails.

The convention (COMMON.md): a ```python block runs, in a fresh process, from the repository root, on the CPU
only (CUDA_VISIBLE_DEVICES is emptied), unless its first line is ``# not run: <reason>``; a ```bash / ```sh
block runs only when its first line is ``# run``; any other fence (```text, ```csv, a bare ```) is not run.
Relative links (files and heading anchors) are checked too: a broken one fails like a failing block.

    python scripts/run_doc_blocks.py                 # every block of README.md and docs/*.md
    python scripts/run_doc_blocks.py docs/pml.md     # the blocks of some files
    python scripts/run_doc_blocks.py --list          # what would run, what is skipped and why
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+.-]*)[^\n]*$")
PYTHON = ("python", "py", "python3")
SHELL = ("bash", "sh", "shell", "console")


@dataclass
class Block:
    path: str       # relative to the root
    line: int       # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def first_line(self) -> str:
        lines = [ln for ln in self.code.splitlines() if ln.strip()]
        return lines[0].strip() if lines else ""

    def decision(self) -> "tuple[bool, str]":
        """(run?, why)."""
        first = self.first_line
        if self.lang in PYTHON:
            if first.startswith("# not run"):
                reason = first.partition(":")[2].strip()
                if not first.startswith("# not run:") or not reason:
                    return False, "ERROR: `# not run:` needs a reason after the colon"
                return False, f"not run: {reason}"
            return True, "python"
        if self.lang in SHELL:
            return (True, "shell (# run)") if first == "# run" else (False, "shell block without `# run`")
        return False, f"not code ({self.lang or 'no language'})"


def parse(path: str, root: str) -> List[Block]:
    """The fenced blocks of one Markdown file (indented fences, e.g. in lists, are dedented)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group("indent"), m.group("fence"), m.group("lang").lower()
        body, j = [], i + 1
        while j < len(lines):
            close = re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j])
            if close:
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise SystemExit(f"{os.path.relpath(path, root)}:{i + 1}: unclosed code fence")
        blocks.append(Block(os.path.relpath(path, root), i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set:
    out, inside = set(), False
    with open(path, encoding="utf-8") as f:
        for ln in f:
            if FENCE.match(ln.rstrip("\n")):
                inside = not inside
            elif not inside and ln.startswith("#"):
                out.add(_slug(ln.lstrip("#")))
    return out


def broken_links(path: str, root: str) -> List[str]:
    """Relative links of a Markdown file whose file (or heading anchor) does not exist."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        rel, _, frag = target.partition("#")
        dest = path if not rel else os.path.normpath(os.path.join(os.path.dirname(path), rel))
        if not os.path.exists(dest):
            bad.append(f"{target} (no such file)")
        elif frag and dest.endswith(".md") and frag not in _anchors(dest):
            bad.append(f"{target} (no such heading)")
    return bad


def doc_files(root: str) -> List[str]:
    files = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    return [f for f in files if os.path.isfile(f)]


def run_block(b: Block, root: str, timeout: float) -> "tuple[bool, float, str]":
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    suffix = ".py" if b.lang in PYTHON else ".sh"
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False, encoding="utf-8") as f:
        f.write(b.code)
        script = f.name
    cmd = [sys.executable, script] if b.lang in PYTHON else ["bash", "-euo", "pipefail", script]
    if b.lang not in PYTHON:
        # `python` in a shell block is this interpreter. Only that name is put first on PATH: the rest of the
        # virtualenv's bin (e.g. pip's ninja, another version than the system's) must not change which tools
        # the C++ extension build sees, or ninja would rebuild it.
        shim = tempfile.mkdtemp(prefix="doc_blocks_bin_")
        for name in ("python", "python3"):
            with open(os.path.join(shim, name), "w") as f:
                f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
            os.chmod(os.path.join(shim, name), 0o755)
        env["PATH"] = shim + os.pathsep + env.get("PATH", "")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        ok, out = p.returncode == 0, (p.stdout + p.stderr)
        if not ok:
            out += f"\n(exit code {p.returncode})"
    except subprocess.TimeoutExpired as e:
        ok, out = False, f"{(e.stdout or b'')!s}\ntimed out after {timeout:.0f} s"
    finally:
        os.unlink(script)
        if b.lang not in PYTHON:
            shutil.rmtree(shim, ignore_errors=True)
    return ok, time.perf_counter() - t0, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="Markdown files (default: README.md and docs/*.md)")
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="repository root (blocks run there)")
    ap.add_argument("--list", action="store_true", help="list the blocks and what would happen to each")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per block")
    a = ap.parse_args(argv)
    root = os.path.abspath(a.root)
    files = [os.path.abspath(f) for f in a.files] or doc_files(root)
    blocks = [b for f in files for b in parse(f, root)]
    failed, passed, skipped = [], 0, 0
    t_all = time.perf_counter()
    for b in blocks:
        run, why = b.decision()
        where = f"{b.path}:{b.line}"
        if why.startswith("ERROR"):
            print(f"FAIL  {where}  {why}", flush=True)
            failed.append(where)
            continue
        if not run or a.list:
            skipped += not run
            print(f"{'run ' if run else 'skip'}  {where}  {why}", flush=True)
            continue
        ok, dt, out = run_block(b, root, a.timeout)
        passed += ok
        print(f"{'ok  ' if ok else 'FAIL'}  {where}  {why}  {dt:.1f} s", flush=True)
        if not ok:
            failed.append(where)
            print("      | " + "\n      | ".join(out.strip().splitlines()[-30:]), flush=True)
    for f in files:
        for link in broken_links(f, root):
            where = os.path.relpath(f, root)
            print(f"FAIL  {where}  broken link {link}", flush=True)
            failed.append(f"{where}: {link}")
    print(f"{len(failed)} failed, {passed} passed, {skipped} skipped ({len(files)} files, "
          f"{time.perf_counter() - t_all:.0f} s)")
    if failed:
        print("failed blocks: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
