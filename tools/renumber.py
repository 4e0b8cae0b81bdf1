#!/usr/bin/env python3
"""Renumber code cells 1..n after `nbdev_clean` (which nulls every execution_count).

nbval treats a code cell with a null execution_count but stored outputs as an
"unrun reference cell" and fails it, so after cleaning every code cell gets its
position among the code cells as count again, as after "Restart & Run All".
Outputs are kept; `execute_result` outputs get the same count as their cell.
The file is written in nbdev's own format (sorted keys, indent 1, UTF-8, final
newline), so `nbdev_clean` followed by this script is idempotent.

Usage: python tools/renumber.py NOTEBOOK.ipynb [...]
"""
import json
import sys
from pathlib import Path


def nb_to_str(nb: dict) -> str:
    """Serialise like nbdev/execnb's `nb2str`."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def renumber_nb(nb: dict) -> dict:
    """Set execution counts 1..n on the code cells of `nb` (in place) and return it."""
    n = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        n += 1
        cell["execution_count"] = n
        for out in cell.get("outputs", []):
            if out.get("output_type") == "execute_result":
                out["execution_count"] = n
    return nb


def renumber(path: str | Path) -> bool:
    """Renumber one notebook file in place; return True if the file changed."""
    path = Path(path)
    old = path.read_text(encoding="utf-8")
    new = nb_to_str(renumber_nb(json.loads(old)))
    if new == old:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for path in argv:
        if renumber(path):
            print(f"renumbered {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
