"""Sphinx extension: render nbdev notebooks without nbdev's `#|` noise.

myst-nb 1.x turns each notebook code cell into

    container(nb_element="cell_code", cell_index=i, cell_metadata={...})
      container(nb_element="cell_code_source")   # absent with remove-input
        literal_block                              # the cell source
      container(nb_element="cell_code_output")   # absent without outputs

On `doctree-read` (after parsing, before the doctree is pickled and indexed for
search) this extension, on every page that has such cells:

* removes cells whose only directive-free content is nothing, i.e. a bare
  `#| default_exp X` cell, and cells marked `#| hide` (or Quarto's
  `#| include: false`); honours `#| echo: false` / `#| output: false`;
* strips the leading `#| ...` directive lines from the shown source;
* puts a small label "exported to `lib.mod`" above the code of cells with
  `#| export` / `#| exports` / `#| exporti` (with nbdev 2's optional module
  argument, `#| export other.mod`);
* folds the private helpers of a cell of definitions (functions and classes
  whose names start with `_`, and `_CONSTANTS` beside them) into closed
  `<details>` whose summaries name them, so that a chapter's first screen is
  its prose and the code that computes it, not argument checking;
* adds once, below the page title, "This chapter exports `lib.a`, `lib.b`."
  with every module of the notebook (default_exp + export overrides), read from
  the notebook file itself so that cells removed by tags still count.

Configuration (conf.py / jupyter-book `sphinx: config:`):
    nbdev_lib_name   package name prefixed to modules; default: `lib_name`
                     from the nearest settings.ini above the source dir, else "".
"""
from __future__ import annotations

import ast
import configparser
import html
import json
import re
from pathlib import Path

from docutils import nodes

__version__ = "0.1.0"

# nbdev 2: a directive is a leading line `#| name args`, spaces allowed around `|`
_DIRECTIVE = re.compile(r"^\s*#\s*\|(.*)$")
_MAGIC = re.compile(r"^\s*%%\w+")
EXPORT_DIRECTIVES = ("export", "exports", "exporti")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def parse_directives(source: str) -> tuple[dict[str, list[str]], str]:
    """Split a cell source into its leading nbdev/Quarto directives and the code.

    Returns ({name: args}, code).  Like nbdev, directives are the lines before the
    first line that is neither blank, a `#|` line nor a `%%cell_magic`; magics
    and the code after them are kept.  `#| echo: false` gives {"echo": ["false"]}.
    """
    lines = source.splitlines()
    directives: dict[str, list[str]] = {}
    kept: list[str] = []
    i = 0
    for i, line in enumerate(lines):
        m = _DIRECTIVE.match(line)
        if m:
            text = m.group(1).strip()
            if text.endswith(":"):
                text = text[:-1]
            text = text.replace(":", ": ")
            parts = text.split()
            if parts:
                name, *args = parts
                directives[name.rstrip(":")] = args
            continue
        if not line.strip():
            continue
        if _MAGIC.match(line):
            kept.append(line)
            continue
        break
    else:
        i = len(lines)
    code = "\n".join(kept + lines[i:]).strip("\n")
    return directives, code


def _defined_names(node: ast.stmt) -> list[str] | None:
    # names a top-level statement defines; [] for imports and docstrings; None for anything else
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets] if all(isinstance(t, ast.Name) for t in targets) else None
    if isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
        return []
    return None


def private_segments(code: str) -> list[tuple[str, list[str]]] | None:
    """Split a cell's code into consecutive pieces `(text, names)`: `names` lists what a piece of private
    definitions defines (functions, classes and `_CONSTANTS`, all starting with `_`); `[]` marks a public piece.
    None when the cell defines no private function or class, or holds anything but definitions, imports and
    docstrings. A statement takes the comments and blank lines above it."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    named = [_defined_names(node) for node in tree.body]
    if not tree.body or any(names is None for names in named):
        return None
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name.startswith("_")
               for n in tree.body):
        return None
    lines = code.split("\n")
    cuts = [0] + [node.end_lineno for node in tree.body[:-1]] + [len(lines)]
    pieces: list[tuple[list[str], list[str]]] = []
    for i, names in enumerate(named):
        private = bool(names) and all(n.startswith("_") for n in names)
        block = lines[cuts[i]:cuts[i + 1]]
        if pieces and bool(pieces[-1][1]) == private:
            pieces[-1][0].extend(block)
            pieces[-1][1].extend(names if private else [])
        else:
            pieces.append((list(block), list(names) if private else []))
    return [("\n".join(block).strip("\n"), names) for block, names in pieces]


def _fold(src_box: nodes.Element, pieces: list[tuple[str, list[str]]]) -> None:
    """Replace the cell's code block by one block per piece, each private piece inside a closed `<details>` whose
    summary names what it defines (the "exported to" label stays above them all)."""
    literal = next(iter(src_box.findall(nodes.literal_block)))
    parent = literal.parent
    at = parent.index(literal)
    parent.remove(literal)
    group: list[nodes.Node] = []
    for text, names in pieces:
        block = literal.deepcopy()
        block.rawsource = text
        block.children = []
        block += nodes.Text(text)
        if names:
            summary = html.escape("private helpers: " + ", ".join(names))
            group += [nodes.raw("", f'<details class="nbdev-private"><summary>{summary}</summary>', format="html"),
                      block, nodes.raw("", "</details>", format="html")]
        else:
            group.append(block)
    for offset, node in enumerate(group):
        parent.insert(at + offset, node)


def _is_false(args: list[str]) -> bool:
    return bool(args) and args[0].lower() in ("false", "0", "no")


def _full_module(lib: str, mod: str) -> str:
    return f"{lib}.{mod}" if lib and not mod.startswith(lib + ".") and mod != lib else mod


def notebook_modules(sources: list[str], lib: str) -> list[str]:
    """Modules a notebook exports to, in order of first appearance."""
    default, mods = None, []
    for src in sources:
        d, _ = parse_directives(src)
        if "default_exp" in d and d["default_exp"]:
            default = d["default_exp"][0]
            mods.append(default)
        for name in EXPORT_DIRECTIVES:
            if name in d:
                mods.append(d[name][0] if d[name] else default)
    seen: list[str] = []
    for m in mods:
        if m and _full_module(lib, m) not in seen:
            seen.append(_full_module(lib, m))
    return seen


def _lib_name(app) -> str:
    if app.config.nbdev_lib_name:
        return app.config.nbdev_lib_name
    for folder in [Path(app.srcdir), *Path(app.srcdir).parents]:
        ini = folder / "settings.ini"
        if ini.is_file():
            cp = configparser.ConfigParser()
            cp.read(ini, encoding="utf-8")
            return cp["DEFAULT"].get("lib_name", "")
    return ""


def _notebook_sources(app, docname: str) -> list[str] | None:
    """Sources of all cells of the page's .ipynb file, or None if not an .ipynb."""
    path = Path(app.env.doc2path(docname))
    if path.suffix != ".ipynb" or not path.is_file():
        return None
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [
        "".join(c["source"]) if isinstance(c.get("source"), list) else c.get("source", "")
        for c in nb.get("cells", [])
    ]


def _child(node: nodes.Element, element: str) -> nodes.Element | None:
    for c in node.children:
        if isinstance(c, nodes.Element) and c.get("nb_element") == element:
            return c
    return None


def _code_label(text: str, module: str, suffix: str = "") -> nodes.paragraph:
    para = nodes.paragraph("", "", classes=["nbdev-export-label"])
    para += nodes.Text(text)
    para += nodes.literal(module, module)
    if suffix:
        para += nodes.Text(suffix)
    return para


def _exports_note(modules: list[str]) -> nodes.container:
    note = nodes.container(classes=["nbdev-exports"])
    para = nodes.paragraph()
    para += nodes.Text("This chapter exports ")
    for i, m in enumerate(modules):
        if i:
            para += nodes.Text(" and " if i == len(modules) - 1 else ", ")
        para += nodes.literal(m, m)
    para += nodes.Text(".")
    note += para
    return note


def process_doctree(app, doctree: nodes.document) -> None:
    cells = [
        n for n in doctree.findall(nodes.container) if n.get("nb_element") == "cell_code"
    ]
    if not cells:
        return
    lib = _lib_name(app)
    sources = _notebook_sources(app, app.env.docname)

    def source_of(cell: nodes.Element) -> str:
        src_box = _child(cell, "cell_code_source")
        lits = list(src_box.findall(nodes.literal_block)) if src_box is not None else []
        if lits:
            return lits[0].astext()
        idx = cell.get("cell_index")
        if sources is not None and isinstance(idx, int) and 0 <= idx < len(sources):
            return sources[idx]
        return ""

    modules = notebook_modules(
        sources if sources is not None else [source_of(c) for c in cells], lib
    )
    default = None
    for src in sources if sources is not None else [source_of(c) for c in cells]:
        d, _ = parse_directives(src)
        if d.get("default_exp"):
            default = d["default_exp"][0]
            break

    for cell in cells:
        directives, code = parse_directives(source_of(cell))
        if not directives:
            continue
        src_box = _child(cell, "cell_code_source")
        out_box = _child(cell, "cell_code_output")
        if "hide" in directives or _is_false(directives.get("include", [])):
            cell.parent.remove(cell)
            continue
        if _is_false(directives.get("output", [])) and out_box is not None:
            cell.remove(out_box)
            out_box = None
        if _is_false(directives.get("echo", [])) and src_box is not None:
            cell.remove(src_box)
            src_box = None
        if src_box is not None:
            if code:
                for lit in src_box.findall(nodes.literal_block):
                    lit.rawsource = code
                    lit.children = []
                    lit += nodes.Text(code)
                    break
                exp = next((n for n in EXPORT_DIRECTIVES if n in directives), None)
                if exp is not None:
                    args = directives[exp]
                    target = args[0] if args else default
                    if target:
                        suffix = " (internal, not in __all__)" if exp == "exporti" else ""
                        src_box.insert(0, _code_label("exported to ", _full_module(lib, target), suffix))
            else:
                cell.remove(src_box)
        if not any(
            isinstance(c, nodes.Element) and c.get("nb_element") in ("cell_code_source", "cell_code_output")
            for c in cell.children
        ):
            cell.parent.remove(cell)

    for cell in [n for n in doctree.findall(nodes.container) if n.get("nb_element") == "cell_code"]:
        src_box = _child(cell, "cell_code_source")
        pieces = private_segments(parse_directives(source_of(cell))[1]) if src_box is not None else None
        if pieces:
            _fold(src_box, pieces)

    if modules:
        note = _exports_note(modules)
        section = next(iter(doctree.findall(nodes.section)), None)
        if section is not None:
            pos = 1 if section.children and isinstance(section[0], nodes.title) else 0
            section.insert(pos, note)
        else:
            doctree.insert(0, note)


def _add_static(app, config) -> None:
    config.html_static_path.append(str(STATIC_DIR))


def setup(app):
    app.add_config_value("nbdev_lib_name", "", "env")
    app.connect("config-inited", _add_static)
    app.connect("doctree-read", process_doctree)
    app.add_css_file("nbdev_cells.css")
    return {"version": __version__, "parallel_read_safe": True, "parallel_write_safe": True}
