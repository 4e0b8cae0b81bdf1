"""pytest set-up shared by the unit tests (tests/) and the nbval notebook runs (nbs/).

It lives at the repository root because pytest loads a conftest.py only from the
rootdir and the folders of the collected paths: tests/conftest.py would not be
loaded by `pytest nbs`, and its environment would not reach nbval's kernels.
"""
import os
import sys
from pathlib import Path

# Triton kernels only run on CPU through the interpreter, and the variable is read
# when `@triton.jit` runs, so set it before any module defines a kernel.  Kernels
# started by nbval inherit os.environ, so the notebooks see it too.
os.environ.setdefault("TRITON_INTERPRET", "1")

# nbval's Jupyter kernels inherit os.environ, and ipykernel selects the inline
# matplotlib backend only when MPLBACKEND is unset: with MPLBACKEND=Agg (exported
# by the Makefile) every figure would vanish from the notebooks' outputs.  Keep
# Agg for this (headless) test process only.
if os.environ.pop("MPLBACKEND", None):
    import matplotlib

    matplotlib.use("Agg")

# Stored notebook outputs are compared as text with numbers allowed to move by
# floating-point noise: another CPU model adds some sums in another order
# (tests/nbval_numbers.py says how much may change and why).
sys.path.insert(0, str(Path(__file__).parent / "tests"))
pytest_plugins = ["nbval_numbers"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped elsewhere (benchmarks/gpu.sh runs them)")
