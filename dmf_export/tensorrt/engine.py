"""TensorRT engines: building one from the plugin-flavour ONNX graph, and the JSON that
travels with it.

An engine ``x.engine`` travels with ``x.engine.json``, which says what it is (the
``ArtifactInfo`` fields, TensorRT version, precision, the optimisation profile and the
plugin library it needs); reading that needs no TensorRT.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from dmf_export import toolchain
from dmf_export.contract import EPISODE_INPUTS, ArtifactInfo, EpisodeSize, episode_shapes
from dmf_export.errors import DMFExportError
from dmf_export.staging import Staging
from dmf_export.tensorrt.plugin import (build_plugin,
                                        find_tensorrt, load_plugin_library)

INFO_SUFFIX = ".json"  # x.engine → x.engine.json
# Defaults for the profile's upper bounds: cover 5-way 1- and 5-shot 75-query episodes
# and the sizes `dmf-export verify` runs (up to 10-way, 5-shot).
DEFAULT_MAX_WAY, DEFAULT_MAX_SHOT, DEFAULT_MAX_QUERIES = 10, 5, 75


def require_tensorrt():
    """The ``tensorrt`` module, or one line saying it is missing."""
    try:
        # imported here, not at the top: TensorRT is optional (NVIDIA's index, GPU machines only)
        import tensorrt
    except ImportError as err:
        raise DMFExportError("TensorRT is not installed (the Python package 'tensorrt' cannot be "
                             "imported); install it from NVIDIA's index to build or run engines") from err
    return tensorrt


def major_version(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def make_logger(trt, log: Callable[[str], None] = lambda _: None):
    """A TensorRT logger that keeps the errors (for one clear line) and forwards warnings."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip())
                log(f"  TensorRT error: {msg}")
            elif severity == trt.ILogger.Severity.WARNING:
                log(f"  TensorRT: {msg}")

        def last_error(self) -> str:
            return self.errors[-1].splitlines()[0] if self.errors else "no message from TensorRT"

    return Logger()


# ------------------------------------------------------------------------- the profile

@dataclasses.dataclass(frozen=True)
class Profile:
    """The engine's optimisation profile, as episode sizes."""

    min: EpisodeSize
    opt: EpisodeSize
    max: EpisodeSize

    def shapes(self, image_size: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input: (min, opt, max) shapes}."""
        shapes = [episode_shapes(size, image_size) for size in (self.min, self.opt, self.max)]
        return {name: tuple(s[name] for s in shapes) for name in EPISODE_INPUTS}


def engine_profile(opts) -> Profile:
    """min: a single 1-way 1-shot query; opt: the export size (--way/--shot/--queries);
    max: --max-way/--max-shot/--max-queries (defaults cover 10-way 5-shot 75-query)."""
    opt = EpisodeSize(opts.way, opts.shot, opts.queries)
    top = EpisodeSize(opts.max_way or max(opts.way, DEFAULT_MAX_WAY),
                      opts.max_shot or max(opts.shot, DEFAULT_MAX_SHOT),
                      opts.max_queries or max(opts.queries, DEFAULT_MAX_QUERIES))
    for axis in ("way", "shot", "queries"):
        if getattr(top, axis) < getattr(opt, axis):
            raise DMFExportError(f"--max-{axis} ({getattr(top, axis)}) is below --{axis} ({getattr(opt, axis)})")
    return Profile(EpisodeSize(1, 1, 1), opt, top)


# ------------------------------------------------------------------------- building

def plugin_library(opts, log) -> Path:
    if opts.plugin:
        return Path(opts.plugin)
    try:
        library = build_plugin(opts.tensorrt_root, log=log)
        headers = find_tensorrt(opts.tensorrt_root)
    except DMFExportError as err:
        raise DMFExportError(f"{err} (or pass --plugin LIB, a library built by `dmf-export build-plugin`)") from err
    trt = require_tensorrt()
    if headers.major != major_version(trt):
        log(f"warning: the plugin was compiled against TensorRT {headers.version} headers but TensorRT "
            f"{trt.__version__} runs it; point --tensorrt-root at the headers of the TensorRT you run")
    return library


def default_timing_cache(trt) -> Path:
    return toolchain.cache_root() / "tensorrt" / f"timing-{trt.__version__}.cache"


def build_engine(onnx_path: Path, plugin_library: Path, profile_shapes: dict, *, strongly_typed: bool = True,
                 workspace_gib: float | None = None, timing_cache: Path | None = None,
                 log: Callable[[str], None] = lambda _: None) -> bytes:
    """Parse ``onnx_path`` (its types decide the precision) and return the serialised engine."""
    trt = require_tensorrt()
    logger = make_logger(trt, log)
    load_plugin_library(trt, plugin_library, log)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and major_version(trt) < 11:  # TensorRT 11 networks are always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0].desc() if errors else logger.last_error()
        node = f" (node {errors[0].node_name()})" if errors and hasattr(errors[0], "node_name") else ""
        raise DMFExportError(f"TensorRT's ONNX parser rejected the graph{node}: {first.splitlines()[0]}")
    config = builder.create_builder_config()
    # TF32 (on by default) rounds float32 matmul/conv inputs to 10-bit mantissas, which
    # would put fp32 engines outside the fp32 tolerance (1e-4); the fp16 graph is typed
    # float16 anyway. Full float32 it is.
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        try:
            cache = config.create_timing_cache(blob)
            usable = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
        except Exception:  # a damaged file: TensorRT's bindings raise
            usable = False
        if not usable:  # from another GPU or TensorRT, or damaged: start afresh (it is only a cache)
            if blob:
                log(f"timing cache {timing_cache} does not fit this GPU/TensorRT; starting a new one")
            blob = b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)
        log(f"timing cache {timing_cache}{' (new)' if not blob else ''}")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DMFExportError(f"TensorRT could not build the engine: {logger.last_error()}")
    log(f"built the engine in {time.perf_counter() - start:.0f} s")
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        with Staging([timing_cache], force=True) as staging:  # a reader never sees half a cache
            staging.temp(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


# ------------------------------------------------------------------------- the description

def info_path(engine: Path) -> Path:
    return Path(f"{engine}{INFO_SUFFIX}")


def read_engine_meta(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DMFExportError(f"{path}: no such file")
    meta_path = info_path(path)
    if not meta_path.is_file():
        raise DMFExportError(f"{path}: no {meta_path.name} beside it, so not an engine written by dmf-export "
                             "(the JSON says what the engine is and which plugin library it needs)")
    try:
        meta = json.loads(meta_path.read_text())
        ArtifactInfo.from_json(json.dumps(meta["artifact"]))  # has the fields an artifact needs
    except (ValueError, KeyError, TypeError) as err:
        raise DMFExportError(f"{meta_path}: not a dmf-export engine description ({type(err).__name__})") from err
    return meta


def read_engine_info(path: Path) -> ArtifactInfo:
    """What the engine is (from its JSON; needs no TensorRT)."""
    info = ArtifactInfo.from_json(json.dumps(read_engine_meta(path)["artifact"]))
    if info.format != "tensorrt":
        raise DMFExportError(f"{info_path(Path(path))}: describes a {info.format!r} artifact, not an engine")
    return info
