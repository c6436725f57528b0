"""TensorRT engines (``.engine``) as an artifact format: the adapter over
``dmf_export.tensorrt`` (the plugin, the engine builder and its JSON, the runner)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from dmf_export.contract import ArtifactInfo
from dmf_export.formats.base import Format, Option, Runner, RunOptions, Written
from dmf_export.formats.onnx import OPSET, write_onnx
from dmf_export.tensorrt.engine import (build_engine, default_timing_cache, engine_profile, info_path, plugin_library,
                                        read_engine_info, require_tensorrt)
from dmf_export.tensorrt.plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dmf_export.tensorrt.runner import EngineRunner, require_gpu


def write_engine(job, engine_path: Path, staging, log) -> Written:
    """The plugin-flavour ONNX graph of ``job`` → an engine and its JSON, at their staging names."""
    opts = job.opts
    trt = require_tensorrt()
    profile = engine_profile(opts)
    library = plugin_library(opts, log).resolve()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmf-trt-") as tmp:
        onnx_path = Path(tmp) / "episode.onnx"
        log(f"writing the plugin-flavour ONNX graph for TensorRT → {onnx_path}")
        write_onnx(job, "episode", onnx_path, flavor="plugin", fmt="tensorrt")
        shapes = profile.shapes(opts.image_size)
        log(f"building a TensorRT {trt.__version__} {opts.precision} engine (profile {profile.min} … "
            f"{profile.opt} … {profile.max}); this takes a few minutes")
        timing_cache = Path(opts.timing_cache) if opts.timing_cache else default_timing_cache(trt)
        engine = build_engine(onnx_path, library, shapes, workspace_gib=opts.workspace,
                              timing_cache=timing_cache, log=log)
    meta = {
        "artifact": dataclasses.asdict(job.info("tensorrt", "episode")),
        "tensorrt_version": trt.__version__,
        "precision": opts.precision,
        "profile": {"min": dataclasses.asdict(profile.min), "opt": dataclasses.asdict(profile.opt),
                    "max": dataclasses.asdict(profile.max),
                    "shapes": {name: dict(zip(("min", "opt", "max"), ("x".join(map(str, s)) for s in ss)))
                               for name, ss in shapes.items()}},
        "plugin_library": str(library),
        "plugin": {"name": PLUGIN_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE},
    }
    staging.temp(engine_path).write_bytes(engine)
    staging.temp(info_path(engine_path)).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Written(engine_path, "episode", time.perf_counter() - start)


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
