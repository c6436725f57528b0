"""docs/architecture.md's layer table is the drawing of the imports: every module of the
package is in it once, and no import points up a layer."""
from __future__ import annotations

import re

import pytest

from import_graph import ROOT, edges, function_level_imports, modules

DOC = ROOT / "docs" / "architecture.md"


def _layers() -> dict[str, int]:
    """{module: layer number} from the table after the 'layers' marker."""
    text = DOC.read_text()
    table = text[text.index("<!-- layers:"):]
    layers = {}
    for number, cells in re.findall(r"^\| (\d+) [^|]*\| (.*) \|$", table, re.M):
        for module in re.findall(r"`([^`]+)`", cells):
            assert module not in layers, f"{module} is in two layers of {DOC.name}"
            layers[module] = int(number)
    return layers


def test_every_module_is_in_exactly_one_layer_and_every_listed_module_exists():
    listed, present = set(_layers()), set(modules())
    assert not present - listed, f"modules missing from {DOC.name}'s layers: {sorted(present - listed)}"
    assert not listed - present, f"{DOC.name} lists modules that do not exist: {sorted(listed - present)}"


def test_no_import_points_up_a_layer():
    layers = _layers()
    upward = [f"{source} (layer {layers[source]}) imports {target} (layer {layers[target]})"
              for source, targets in edges().items() for target in targets
              if source in layers and target in layers and layers[target] < layers[source]]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module, allowed", [
    ("contract", {"errors"}),
    ("models.dmf", {"ops", "contract", "errors", "models.resnet12"}),
    ("triton.python_model", set()),
])
def test_the_rooms_that_must_stay_small_import_only_what_they_may(module, allowed):
    assert edges()[module] <= allowed, f"{module} imports {sorted(edges()[module] - allowed)}"


def test_the_scan_sees_imports_of_every_kind():
    graph = edges()
    assert "ops" in graph["models.dmf"]            # from dmf_export import ops
    assert "models.resnet12" in graph["models.dmf"]  # from .resnet12 import ResNet12 (relative)
    assert "formats.base" in graph["formats.onnx"]  # from dmf_export.formats.base import …
    assert "dmf_export" not in graph["cli"]


def test_no_module_imports_the_projects_own_modules_inside_a_function():
    assert function_level_imports() == []
