"""The package's shape: the core never imports the applications or the benchmarks, module-level
imports form a DAG, the wheel ships no benchmark code, files stay small."""
from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest
from setuptools import find_packages

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "gradstats"


_NAMES: set[str] = set()


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    _NAMES.update(out)
    return out


def _imports(name: str, path: pathlib.Path, module_level: bool) -> set[str]:
    """Modules ``name`` imports (absolute and relative), at module level only or anywhere."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if module_level and isinstance(node, ast.If):  # TYPE_CHECKING blocks are not imports
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # "from . import x" imports the submodule x, if it is one
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in _NAMES else mod)
        elif not module_level and isinstance(node, ast.Call) and getattr(
                node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return found


MODULES = _modules()


def _is_app(mod: str) -> bool:
    """The application layer: the commands, and the ``python -m gradstats`` entry point."""
    return mod in ("gradstats.apps", "gradstats.__main__") or mod.startswith("gradstats.apps.")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not _is_app(m)))
def test_the_core_never_imports_the_applications_or_benchmarks(name):
    """Not even lazily inside a function."""
    bad = [m for m in _imports(name, MODULES[name], module_level=False)
           if _is_app(m) or m == "benchmarks" or m.startswith("benchmarks.")]
    assert not bad, f"{name} imports {bad}"


def test_module_level_imports_form_a_dag():
    graph = {n: {m for m in _imports(n, p, module_level=True) if m in MODULES and m != n}
             for n, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m] if m in path else [n, m]
                raise AssertionError(f"import loop: {' -> '.join(cycle)}")
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_optional_libraries_are_imported_only_where_needed():
    """matplotlib, tqdm and scikit-learn only inside functions of the applications; trainers
    only in their integration module; model zoos and peers nowhere in the package."""
    apps_only = {"matplotlib", "tqdm", "sklearn"}
    nowhere = {"transformers", "timm", "torchvision", "opacus", "backpack"}
    for name, path in MODULES.items():
        top = {m.split(".")[0] for m in _imports(name, path, module_level=True)}
        anywhere = {m.split(".")[0] for m in _imports(name, path, module_level=False)}
        assert not top & apps_only, f"{name} imports {top & apps_only} at module level"
        if not _is_app(name):
            assert not anywhere & apps_only, f"{name} imports {anywhere & apps_only}"
        if not name.startswith("gradstats.integrations"):
            assert not top & {"lightning", "tensorboard"}, (name, top)
            assert not anywhere & nowhere, (name, anywhere & nowhere)


def test_the_wheel_ships_the_library_and_no_benchmark_code():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "gradstats" in packages and "gradstats.rules" in packages
    assert "gradstats.apps" in packages
    assert not [p for p in packages if p.split(".")[0] in ("benchmarks", "tests", "examples")]


def test_no_source_file_is_over_650_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*PKG.rglob("*.py"), *ROOT.glob("csrc/**/*.*"),
                                                   *ROOT.glob("benchmarks/*.py")]
            if (n := len(p.read_text().splitlines())) > 650}
    assert not long, long
