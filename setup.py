"""ltcl_fused: fused Triton kernels and C++/CUDA extensions for long-tailed contrastive losses.

Nothing is compiled at install time: the C++/CUDA extension builds itself on first use (or with
``python -m ltcl_fused.ext build``); ``LTCL_BUILD_EXT=1 pip install .`` builds it ahead of time.
The top-level ``triton_kernels/`` folder installs as ``ltcl_fused.triton_kernels`` and ``csrc/``
ships as package data of ``ltcl_fused.csrc``.
"""
import os
import re

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SOURCE_GLOBS = ["*.cpp", "*.h", "*.hpp", "*.cu", "*.cuh", "*/*.cpp", "*/*.h", "*/*.hpp", "*/*.cu", "*/*.cuh",
                "*/*/*.cpp", "*/*/*.h", "*/*/*.cu", "*/*/*.cuh", "*.sh", "*/*.sh"]


HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """The version's one source is ltcl_fused/_version.py (read as text: importing the package needs torch)."""
    with open(os.path.join(HERE, "ltcl_fused", "_version.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme():
    path = os.path.join(HERE, "README.md")
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


class BuildPy(build_py):
    def run(self):
        super().run()
        if os.environ.get("LTCL_BUILD_EXT") == "1":  # optional ahead-of-time build of the extension
            import subprocess
            import sys
            subprocess.check_call([sys.executable, "-m", "ltcl_fused.ext", "build"], cwd=self.build_lib)


setup(
    name="ltcl_fused",
    version=read_version(),
    description="Fused, memory-efficient contrastive losses (SupCon, AFCL, BCL, ResCom, DCL/HCL/Bayesian, MTTV) "
                "for long-tailed data: Triton kernels and a C++/CUDA extension",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ltcl_fused", "ltcl_fused.*"]) + ["ltcl_fused.triton_kernels", "ltcl_fused.csrc"],
    package_dir={"ltcl_fused.triton_kernels": "triton_kernels", "ltcl_fused.csrc": "csrc"},
    package_data={"ltcl_fused": ["py.typed"], "ltcl_fused.csrc": SOURCE_GLOBS},
    include_package_data=False,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # the Triton kernels need Triton >= 3.3 and torch >= 2.6 (docs/triton.md); older ones: backend "triton" says why
        "triton": ["triton>=3.3", "torch>=2.6"],
        "ext": ["ninja"],
        "test": ["pytest>=7", "pytest-xdist", "pytorch-metric-learning>=2.0", "ninja", "triton>=3.3; platform_system=='Linux'"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        "bench": ["pytorch-metric-learning>=2.0", "matplotlib"],
    },
    cmdclass={"build_py": BuildPy},
)
