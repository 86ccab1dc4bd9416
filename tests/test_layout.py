"""The house: ``training/``'s rooms import only the rooms listed above them in ``training/__init__.py``, and
no module of the project imports itself back through another (no import circle)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ["models", "data", "evaluate", "pretrain", "headless", "toyworld"]  # training/__init__.py's order


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("training", "datencoder_core")}


def _graph() -> dict[str, set[str]]:
    files = [*REPO.glob("training/**/*.py"), *REPO.glob("datencoder_core/*.py")]
    modules = {_module_name(f): f for f in files}
    return {name: {i for i in _imports(f) if i in modules and i != name and not name.startswith(i + ".")}
            for name, f in modules.items()}


def test_rooms_import_only_the_rooms_above_them():
    wrong = []
    for name, imported in _graph().items():
        parts = name.split(".")
        if parts[0] != "training" or len(parts) < 3 or parts[1] not in ROOMS:
            continue  # the commands at training/'s top may use every room
        allowed = set(ROOMS[:ROOMS.index(parts[1]) + 1])
        wrong += [f"{name} -> {i}" for i in imported
                  if i.startswith("training.") and i.split(".")[1] not in allowed]
    assert not wrong, wrong


def test_no_import_circle():
    graph, circles = _graph(), []

    def visit(name, path):
        if name in path:
            circles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for nxt in sorted(graph[name]):
            visit(nxt, path + [name])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [])
    assert not circles, circles


def test_a_broken_house_fails_these_checks(tmp_path, monkeypatch):
    """The control: the import that issue 25 removed (loading -> toyworld) is found by both checks."""
    graph = _graph()
    graph["training.models.loading"].add("training.toyworld.models")
    monkeypatch.setitem(globals(), "_graph", lambda: graph)
    for check in (test_rooms_import_only_the_rooms_above_them, test_no_import_circle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed a house with loading -> toyworld")
