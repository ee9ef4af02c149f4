"""Every code block of README.md and docs/*.md runs (scripts/run_doc_blocks.py), and the runner itself fails
when a block fails, skips what the convention says to skip and insists on a reason for `# not run:`."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "scripts", "run_doc_blocks.py")


def _run(*args, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, RUNNER, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_every_doc_block_runs():
    p = _run()
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert p.stdout.splitlines()[-1].startswith("0 failed, ")
    ran = sum(1 for ln in p.stdout.splitlines() if ln.startswith("ok  "))
    assert ran >= 8, p.stdout  # the README quick start, the PML swap, the module, ResCom, SSL, ... examples


def _write(tmp_path, text, name="README.md"):
    (tmp_path / "docs").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_runner_fails_on_a_failing_block_and_names_it(tmp_path):
    _write(tmp_path, "# t\n\n```python\nprint('fine')\n```\n\ntext\n\n```python\nraise SystemExit('boom')\n```\n")
    p = _run("--root", str(tmp_path), timeout=120)
    assert p.returncode == 1
    assert "ok    README.md:3" in p.stdout and "FAIL  README.md:9" in p.stdout and "boom" in p.stdout
    assert "1 failed, 1 passed, 0 skipped" in p.stdout


def test_runner_follows_the_convention(tmp_path):
    _write(tmp_path, "# t\n"
           "```python\n# not run: needs a GPU\nraise SystemExit(1)\n```\n"
           "```bash\nexit 1\n```\n"
           "```sh\n# run\ntest \"$(pwd)\" = \"$ROOT_EXPECTED\" && python -c 'import sys; sys.exit(0)'\n```\n"
           "```text\nexit 1\n```\n"
           "```\nnot code\n```\n"
           "  ```python\n  import os\n  assert os.environ['CUDA_VISIBLE_DEVICES'] == ''\n  ```\n")
    _write(tmp_path, "```py\nimport os; assert os.getcwd() == os.environ['ROOT_EXPECTED']\n```\n", "docs/page.md")
    env_root = str(tmp_path.resolve())
    p = subprocess.run([sys.executable, RUNNER, "--root", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "ROOT_EXPECTED": env_root})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 failed, 3 passed, 4 skipped (2 files" in p.stdout, p.stdout
    assert "skip  README.md:2  not run: needs a GPU" in p.stdout


def test_not_run_needs_a_reason(tmp_path):
    _write(tmp_path, "```python\n# not run\nprint(1)\n```\n")
    p = _run("--root", str(tmp_path), timeout=60)
    assert p.returncode == 1 and "needs a reason" in p.stdout


def test_unclosed_fence_is_an_error(tmp_path):
    _write(tmp_path, "```python\nprint(1)\n")
    p = _run("--root", str(tmp_path), timeout=60)
    assert p.returncode != 0 and "unclosed code fence" in (p.stdout + p.stderr)


def test_broken_links_fail(tmp_path):
    _write(tmp_path, "# Top\n\n## A section\n\n[ok](#a-section) [ok](docs/page.md#page) [bad](docs/nope.md) "
                     "[bad anchor](#nowhere) [web](https://example.org/x)\n")
    _write(tmp_path, "# Page\n", "docs/page.md")
    p = _run("--root", str(tmp_path), timeout=60)
    assert p.returncode == 1
    assert "broken link docs/nope.md (no such file)" in p.stdout and "broken link #nowhere (no such heading)" in p.stdout
    assert "2 failed" in p.stdout
