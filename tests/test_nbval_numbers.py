"""The notebook-output comparison that tolerates floating-point noise (tests/nbval_numbers.py)."""
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbval_numbers import last_place, numbers_agree, texts_agree

# Pairs printed by the same cells on two CPU models (the second from a CI machine).
SEEN_ACROSS_MACHINES = [
    ("simbert_loss 8.877880 = generation 7.779695 + similarity 1.098186\n",
     "simbert_loss 8.877878 = generation 7.779695 + similarity 1.098184\n"),
    ("max |pair [CLS] vector - encoded alone|: 4.5e-08\n", "max |pair [CLS] vector - encoded alone|: 3.0e-08\n"),
    ("generation  first 20 steps 5.482 -> last 20 3.735\nsimilarity  first 20 steps 0.049 -> last 20 0.033\n",
     "generation  first 20 steps 5.482 -> last 20 3.733\nsimilarity  first 20 steps 0.049 -> last 20 0.035\n"),
]


@pytest.mark.parametrize("stored, fresh", SEEN_ACROSS_MACHINES)
def test_noise_from_another_cpu_agrees(stored, fresh):
    assert texts_agree(stored, fresh)


@pytest.mark.parametrize("stored, fresh", [
    ("top-1 accuracy 0.912", "top-1 accuracy 0.812"),        # a real change of a result
    ("reaches 0.5 at step 75", "reaches 0.5 at step 100"),
    ("loss 3.735", "loss 3.635"),
    ("loss 3.735", "gain 3.735"),                            # words must match exactly
    ("seeds: 0 1 2", "seeds: 0 1"),                          # and so must the count of numbers
    ("difference 2.0e-03", "difference 4.0e-03"),            # not negligible: above 1e-6
])
def test_real_changes_disagree(stored, fresh):
    assert not texts_agree(stored, fresh)


def test_last_place():
    assert last_place("3.735") == pytest.approx(1e-3)
    assert last_place("4.5e-08") == pytest.approx(1e-9)
    assert last_place("75") == 1
    assert last_place("-2.") == 1
    assert last_place(".25") == pytest.approx(1e-2)


@given(st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 6))
def test_a_number_agrees_with_itself_and_its_neighbours(x, decimals):
    text = f"{x:.{decimals}f}"
    assert texts_agree(f"value {text} units", f"value {text} units")
    step = 10.0 ** -decimals
    for neighbour in (float(text) + step, float(text) - step):
        assert numbers_agree(text, f"{neighbour:.{decimals}f}")


@given(st.floats(1e-3, 1e6), st.integers(0, 6))
def test_a_number_five_percent_away_disagrees(x, decimals):
    text, moved = f"{x:.{decimals}f}", f"{x * 1.05:.{decimals}f}"
    # Only where the 5% move is more than three printed units is it visible at this precision.
    if abs(float(moved) - float(text)) > 3 * 10.0 ** -decimals:
        assert not numbers_agree(text, moved)


def _notebook(path: Path, source: str, stored_text: str) -> None:
    cell = nbformat.v4.new_code_cell(source, execution_count=1, outputs=[nbformat.v4.new_output("stream", name="stdout", text=stored_text)])
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)


def test_nbval_uses_the_tolerance(tmp_path):
    """nbval itself, with this plugin: noise passes, a changed word or a changed result fails."""
    _notebook(tmp_path / "noise.ipynb", "print(f'loss {1/3:.6f}')", "loss 0.333334\n")
    _notebook(tmp_path / "word.ipynb", "print(f'loss {1/3:.6f}')", "gain 0.333333\n")
    _notebook(tmp_path / "result.ipynb", "print(f'loss {1/3:.6f}')", "loss 0.343333\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "nbval_numbers", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
         "-o", "addopts=", "-rA", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    report = run.stdout
    assert "PASSED noise.ipynb::Cell 0" in report, report
    assert "FAILED word.ipynb::Cell 0" in report, report
    assert "FAILED result.ipynb::Cell 0" in report, report


def test_notebook_numerics_are_the_same_in_the_makefile_and_the_executor():
    """`make nbval` compares with the numerics that tools/execute_notebooks.py stored the outputs with."""
    import re as _re

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tools"))
    from execute_notebooks import NOTEBOOK_NUMERICS

    makefile = (root / "Makefile").read_text()
    exported = dict(_re.findall(r"^export (\w+) := (\S+)$", makefile, _re.M))
    exported.update(_re.findall(r"^nbval notebooks book-exec: export (\w+) := (\S+)$", makefile, _re.M))
    assert {name: exported.get(name) for name in NOTEBOOK_NUMERICS} == NOTEBOOK_NUMERICS
