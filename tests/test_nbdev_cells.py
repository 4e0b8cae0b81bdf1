"""Tests for the book's Sphinx extension book/_ext/nbdev_cells.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXT_DIR = ROOT / "book" / "_ext"
sys.path.insert(0, str(EXT_DIR))
from nbdev_cells import notebook_modules, parse_directives, private_segments  # noqa: E402

JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"


@pytest.mark.parametrize(
    "source, directives, code",
    [
        ("#| default_exp attention.masks", {"default_exp": ["attention.masks"]}, ""),
        ("#| export\ndef f(): pass", {"export": []}, "def f(): pass"),
        ("#|export other.mod\n\nx = 1\n", {"export": ["other.mod"]}, "x = 1"),
        ("# | hide\n#| echo: false\nprint(1)", {"hide": [], "echo": ["false"]}, "print(1)"),
        ("#| echo:false\ny = 2", {"echo": ["false"]}, "y = 2"),
        ("x = 1\n#| export", {}, "x = 1\n#| export"),  # only leading lines are directives
        ("#| exporti\n%%time\nz = 3", {"exporti": []}, "%%time\nz = 3"),
        ("", {}, ""),
        ("# a comment\nx = 1", {}, "# a comment\nx = 1"),
    ],
)
def test_parse_directives(source, directives, code):
    assert parse_directives(source) == (directives, code)


def test_notebook_modules():
    sources = [
        "#| default_exp attention.masks",
        "#| export\ndef f(): pass",
        "#| export attention.softmax\ndef g(): pass",
        "#| exporti\n_h = 1",
        "plain = 1",
    ]
    assert notebook_modules(sources, "simbook") == ["simbook.attention.masks", "simbook.attention.softmax"]
    assert notebook_modules(["x = 1"], "simbook") == []


def _code(src, outputs=(), tags=()):
    return {
        "cell_type": "code", "execution_count": None, "id": f"c{abs(hash(src)) % 10**8}",
        "metadata": {"tags": list(tags)} if tags else {}, "outputs": list(outputs), "source": src,
    }


def _stream(text):
    return {"name": "stdout", "output_type": "stream", "text": text}


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """Build a one-notebook Jupyter Book with the extension; return the page's HTML."""
    src = tmp_path_factory.mktemp("tinybook")
    cells = [
        _code("#| default_exp mymod"),
        {"cell_type": "markdown", "id": "m1", "metadata": {}, "source": "# Tiny chapter\n\nSome text."},
        _code("#| hide\nprint('HIDDEN-SOURCE')", [_stream("HIDDEN-OUTPUT\n")]),
        _code("#| export\ndef exported_fn(x):\n    return x", []),
        _code("#| export other.mod\ndef other_fn(x):\n    return x"),
        _code("#|exporti\n_internal_thing = 1"),
        _code("#| export\ndef input_removed(): pass", tags=["remove-input"]),
        _code("#| export third.mod\ndef removed_cell(): pass", tags=["remove-cell"]),
        _code("print('PLAIN-SOURCE')", [_stream("PLAIN-OUTPUT\n")]),
        _code("#| echo: false\nprint('ECHO-SOURCE')", [_stream("ECHO-OUTPUT\n")]),
        _code("#| export\n"),  # nothing left after the directive: dropped
        _code("#| export\ndef _check_helper(x):\n    return x\n\n\ndef visible_fn(x):\n    return _check_helper(x)"),
    ]
    nb = {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    (src / "chapter.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    (src / "intro.md").write_text("# Tiny book\n\nIntro.\n", encoding="utf-8")
    (src / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n- file: chapter\n", encoding="utf-8")
    (src / "_config.yml").write_text(
        "title: tiny\n"
        "only_build_toc_files: true\n"
        "execute:\n  execute_notebooks: 'off'\n"
        "sphinx:\n"
        f"  local_extensions:\n    nbdev_cells: {EXT_DIR}\n"
        "  config:\n    nbdev_lib_name: mylib\n",
        encoding="utf-8",
    )
    r = subprocess.run(
        [str(JUPYTER_BOOK), "build", str(src), "-W", "--all"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    html_dir = src / "_build" / "html"
    return (html_dir / "chapter.html").read_text(encoding="utf-8"), html_dir


def test_directives_are_gone(tiny_site):
    html, _ = tiny_site
    assert "#|" not in html
    assert "# |" not in html
    assert "default_exp" not in html


def test_hidden_cells_are_removed(tiny_site):
    html, _ = tiny_site
    assert "HIDDEN-SOURCE" not in html and "HIDDEN-OUTPUT" not in html
    assert "removed_cell" not in html


def test_plain_and_echo_cells(tiny_site):
    html, _ = tiny_site
    assert "PLAIN-SOURCE" in html and "PLAIN-OUTPUT" in html
    assert "ECHO-SOURCE" not in html and "ECHO-OUTPUT" in html


def _literal(text):
    return f'<span class="pre">{text}</span>'


def test_exports_note_once_with_all_modules(tiny_site):
    html, _ = tiny_site
    assert html.count("This chapter exports") == 1
    note = html[html.index("This chapter exports"):]
    note = note[: note.index("</p>")]
    # every module, including one only named in a remove-cell cell
    for mod in ("mylib.mymod", "mylib.other.mod", "mylib.third.mod"):
        assert _literal(mod) in note
    # placed right below the page title
    assert html.index("Tiny chapter") < html.index("This chapter exports") < html.index("Some text.")


def test_export_labels(tiny_site):
    html, _ = tiny_site
    assert html.count('class="nbdev-export-label"') == 4  # export, export other.mod, exporti, the helper cell
    label = 'exported to <code class="docutils literal notranslate">'
    assert html.index(label + _literal("mylib.mymod")) < html.index("exported_fn")
    assert html.index(label + _literal("mylib.other.mod")) < html.index("other_fn")
    assert "(internal, not in __all__)" in html
    assert "input_removed" not in html


def test_search_index_has_no_directives(tiny_site):
    _, html_dir = tiny_site
    index = (html_dir / "searchindex.js").read_text(encoding="utf-8")
    assert "default_exp" not in index and "hidden" not in index.lower()
    assert (html_dir / "_static" / "nbdev_cells.css").is_file()



def test_private_helpers_are_folded(tiny_site):
    """The private helper of a cell sits in a closed <details> named after it; the public code beside it stays open."""
    html, _ = tiny_site
    assert html.count('<details class="nbdev-private">') == 1
    folded = html[html.index('<details class="nbdev-private">'):]
    folded = folded[:folded.index("</details>")]
    assert "<summary>private helpers: _check_helper</summary>" in folded and "visible_fn" not in folded
    assert html.index("</details>") < html.index("visible_fn")
    assert "_internal_thing" not in folded                     # a private constant alone is not a helper


@pytest.mark.parametrize("code, expected", [
    ("def _a(): pass\n\n\ndef b(): pass", [["_a"], []]),
    ("import x\n\n# why\n@deco\ndef _a():\n    return 1\n_T = 2\n\nclass B: pass", [[], ["_a", "_T"], []]),
    ("def b(): pass", None),                                   # nothing private
    ("_T = 1", None),                                          # a private constant alone
    ("def _a(): pass\nprint(_a())", None),                    # not only definitions
    ("def _a(:", None),                                        # not Python
])
def test_private_segments(code, expected):
    pieces = private_segments(code)
    if expected is None:
        assert pieces is None
        return
    assert [names for _, names in pieces] == expected
    assert "\n".join(text for text, _ in pieces).split() == code.split()    # nothing lost, nothing added
