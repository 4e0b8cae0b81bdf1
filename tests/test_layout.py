"""The package's shape (chapter *Conventions*; design: two layers). Reads every module's imports with `ast` and fails
on a cycle, on a library module importing `simbook.experiments`, on `simbook.utils` importing anything of simbook,
on `optim` / `attribution` importing more than `utils`, and on any import that points up the layer order."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "simbook"

# Layer of each module (by dotted-name prefix; the longest prefix wins). A module may import modules of lower
# layers, and of its own layer when that makes no cycle. New modules must be placed here.
LAYERS = {
    "simbook.utils": 0,
    "simbook.optim": 1, "simbook.attribution": 1, "simbook.text": 1, "simbook.attention": 1,
    "simbook.training": 2, "simbook.models": 2,
    "simbook.seq2seq": 3, "simbook.decoding": 3, "simbook.graph_decoding": 3, "simbook.recurrent": 3,
    "simbook.simbert": 4, "simbook.search": 4, "simbook.dialogue": 4,
    "simbook.experiments": 5,
    "simbook.cli": 6,
}
ONLY = {"simbook.utils": set(), "simbook.optim": {"simbook.utils"}, "simbook.attribution": {"simbook.utils"}}
SKIP = {"simbook._modidx", "simbook"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def simbook_imports(path: Path) -> set[str]:
    """Every simbook module `path` imports, at top level or inside functions (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "simbook"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "simbook":
                continue
            # `from simbook.x import y` may name a submodule y
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return {m for m in found if m != name and m not in SKIP}


def _exists(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(name: str) -> tuple[str, int]:
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    if not prefixes:
        raise KeyError(name)
    best = max(prefixes, key=len)
    return best, LAYERS[best]


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) not in SKIP}
GRAPH = {name: simbook_imports(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    missing = [name for name in MODULES if not any(name == p or name.startswith(p + ".") for p in LAYERS)]
    assert not missing, f"place these modules in tests/test_layout.py LAYERS: {missing}"


def check_module(name: str, graph: dict[str, set[str]]) -> None:
    own_prefix, own = layer(name)
    for target in sorted(graph[name]):
        prefix, other = layer(target)
        assert other <= own, f"{name} (layer {own}) imports {target} (layer {other}): an upward arrow"
        if not name.startswith("simbook.experiments") and name != "simbook.cli":
            assert not target.startswith("simbook.experiments"), f"library module {name} imports {target}"
        if own_prefix in ONLY:
            assert prefix in ONLY[own_prefix], f"{name} may import only {sorted(ONLY[own_prefix]) or 'nothing'} " \
                                               f"of simbook, imports {target}"


def check_no_cycles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if state.get(target) is None:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    check_module(name, GRAPH)


def test_no_cycles():
    check_no_cycles(GRAPH)


@pytest.mark.parametrize("graph, name, message", [
    ({"simbook.decoding": {"simbook.experiments.decoding"}}, "simbook.decoding", "upward arrow"),
    ({"simbook.utils": {"simbook.text"}}, "simbook.utils", "upward arrow"),
    ({"simbook.optim.mgs": {"simbook.text"}}, "simbook.optim.mgs", "may import only"),
    ({"simbook.models.gpt": {"simbook.decoding"}}, "simbook.models.gpt", "upward arrow"),
])
def test_the_checker_refuses_a_bad_layout(graph, name, message):
    """The rules fail on the mistakes they exist for (a checker that cannot fail proves nothing)."""
    with pytest.raises(AssertionError, match=message):
        check_module(name, graph)


def test_the_checker_finds_a_cycle():
    with pytest.raises(AssertionError, match="import cycle: simbook.models.bert -> simbook.models.gpt -> "
                                             "simbook.models.bert"):
        check_no_cycles({"simbook.models.bert": {"simbook.models.gpt"}, "simbook.models.gpt": {"simbook.models.bert"}})
