"""TensorRT engines: building from the plugin-flavour ONNX graph, and running them.

TensorRT is optional: everything here imports ``tensorrt`` lazily and says clearly
when it is missing.
"""
from __future__ import annotations

from pathlib import Path

from dmf_export.errors import DMFExportError


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        raise DMFExportError("TensorRT is not installed (the Python package 'tensorrt' cannot be "
                             "imported); install it from NVIDIA's index to build or run engines") from err
    return tensorrt


def export_engine(checkpoint, opts, log):
    require_tensorrt()
    raise DMFExportError("TensorRT engine building is not implemented yet")


def read_engine_info(path: Path):
    require_tensorrt()
    raise DMFExportError("running TensorRT engines is not implemented yet")


class EngineRunner:
    def __init__(self, path):
        read_engine_info(Path(path))
