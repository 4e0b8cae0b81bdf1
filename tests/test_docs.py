"""Every exported function and class says where the book derives it (like d2l's "Defined in")."""
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import simbook

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(simbook.__path__, "simbook.") if not m.name.endswith("_modidx"))


def _chapter_titles():
    titles = {}
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        first = "".join(cells[0]["source"])
        titles[nb.name] = re.match(r"#\s+(.+)", first).group(1).strip()
    return titles


def _exported_symbols():
    for name in MODULES:
        module = importlib.import_module(name)
        for symbol in getattr(module, "__all__", []):
            obj = getattr(module, symbol)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield name, symbol, obj


def test_modules_export_something():
    assert {"simbook.utils", "simbook.attention.masks", "simbook.models.transformer", "simbook.models.bert",
            "simbook.text", "simbook.seq2seq", "simbook.cli"} <= set(MODULES)


@pytest.mark.parametrize("module, symbol, obj", list(_exported_symbols()), ids=lambda x: x if isinstance(x, str) else "")
def test_docstring_names_its_chapter_section(module, symbol, obj):
    doc = inspect.getdoc(obj) or ""
    match = re.search(r"Defined in: \*(.+?)\*", doc)
    assert match, f"{module}.{symbol} has no 'Defined in: *chapter*' line"
    titles = {t.replace("`", "") for t in _chapter_titles().values()}
    assert match.group(1).replace("`", "") in titles, f"{module}.{symbol} names an unknown chapter {match.group(1)!r}"
    section = re.search(r'section "(.+?)"', doc)
    if section:                                       # the named section must exist as a heading of that chapter
        headings = []
        for nb in (ROOT / "nbs").glob("*.ipynb"):
            for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
                if cell["cell_type"] == "markdown":
                    headings += [h.strip() for h in re.findall(r"^#+\s+(.+)$", "".join(cell["source"]), re.M)]
        assert section.group(1) in headings, f"{module}.{symbol}: no section {section.group(1)!r} in the book"
