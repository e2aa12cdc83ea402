"""The layers, read from the code's imports (every import statement, lazy ones included):
defense/ (pure PyTorch) <- deploy/ (Ray Train) <- federated/ (Flower, the front door);
tuning/ (Ray Tune) <- deploy/, defense/. No import cycle between the project's files."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("defense", "deploy", "federated", "tuning", "benchmarks")
# what each layer may import, of the project's packages and of the heavy frameworks
ALLOWED = {
    "defense": {"defense"},
    "deploy": {"defense", "deploy", "ray"},
    "tuning": {"defense", "deploy", "tuning", "ray"},
    "federated": {"defense", "deploy", "federated", "ray", "flwr"},
    "benchmarks": {"defense", "deploy", "federated", "tuning", "benchmarks", "ray", "flwr"},
}
WATCHED = set(PACKAGES) | {"ray", "flwr"}


def project_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports included);
    `from a.b import c` names a.b.c as well, in case c is a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def file_of(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def graph() -> dict[Path, set[Path]]:
    edges = {}
    for path in project_files():
        targets = {file_of(m) for m in imported_modules(path) if m.split(".")[0] in PACKAGES}
        edges[path] = {t for t in targets if t is not None and t != path}
    return edges


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_points_down_the_layers(path):
    layer = path.relative_to(ROOT).parts[0]
    wrong = sorted(m for m in imported_modules(path)
                   if m.split(".")[0] in WATCHED and m.split(".")[0] not in ALLOWED[layer])
    assert not wrong, f"{path.relative_to(ROOT)} ({layer}/) imports {wrong}"


def test_no_import_cycle_between_files():
    edges = graph()
    state: dict[Path, int] = {}
    cycles = []

    def visit(node: Path, trail: list[Path]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target] if target in trail else [node, target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    named = [" -> ".join(str(p.relative_to(ROOT)) for p in cycle) for cycle in cycles]
    assert not named, "import cycles:\n" + "\n".join(named)


def test_the_checker_sees_a_planted_cycle_and_a_wrong_way_import(tmp_path, monkeypatch):
    """The rules above can fail: a planted defense/ -> federated/ import and a two-file cycle."""
    import sys

    rules = sys.modules[__name__]

    for package in ("defense", "federated"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "defense" / "a.py").write_text("def f():\n    from federated.b import g\n")
    (tmp_path / "federated" / "b.py").write_text("from defense.a import f\ng = 1\n")
    monkeypatch.setattr(rules, "ROOT", tmp_path)
    monkeypatch.setattr(rules, "PACKAGES", ("defense", "federated"))
    with pytest.raises(AssertionError, match="imports"):
        rules.test_every_import_points_down_the_layers(tmp_path / "defense" / "a.py")
    with pytest.raises(AssertionError, match="import cycles"):
        rules.test_no_import_cycle_between_files()
