#!/usr/bin/env python3
"""Read and write notebooks in the repository's stored format (what nbdev_clean and tools/renumber.py write):
sources as one string, keys sorted, indent 1. For scripted edits of notebooks:

    from nbcells import load, save, code, markdown
    nb = load("nbs/08_decoding.ipynb"); nb["cells"].insert(3, markdown("## A section")); save(nb, path)

`python tools/nbcells.py NOTEBOOK` lists the cells (index, id, type, first line).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from renumber import nb_to_str  # noqa: E402


def load(path) -> dict:
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
    return nb


def save(nb: dict, path) -> None:
    Path(path).write_text(nb_to_str(nb), encoding="utf-8")


_issued: set[str] = set()


def _new_id(nb: dict | None) -> str:
    # unique within `nb` and among the ids this process has handed out (cells made before they are inserted)
    used = ({c.get("id") for c in nb["cells"]} if nb else set()) | _issued
    n = 1
    while f"c{n:03d}" in used:
        n += 1
    _issued.add(f"c{n:03d}")
    return f"c{n:03d}"


def code(source: str, nb: dict | None = None) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": _new_id(nb), "metadata": {}, "outputs": [],
            "source": source}


def markdown(source: str, nb: dict | None = None) -> dict:
    return {"cell_type": "markdown", "id": _new_id(nb), "metadata": {}, "source": source}


if __name__ == "__main__":
    for i, cell in enumerate(load(sys.argv[1])["cells"]):
        first = next((ln for ln in cell["source"].splitlines() if ln.strip()), "")
        print(f"{i:3d} {cell.get('id', '-'):>6} {cell['cell_type'][:4]:4} {first[:100]}")
