"""The package's imports run one way (data -> ... -> pipeline -> commands -> cli), with no cycle, lazy imports
inside functions included: a newcomer can read the layers bottom-up and add to one without touching those above."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rose_pl"

LAYERS = [
    {"rose_pl.errors", "rose_pl.registry", "rose_pl.files", "rose_pl.layout", "rose_pl.config", "rose_pl.configfile"},
    {"rose_pl.hub", "rose_pl.testing", "rose_pl.console", "rose_pl.progress"},
    {"rose_pl.data"},
    {"rose_pl.training"},
    {"rose_pl.features"},
    {"rose_pl.selection"},
    {"rose_pl.evaluation"},
    {"rose_pl.pipeline"},
    {"rose_pl.commands"},
    {"rose_pl.cli"},
    {"rose_pl.__main__"},
]
"""Bottom to top; a module may import its own layer's modules and the layers below it, never those above."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every rose_pl module `path` imports, at any depth of its code (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("rose_pl"):
                while name not in known and "." in name:  # `from rose_pl.x import y`: y may be a name, not a module
                    name = name.rsplit(".", 1)[0]
                if name in known:
                    found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def layer(name: str) -> int:
    for i, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{name} belongs to no layer of this test: add it to LAYERS")


def test_every_module_belongs_to_a_layer():
    for name in modules():
        if name != "rose_pl":
            layer(name)


def test_imports_only_go_down_the_layers():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, targets in graph().items() if a != "rose_pl" for b in targets if b != "rose_pl" and layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_the_package_has_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_nothing_imports_the_command_line():
    users = {a for a, targets in graph().items() if targets & {"rose_pl.cli", "rose_pl.commands"}}
    assert users <= {"rose_pl.cli", "rose_pl.__main__"}, users


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: a two-module cycle is found."""
    edges = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(__import__(__name__), "graph", lambda: edges)
    try:
        test_the_package_has_no_import_cycle()
    except AssertionError as e:
        assert "a -> b -> a" in str(e)
    else:
        raise AssertionError("the cycle a -> b -> a was not found")
