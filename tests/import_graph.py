"""The package's import graph, read from its source: every import statement anywhere in a
module (top level or inside a function), between the modules of ``dmf_export/`` and
``models/`` (installed as ``dmf_export.models``). Names drop the ``dmf_export.`` prefix."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dmf_export"


def modules() -> dict[str, Path]:
    """{module name: file}: ``cli``, ``formats.base``, ``models.dmf``, ``dmf_export`` (the
    package's own ``__init__``), …"""
    found = {}
    files = sorted(ROOT.glob(f"{PACKAGE}/**/*.py")) + sorted(ROOT.glob("models/*.py"))
    for file in files:
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == PACKAGE:
            parts = parts[1:]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or PACKAGE] = file
    return found


def _name(dotted: str) -> str:
    """'dmf_export.formats.base' → 'formats.base'; 'models.dmf' stays; 'dmf_export' stays."""
    if dotted == PACKAGE:
        return PACKAGE
    return dotted[len(PACKAGE) + 1:] if dotted.startswith(PACKAGE + ".") else dotted


def edges() -> dict[str, set[str]]:
    """{module: the project's modules it imports}. ``from dmf_export import ops`` is an edge
    to ``ops`` (a submodule), ``from dmf_export import load_checkpoint`` one to the package."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, file in known.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [_name(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's own package
                    parts = package.split(".") if package and package != PACKAGE else []
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = _name(node.module or "")
                subs = [f"{base}.{a.name}" if base != PACKAGE else a.name for a in node.names]
                found = [s for s in subs if s in known]
                targets = found if len(found) == len(subs) else [base, *found]
            graph[name].update(t for t in targets if t in known and t != name)
    return graph


def function_level_imports() -> list[str]:
    """'file:line: module' for each import of the project's own modules inside a function."""
    found = []
    for name, file in modules().items():
        for function in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    module = "." * node.level + (node.module or "")
                elif isinstance(node, ast.Import):
                    module = ", ".join(alias.name for alias in node.names)
                else:
                    continue
                if getattr(node, "level", 0) or any(m.strip().split(".")[0] in (PACKAGE, "models")
                                     for m in module.split(",")):
                    found.append(f"{file.relative_to(ROOT)}:{node.lineno}: {module}")
    return sorted(set(found))
