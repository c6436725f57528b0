"""The project's layout, read from its source: imports between its own modules run one way
(no cycle), sit at the top of each module, and no file cites a document the repository
does not carry."""
from __future__ import annotations

import ast
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOT_PACKAGE = "dmf_export"
# what `import models` means in a checkout (the repository root on sys.path) is the
# installed `dmf_export.models`
TOP_LEVEL_ALIASES = {"models": "dmf_export.models"}
# documents an earlier tree cited; the repository carries docs/ instead
MISSING_DOCUMENTS = ("DMF_SPEC.md", "CONTRACT.md")


def package_folders() -> dict[str, Path]:
    """Every package of the project and its folder, as pyproject installs them
    (``dmf_export.models`` lives in ``models/``)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / folder for name, folder in setuptools.get("package-dir", {}).items()}
    folders.setdefault(ROOT_PACKAGE, ROOT / ROOT_PACKAGE)
    return folders


def project_modules() -> dict[str, Path]:
    """module name → file, for every .py of every package (subpackages included)."""
    modules: dict[str, Path] = {}
    folders = package_folders()
    owner: dict[Path, str] = {}  # the most specific package a file belongs to
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            if len(package) > len(owner.get(path, "")):
                owner[path] = package
    for path, package in owner.items():
        parts = path.relative_to(folders[package]).with_suffix("").parts
        name = ".".join((package,) + (parts[:-1] if parts[-1] == "__init__" else parts))
        modules[name] = path
    return modules


def is_shipped_python_model(path: Path) -> bool:
    """Triton's python backend runs this file inside the server, where dmf_export is not
    installed: it is package data, not one of the package's modules."""
    return "class TritonPythonModel" in path.read_text()


def _is_project(name: str) -> bool:
    return name.split(".")[0] in (ROOT_PACKAGE, *TOP_LEVEL_ALIASES)


def _canonical(name: str) -> str:
    top, _, rest = name.partition(".")
    top = TOP_LEVEL_ALIASES.get(top, top)
    return f"{top}.{rest}" if rest else top


def project_imports(module: str, path: Path, modules: dict[str, Path], tree: ast.AST | None = None):
    """(node, [project modules it imports, ``module`` itself aside]) for every import of the
    project's own modules anywhere in ``path`` (module level, functions, methods, branches):
    an import inside a function still runs, only later."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def known(name: str) -> str | None:  # the deepest module of a dotted name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree or ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if _is_project(a.name)]
            if not names:
                continue
            targets = [known(_canonical(name)) for name in names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            elif node.module and _is_project(node.module):
                base = _canonical(node.module)
            else:
                continue
            # `from pkg import sub` imports the submodule; `from pkg import name`, pkg itself
            targets = [known(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else known(base)
                       for a in node.names]
        else:
            continue
        yield node, sorted({t for t in targets if t and t != module})


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


# -- one-way imports ------------------------------------------------------------------------

def import_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle through each group of modules that import one another (Tarjan's strongly
    connected components), shortest first; ``graph[a][b]`` is where a imports b."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for group in groups:  # the shortest way back to the group's first module
        start, members = group[0], set(group)
        paths, seen = [[start]], {start}
        while paths:
            trail = paths.pop(0)
            targets = sorted(t for t in graph.get(trail[-1], {}) if t in members)
            if start in targets:
                cycles.append(trail + [start])
                break
            for target in targets:
                if target not in seen:
                    seen.add(target)
                    paths.append(trail + [target])
    return sorted(cycles, key=len)


def import_graph() -> dict[str, dict[str, str]]:
    modules = project_modules()
    graph: dict[str, dict[str, str]] = {}
    for module, path in modules.items():
        if is_shipped_python_model(path):
            continue
        edges = graph.setdefault(module, {})
        for node, targets in project_imports(module, path, modules):
            for target in targets:
                edges.setdefault(target, _where(path, node))
    return graph


def test_the_scan_sees_every_package_and_every_kind_of_import():
    graph = import_graph()
    packages = {name for name in graph if (project_modules()[name]).name == "__init__.py"}
    assert {"dmf_export", "dmf_export.formats", "dmf_export.models"} <= packages
    assert "dmf_export.models.resnet12" in graph["dmf_export.models.dmf"]  # relative
    assert "dmf_export.ops" in graph["dmf_export.models.dmf"]  # from the package, a submodule
    assert "dmf_export.formats.onnx" in graph["dmf_export.formats.tensorrt"]


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1", "d": "b.py:2"}, "c": {"a": "c.py:9"},
             "d": {"e": "d.py:1"}, "e": {}, "x": {"y": "x.py:1"}, "y": {"x": "y.py:1"}}
    assert import_cycles(graph) == [["x", "y", "x"], ["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b": ""}, "b": {"c": ""}, "c": {}}) == []


def test_the_package_has_no_import_cycles():
    """Every package of the project (dmf_export, its subpackages, dmf_export.models), every
    import statement anywhere in a module: a cycle hidden in a function still binds two
    modules to each other's import order."""
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (each module imports the next):\n" + "\n".join(
        "  " + " → ".join(cycle) + "\n    (" + ", ".join(
            graph[a][b] for a, b in zip(cycle, cycle[1:])) + ")" for cycle in cycles)


# -- imports at the top ---------------------------------------------------------------------

def function_level_project_imports() -> list[str]:
    """``file:line: statement`` for each import of the project's own modules inside a
    function or method body."""
    modules = project_modules()
    found = set()
    for module, path in sorted(modules.items()):
        if is_shipped_python_model(path):
            continue
        source = path.read_text()
        tree = ast.parse(source, str(path))
        inside = {id(node) for function in ast.walk(tree)
                  if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(function)}
        for node, _ in project_imports(module, path, modules, tree):
            if id(node) in inside:
                found.add((str(path.relative_to(ROOT)), node.lineno,
                           ast.get_source_segment(source, node)))
    return [f"{file}:{line}: {statement}" for file, line, statement in sorted(found)]


def test_the_function_level_scan_sees_an_import_in_a_method(tmp_path, monkeypatch):
    package = tmp_path / "dmf_export"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "top.py").write_text("from dmf_export import other\n")
    (package / "other.py").write_text(
        "import json\n\nclass A:\n    def f(self):\n        import os\n"
        "        from . import top\n        from models.dmf import DMF\n")
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackages = ["dmf_export"]\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert function_level_project_imports() == [
        "dmf_export/other.py:6: from . import top",
        "dmf_export/other.py:7: from models.dmf import DMF"]


def test_no_function_level_import_of_the_projects_own_modules():
    """Imports of dmf_export/models belong at the top of a module, where a reader sees what
    it depends on (the shipped Triton python model aside: it imports none)."""
    found = function_level_project_imports()
    assert not found, (f"{len(found)} imports of the project's own modules inside functions "
                       "(move them to the top of the module):\n  " + "\n  ".join(found))


# -- documents the repository carries ---------------------------------------------------------

SKIPPED_FOLDERS = {"__pycache__", "build", "dist", "out", "node_modules"}


def repository_text_files():
    """Every text file of the checkout: code, README, docs, benchmarks, plugins, csrc,
    tests, CI (not virtual environments, caches or build outputs)."""
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_FOLDERS
                               and not d.endswith(".egg-info")
                               and (not d.startswith(".") or d in (".ci", ".github")))
        for name in sorted(files):
            path = Path(folder) / name
            if path == Path(__file__).resolve():
                continue  # this file names the documents to look for them
            if path.is_file() and path.stat().st_size < 2_000_000:
                data = path.read_bytes()
                if b"\0" not in data[:8192]:
                    yield path, data.decode("utf-8", errors="replace")


def test_no_file_cites_a_document_the_repository_does_not_carry():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path, text in repository_text_files()
             for number, line in enumerate(text.splitlines(), 1)
             if any(name in line for name in MISSING_DOCUMENTS)]
    assert not found, (f"{len(found)} lines cite {' or '.join(MISSING_DOCUMENTS)}, which the "
                       "repository does not carry (cite docs/ instead):\n  " + "\n  ".join(found))


# -- the drawing of the imports: docs/architecture.md's layers --------------------------------

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def architecture_layers() -> dict[str, int]:
    """{module: layer} from the table after docs/architecture.md's 'layers' marker (named
    as dmf_export imports them: ``cli``, ``formats.base``, ``models.dmf``, ``dmf_export``)."""
    text = ARCHITECTURE.read_text()
    layers: dict[str, int] = {}
    for number, cells in re.findall(r"^\| (\d+) [^|]*\| (.*) \|$", text[text.index("<!-- layers:"):], re.M):
        for short in re.findall(r"`([^`]+)`", cells):
            module = short if short == ROOT_PACKAGE else f"{ROOT_PACKAGE}.{short}"
            assert module not in layers, f"{short} is in two layers of {ARCHITECTURE.name}"
            layers[module] = int(number)
    return layers


def test_every_module_is_in_exactly_one_layer_of_the_architecture_page():
    listed, present = set(architecture_layers()), set(project_modules())
    assert not present - listed, f"missing from {ARCHITECTURE.name}'s layers: {sorted(present - listed)}"
    assert not listed - present, f"{ARCHITECTURE.name} lists modules that do not exist: {sorted(listed - present)}"


def test_no_import_points_up_a_layer_of_the_architecture_page():
    layers, graph = architecture_layers(), import_graph()
    upward = [f"{source} (layer {layers[source]}) imports {target} (layer {layers[target]}) at {where}"
              for source, targets in graph.items() for target, where in targets.items()
              if layers[target] < layers[source]]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module, allowed", [
    ("contract", {"errors"}),
    ("models.dmf", {"ops", "contract", "errors", "models.resnet12"}),
    ("errors", set()),
])
def test_the_rooms_that_must_stay_small_import_only_what_they_may(module, allowed):
    imported = {target.removeprefix(f"{ROOT_PACKAGE}.") for target in import_graph()[f"{ROOT_PACKAGE}.{module}"]}
    assert imported <= allowed, f"{module} imports {sorted(imported - allowed)}"
