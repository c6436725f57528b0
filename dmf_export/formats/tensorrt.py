"""TensorRT engines: building from the plugin-flavour ONNX graph, and running them.

TensorRT is optional: everything here imports ``tensorrt`` lazily and says clearly
when it is missing. An engine ``x.engine`` travels with ``x.engine.json``, which says
what it is (the ``ArtifactInfo`` fields, TensorRT version, precision, the optimisation
profile and the plugin library it needs); reading that needs no TensorRT.

The deformable convolution runs in the project's plugin (``plugins/``), which the
engine does not contain: the library must be loaded into TensorRT's plugin registry
before an engine is built or deserialised. ``EngineRunner`` loads the one named in
the JSON, or ``$DMF_EXPORT_TRT_PLUGIN``, or the one it is given.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from dmf_export.contract import EPISODE_INPUTS, EPISODE_OUTPUTS, ArtifactInfo, EpisodeSize
from dmf_export.errors import DMFExportError
from dmf_export.formats.base import Format, Option, Runner, RunOptions, Staging, Written
from dmf_export.formats.onnx import OPSET, write_onnx

INFO_SUFFIX = ".json"  # x.engine → x.engine.json
ALIGNMENT = 256  # bytes: TensorRT requires every tensor address to be a multiple of it
PLUGIN_ENV = "DMF_EXPORT_TRT_PLUGIN"
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "DMFDeformConv2d", "1", ""
# Defaults for the profile's upper bounds: cover 5-way 1- and 5-shot 75-query episodes
# and the sizes `dmf-export verify` runs (up to 10-way, 5-shot).
DEFAULT_MAX_WAY, DEFAULT_MAX_SHOT, DEFAULT_MAX_QUERIES = 10, 5, 75
# What each axis is called in errors: (input, axis) → words.
_AXES = {("support", 0): "images (S = way·shot)", ("support", 1): "channels", ("support", 2): "rows (image height)",
         ("support", 3): "columns (image width)", ("support_labels", 0): "rows (S)",
         ("support_labels", 1): "classes (way)", ("query", 0): "queries (Q)", ("query", 1): "channels",
         ("query", 2): "rows (image height)", ("query", 3): "columns (image width)"}


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        raise DMFExportError("TensorRT is not installed (the Python package 'tensorrt' cannot be "
                             "imported); install it from NVIDIA's index to build or run engines") from err
    return tensorrt


def _require_gpu(what: str):
    import torch

    if not torch.cuda.is_available():
        raise DMFExportError(f"{what} needs a CUDA GPU, and torch sees none here")
    return torch


def info_path(engine: Path) -> Path:
    return Path(f"{engine}{INFO_SUFFIX}")


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _make_logger(trt, log: Callable[[str], None] = lambda _: None):
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


# ------------------------------------------------------------------------- plugin library

_LOADED: dict[str, object] = {}  # library path → registry handle, per process
_LOAD_LOCK = threading.Lock()


def load_plugin_library(trt, library: str | os.PathLike, log: Callable[[str], None] = lambda _: None) -> None:
    """Put the plugin's creator into TensorRT's global plugin registry (once per process)."""
    from dmf_export.plugin_build import check_driver, runtime_version_file

    library = str(Path(library).resolve())
    if not Path(library).is_file():
        raise DMFExportError(f"TensorRT plugin library {library} does not exist (build it with "
                             f"`dmf-export build-plugin`, or point {PLUGIN_ENV} at one)")
    version_file = runtime_version_file(Path(library))
    if version_file.is_file():
        check_driver(version_file.read_text().strip(), f"the TensorRT plugin {library}", strict=True)
    registry = trt.get_plugin_registry()
    with _LOAD_LOCK:
        if library in _LOADED:
            return
        # Load first and look the creator up after: asking the registry for a creator it
        # does not hold makes TensorRT log an error that is not one.
        handle = registry.load_library(library)
        if handle is None:
            # loadLibrary refuses a library whose plugins another one registered already
            if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:
                log(f"plugin {PLUGIN_NAME} v{PLUGIN_VERSION} is already registered in this process; "
                    f"not loading {library}")
                _LOADED[library] = None
                return
            raise DMFExportError(f"TensorRT could not load the plugin library {library} (built for another "
                                 "TensorRT or CUDA? rebuild it with `dmf-export build-plugin`)")
        if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise DMFExportError(f"{library} loaded, but it registers no {PLUGIN_NAME} v{PLUGIN_VERSION} plugin")
        _LOADED[library] = handle


# ------------------------------------------------------------------------- building

@dataclasses.dataclass(frozen=True)
class Profile:
    """The engine's optimisation profile, as episode sizes."""

    min: EpisodeSize
    opt: EpisodeSize
    max: EpisodeSize

    def shapes(self, image_size: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input: (min, opt, max) shapes}."""
        def shape(name, size: EpisodeSize):
            return {"support": (size.support, 3, image_size, image_size),
                    "support_labels": (size.support, size.way),
                    "query": (size.queries, 3, image_size, image_size)}[name]

        return {name: tuple(shape(name, s) for s in (self.min, self.opt, self.max)) for name in EPISODE_INPUTS}


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


def _plugin_library(opts, log) -> Path:
    if opts.plugin:
        return Path(opts.plugin)
    from dmf_export.plugin_build import build_plugin, find_tensorrt

    try:
        library = build_plugin(opts.tensorrt_root, log=log)
        headers = find_tensorrt(opts.tensorrt_root)
    except DMFExportError as err:
        raise DMFExportError(f"{err} (or pass --plugin LIB, a library built by `dmf-export build-plugin`)") from err
    trt = require_tensorrt()
    if headers.major != _major(trt):
        log(f"warning: the plugin was compiled against TensorRT {headers.version} headers but TensorRT "
            f"{trt.__version__} runs it; point --tensorrt-root at the headers of the TensorRT you run")
    return library


def _default_timing_cache(trt) -> Path:
    root = os.environ.get("DMF_EXPORT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dmf_export"
    return base / "tensorrt" / f"timing-{trt.__version__}.cache"


def build_engine(onnx_path: Path, plugin_library: Path, profile_shapes: dict, *, strongly_typed: bool = True,
                 workspace_gib: float | None = None, timing_cache: Path | None = None,
                 log: Callable[[str], None] = lambda _: None) -> bytes:
    """Parse ``onnx_path`` (its types decide the precision) and return the serialised engine."""
    trt = require_tensorrt()
    logger = _make_logger(trt, log)
    load_plugin_library(trt, plugin_library, log)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and _major(trt) < 11:  # TensorRT 11 networks are always strongly typed
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


def write_engine(job, engine_path: Path, staging, log) -> Written:
    """The plugin-flavour ONNX graph of ``job`` → an engine and its JSON, at their staging names."""
    from dmf_export._version import __version__

    opts = job.opts
    trt = require_tensorrt()
    profile = engine_profile(opts)
    library = _plugin_library(opts, log).resolve()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmf-trt-") as tmp:
        onnx_path = Path(tmp) / "episode.onnx"
        log(f"writing the plugin-flavour ONNX graph for TensorRT → {onnx_path}")
        write_onnx(job, "episode", onnx_path, flavor="plugin", fmt="tensorrt")
        shapes = profile.shapes(opts.image_size)
        log(f"building a TensorRT {trt.__version__} {opts.precision} engine (profile {profile.min} … "
            f"{profile.opt} … {profile.max}); this takes a few minutes")
        timing_cache = Path(opts.timing_cache) if opts.timing_cache else _default_timing_cache(trt)
        engine = build_engine(onnx_path, library, shapes, workspace_gib=opts.workspace,
                              timing_cache=timing_cache, log=log)
    info = job.info("tensorrt", "episode")
    meta = {
        "artifact": dataclasses.asdict(info),
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


# ------------------------------------------------------------------------- running

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


class EngineRunner(Runner):
    """Runs a dmf-export engine: ``runner(support, support_labels, query) -> scores``.

    Inputs are NumPy arrays or torch tensors (CPU ones are copied to the GPU); the
    scores are a CUDA torch tensor of the engine's precision. Work is queued on the
    runner's own CUDA stream, which is synchronised before the call returns. One call
    at a time per runner (it owns one execution context).
    """

    def __init__(self, path, plugin: str | os.PathLike | None = None, device: int | None = None,
                 log: Callable[[str], None] = lambda _: None):
        path = Path(path)
        meta = read_engine_meta(path)
        super().__init__(path, read_engine_info(path), "tensorrt", {"episode": self._execute})
        trt = require_tensorrt()
        torch = _require_gpu(f"running the TensorRT engine {path}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        library = plugin or os.environ.get(PLUGIN_ENV) or meta.get("plugin_library")
        if not library:
            raise DMFExportError(f"{path}: no plugin library recorded; pass plugin= or set {PLUGIN_ENV}")
        load_plugin_library(trt, library, log)
        self._logger = _make_logger(trt, log)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)  # kept: the engine must not outlive it
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise DMFExportError(f"TensorRT could not load {path}: {self._logger.last_error()}")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise DMFExportError(f"TensorRT could not create an execution context for {path}: "
                                     f"{self._logger.last_error()}")
            self.stream = torch.cuda.Stream(self.device)
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = [n for n in (*EPISODE_INPUTS, *EPISODE_OUTPUTS) if n not in names]
        if missing:
            raise DMFExportError(f"{path}: the engine has no tensor(s) {', '.join(missing)}")
        self._dtypes = {name: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(name))
                        for name in (*EPISODE_INPUTS, *EPISODE_OUTPUTS)}
        self.profile = {name: [tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, 0)]
                        for name in EPISODE_INPUTS}

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        low, _, high = self.profile[name]
        if len(shape) != len(low):
            raise DMFExportError(f"{name} has shape {list(shape)}: the engine takes a {len(low)}-D tensor "
                                 f"{list(low)} … {list(high)}")
        for axis, (size, lo, hi) in enumerate(zip(shape, low, high)):
            if not lo <= size <= hi:
                what = _AXES.get((name, axis), "elements")
                if lo == hi:
                    allowed = f"exactly {lo}" + (f" (it was built for {self.info.image_size}×{self.info.image_size} "
                                                 "images: --image-size)" if axis >= 2 else "")
                else:
                    allowed = f"{lo}..{hi} (rebuild the engine with larger --max-way/--max-shot/--max-queries)"
                raise DMFExportError(f"{name} has {size} {what} on axis {axis}; this engine's profile allows "
                                     f"{allowed}")

    def _execute(self, support, support_labels, query):
        import numpy as np
        import torch

        inputs = {}
        # GPU inputs may still be being written on the caller's stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for name, value in zip(EPISODE_INPUTS, (support, support_labels, query)):
                tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
                if not isinstance(tensor, torch.Tensor):
                    raise DMFExportError(f"{name} must be a NumPy array or a torch tensor, not {type(value).__name__}")
                self._check_shape(name, tuple(tensor.shape))
                tensor = tensor.to(self.device, self._dtypes[name]).contiguous()
                if tensor.data_ptr() % ALIGNMENT:  # a slice such as support[1:]: a fresh block is aligned
                    tensor = tensor.clone()
                inputs[name] = tensor
            if inputs["support"].shape[0] != inputs["support_labels"].shape[0]:
                raise DMFExportError(f"support has {inputs['support'].shape[0]} images but support_labels has "
                                     f"{inputs['support_labels'].shape[0]} rows")
            for name, tensor in inputs.items():
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise DMFExportError(f"TensorRT refused the shape {list(tensor.shape)} for {name}: "
                                         f"{self._logger.last_error()}")
                self._set_address(name, tensor)
            out_name = EPISODE_OUTPUTS[0]
            shape = tuple(int(d) for d in self.context.get_tensor_shape(out_name))
            if any(d < 0 for d in shape):
                raise DMFExportError(f"TensorRT could not infer the shape of {out_name}: {self._logger.last_error()}")
            scores = torch.empty(shape, dtype=self._dtypes[out_name], device=self.device)
            self._set_address(out_name, scores)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise DMFExportError(f"TensorRT failed to run {self.path.name}: {self._logger.last_error()}")
        self.stream.synchronize()  # the inputs made on this stream stay alive until here
        return scores

    def _set_address(self, name, tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise DMFExportError(f"TensorRT refused the address of {name} ({tensor.data_ptr():#x}): "
                                 f"{self._logger.last_error()}")


def _torch_dtype(trt, torch, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
    if dtype not in table:
        raise DMFExportError(f"unexpected engine tensor type {dtype}")
    return table[dtype]


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
        import importlib.util

        import torch

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
        _require_gpu("building a TensorRT engine")
        return [write_engine(job, outputs["episode"], staging, log)]

    def read_info(self, path: Path) -> ArtifactInfo:
        return read_engine_info(path)

    def open(self, path: Path, info: ArtifactInfo, run: RunOptions) -> Runner:
        return EngineRunner(path, plugin=run.plugin)


FORMAT = TensorRT()
