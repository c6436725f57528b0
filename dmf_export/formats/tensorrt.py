"""TensorRT engines (``.engine``) as an artifact format: the adapter over
``dmf_export.tensorrt`` (the plugin, the engine builder and its JSON, the runner)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from dmf_export.contract import ArtifactInfo
from dmf_export.formats.base import Format, Option, Runner, RunOptions
from dmf_export.formats.onnx import OPSET
from dmf_export.tensorrt.engine import engine_profile, info_path, read_engine_info, require_tensorrt, write_engine
from dmf_export.tensorrt.runner import EngineRunner, require_gpu


class TensorRT(Format):
    name = "tensorrt"
    title = "TensorRT"
    suffix = ".engine"
    read_suffixes = (".engine", ".plan")
    graphs = ("episode",)
    options = (
        OPSET,
        Option("max_way", None, kind="int", minimum=1,
               help="TensorRT: most classes the engine accepts (default max(--way, 10))."),
        Option("max_shot", None, kind="int", minimum=1,
               help="TensorRT: most support images per class (default max(--shot, 5))."),
        Option("max_queries", None, kind="int", minimum=1,
               help="TensorRT: most queries per episode (default max(--queries, 75))."),
        Option("plugin", None, kind="file",
               help="TensorRT: the plugin library to use (default: build it, see build-plugin)."),
        Option("tensorrt_root", None, kind="folder",
               help="TensorRT: headers for building the plugin (default $TENSORRT_ROOT, then system paths)."),
        Option("workspace", None, kind="number", minimum=0, open_minimum=True,
               help="TensorRT: builder workspace limit in GiB (default: TensorRT's)."),
        Option("timing_cache", None, kind="new-file",
               help="TensorRT: timing cache file, read and updated (default: one in ~/.cache/dmf_export)."),
    )
    run_flags = ("plugin",)

    def unavailable(self, device: str = "cpu", purpose: str = "run") -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (the Python package 'tensorrt')"
        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU, and torch sees none here"
        return None

    def check_options(self, opts) -> None:
        super().check_options(opts)
        engine_profile(opts)  # the profile's bounds, before minutes of work

    def staged(self, outputs: dict[str, Path]) -> list[Path]:
        """An engine and its JSON land together or not at all."""
        return [outputs["episode"], info_path(outputs["episode"])]

    def write(self, job, outputs, staging, log):
        require_tensorrt()
        require_gpu("building a TensorRT engine")
        return [write_engine(job, outputs["episode"], staging, log)]

    def read_info(self, path: Path) -> ArtifactInfo:
        return read_engine_info(path)

    def open(self, path: Path, info: ArtifactInfo, run: RunOptions) -> Runner:
        return EngineRunner(path, plugin=run.plugin)


FORMAT = TensorRT()
