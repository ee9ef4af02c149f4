"""Packaging: one version source, py.typed shipped, type hints on the public API, lazy ltcl_fused.distributed.
(scripts/check_wheel.sh, run by .ci/run, builds and installs the wheel itself.)"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import typing

import pytest

import ltcl_fused as lf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_has_one_source():
    with open(os.path.join(ROOT, "ltcl_fused", "_version.py")) as f:
        v = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    assert lf.__version__ == v
    p = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == v, p.stderr
    for path in ("setup.py", os.path.join("ltcl_fused", "__init__.py")):
        with open(os.path.join(ROOT, path)) as f:
            assert v not in f.read(), f"{path} repeats the version {v}"
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## {v}" in f.read()


def test_py_typed_is_package_data():
    assert os.path.isfile(os.path.join(ROOT, "ltcl_fused", "py.typed"))
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert '"ltcl_fused": ["py.typed"]' in f.read()


def _public_callables():
    import ltcl_fused.distributed as lfd
    import ltcl_fused.env as env
    from ltcl_fused.integrations import pml
    out = []
    for mod, names in ((lf, lf.__all__), (lfd, ["supcon", "afcl", "fcl", "acl", "bcl", "rescom"]),
                       (lf.nn, lf.nn.__all__), (pml, pml.__all__), (env, ["main", "collect", "cpu_vector_isa"])):
        for n in names:
            obj = getattr(mod, n)
            if inspect.isclass(obj):
                out += [(f"{mod.__name__}.{n}.{m}", getattr(obj, m)) for m in ("__init__", "forward", "enqueue", "keys")
                        if m in vars(obj)]
            elif inspect.isfunction(obj):
                out.append((f"{mod.__name__}.{n}", obj))
    return out


@pytest.mark.parametrize("name,fn", _public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_api_has_type_hints(name, fn):
    hints = typing.get_type_hints(fn)  # also checks that every annotation resolves
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    missing = [p.name for p in params if p.name not in hints]
    assert not missing, f"{name}: no annotation for {missing}"
    assert "return" in hints, f"{name}: no return annotation"


def test_import_does_not_load_distributed_but_the_attribute_works():
    code = ("import sys, time; import torch; t = time.perf_counter(); import ltcl_fused as lf; "
            "t1 = time.perf_counter(); assert 'ltcl_fused.distributed' not in sys.modules; "
            "f = lf.distributed.supcon; t2 = time.perf_counter(); "
            "assert 'ltcl_fused.distributed' in sys.modules and f is sys.modules['ltcl_fused.distributed'].supcon; "
            "from ltcl_fused.integrations import pml; assert callable(pml.SupConLoss); "
            "assert 'distributed' in dir(lf) and lf.integrations.pml is pml; "
            "print(f'import {1e3 * (t1 - t):.1f} ms, distributed {1e3 * (t2 - t1):.1f} ms')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    print(p.stdout)


def test_unknown_attribute_still_raises():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lf.nope  # noqa: B018
