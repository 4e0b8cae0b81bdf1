#!/usr/bin/env python3
"""Re-execute notebooks in place and store their outputs, ready to commit.

For each notebook given on the command line:

1. run every cell top to bottom with nbclient, in a fresh `python3` kernel of the
   interpreter running this script (the project venv), with the notebook's own
   folder (nbs/) as working directory and a 300 s timeout per cell;
2. clean it like `nbdev_clean` (settings.ini: cell ids, metadata, addresses);
3. renumber the code cells 1..n (tools/renumber.py; nbval needs counts).

A notebook whose cell fails is left untouched on disk; the failing cell is named
(index, first source line) with its error.  A notebook that takes longer than the
budget (default 90 s wall, kernel start included) is written but reported as a
failure.  Exit status is 1 if any notebook failed, else 0.

Usage: python tools/execute_notebooks.py [--budget SECONDS] NOTEBOOK.ipynb [...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from renumber import nb_to_str, renumber_nb  # noqa: E402

CELL_TIMEOUT_S = 300
# The numerics the stored outputs are computed with: the Makefile's global exports plus its
# notebook-target ones (nbval, notebooks). Set here too, so that running this script by
# hand stores what nbval will compare against (nbs/00_conventions.ipynb, "Seeds and threads").
NOTEBOOK_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "PYTHONHASHSEED": "0",
}
DEFAULT_BUDGET_S = 90.0
KERNEL = "python3"


class NotebookFailed(Exception):
    def __init__(self, *args):
        # NotebookFailed(message) or NotebookFailed(wall_seconds, message)
        self.wall = args[0] if len(args) == 2 else 0.0
        super().__init__(args[-1])


def _first_line(src: str) -> str:
    lines = [ln for ln in src.splitlines() if ln.strip() and not ln.lstrip().startswith("#|")]
    return (lines[0] if lines else src.splitlines()[0] if src else "").strip()[:80]


def _kernel_manager() -> KernelManager:
    """A KernelManager for `python3` that is guaranteed to use this interpreter."""
    km = KernelManager(kernel_name=KERNEL)
    argv = km.kernel_spec.argv
    if argv and argv[0] not in ("python", "python3", sys.executable):
        # a user/system-wide kernelspec pointing at another Python: use ours
        argv[0] = sys.executable
    return km


def clean_nb(nb: dict, repo_root: Path) -> dict:
    """Clean `nb` in place exactly as `nbdev_clean` would, using settings.ini."""
    from nbdev.clean import clean_nb as _clean
    from nbdev.config import get_config

    cfg = get_config(path=repo_root)
    _clean(
        nb,
        cfg.clear_all,
        (cfg.get("allowed_metadata_keys") or "").split(),
        (cfg.get("allowed_cell_metadata_keys") or "").split(),
        cfg.clean_ids,
    )
    return nb


def execute(path: Path, budget_s: float, repo_root: Path) -> float:
    """Execute, clean and renumber `path` in place; return the wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    # keep the notebook's kernelspec explicit, so that myst-nb finds the lexer
    nb.metadata["kernelspec"] = {"display_name": KERNEL, "language": "python", "name": KERNEL}

    current: dict = {}
    cell_times: list[tuple[float, int, str]] = []

    def on_cell_start(cell, cell_index):
        n_code = sum(c.cell_type == "code" for c in nb.cells[: cell_index + 1])
        current.update(index=f"{cell_index} (code cell {n_code}, In [{n_code}])",
                       source=cell.source, t0=time.perf_counter())

    def on_cell_executed(cell, cell_index, execute_reply):
        cell_times.append((time.perf_counter() - current["t0"], cell_index, _first_line(cell.source)))

    client = NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
        on_cell_start=on_cell_start,
        on_cell_executed=on_cell_executed,
    )
    t0 = time.perf_counter()
    try:
        # cleanup_kc: we passed our own KernelManager, so nbclient would otherwise
        # leave the kernel running after the notebook (one leaked kernel per notebook)
        client.execute(cleanup_kc=True)
    except (CellExecutionError, CellTimeoutError) as e:
        idx = current.get("index", "?")
        raise NotebookFailed(
            f"{path}: cell {idx} failed ({_first_line(current.get('source', ''))!r}):\n{e}"
        ) from None
    except Exception as e:  # kernel died, could not start, ...
        idx = current.get("index", "?")
        raise NotebookFailed(f"{path}: execution stopped at cell {idx}: {type(e).__name__}: {e}") from None
    wall = time.perf_counter() - t0

    out = renumber_nb(clean_nb(nbformat.from_dict(nb), repo_root))
    new = nb_to_str(out)
    if new != path.read_text(encoding="utf-8"):
        path.write_text(new, encoding="utf-8")

    slow = ", ".join(f"cell {i} {t:.1f} s" for t, i, _ in sorted(cell_times, reverse=True)[:3])
    print(f"{wall:7.1f} s  {path}   (slowest: {slow})", flush=True)
    if wall > budget_s:
        raise NotebookFailed(wall,
            f"{path}: took {wall:.1f} s, over the {budget_s:.0f} s budget (outputs were written; "
            f"slowest: {slow})"
        )
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="max wall seconds per notebook")
    args = ap.parse_args(argv)

    # same defaults as tests/conftest.py, so stored outputs match what nbval sees
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for name, value in NOTEBOOK_NUMERICS.items():
        if os.environ.get(name, value) != value:
            print(f"note: {name}={os.environ[name]} replaced by {value} for the notebooks", file=sys.stderr)
        os.environ[name] = value
    # The kernel inherits our environment, and ipykernel only selects the inline
    # matplotlib backend when MPLBACKEND is unset: MPLBACKEND=Agg (as the Makefile
    # exports) would silently drop every figure from the stored outputs.
    os.environ.pop("MPLBACKEND", None)
    repo_root = Path(__file__).resolve().parent.parent

    failures, total = [], 0.0
    for path in args.notebooks:
        if not path.exists():
            failures.append(f"{path}: no such notebook")
            continue
        try:
            total += execute(path, args.budget, repo_root)
        except NotebookFailed as e:
            failures.append(str(e))
            total += e.wall
            print(f"FAILED   {path}", file=sys.stderr, flush=True)
    print(f"{total:7.1f} s  total, {len(args.notebooks)} notebook(s), {len(failures)} failed")
    if failures:
        print("\n" + "=" * 70, file=sys.stderr)
        for f in failures:
            print(f"ERROR: {f}\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
