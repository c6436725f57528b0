"""Checkpoint → artifact: TorchScript and ONNX (TensorRT engines build on the ONNX)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from dmf_export import __version__
from dmf_export.contract import (
    DEFAULT_IMAGE_SIZE, ENCODER_INPUTS, ENCODER_OUTPUTS, EPISODE_INPUTS, EPISODE_OUTPUTS,
    FEATURE_CHANNELS, HEAD_INPUTS, HEAD_OUTPUTS, METADATA_KEY, ArtifactInfo, EpisodeSize,
    make_episode,
)
from dmf_export.errors import DMFExportError, summarize

FORMATS = ("torchscript", "onnx", "tensorrt")
GRAPHS = ("episode", "split")
PRECISIONS = ("fp32", "fp16")
SUFFIX = {"torchscript": ".ts", "onnx": ".onnx", "tensorrt": ".engine"}
_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}


@dataclasses.dataclass
class ExportOptions:
    format: str = "onnx"
    output: str | None = None
    solver: str = "rk4"
    steps: int = 1
    precision: str = "fp32"
    graph: str = "episode"
    onnx_flavor: str = "standard"
    groups: int | None = None
    kernel: int | None = None
    way: int = 5
    shot: int = 1
    queries: int = 75
    image_size: int = DEFAULT_IMAGE_SIZE
    opset: int = 19
    force: bool = False
    # TensorRT engines (--format tensorrt): the optimisation profile's upper bounds (None:
    # dmf_export.tensorrt's defaults, which cover 10-way 5-shot 75-query), the plugin
    # library (None: build it), the builder's workspace limit in GiB (None: TensorRT's
    # default), the timing cache file (None: one in the cache folder), TensorRT's headers.
    max_way: int | None = None
    max_shot: int | None = None
    max_queries: int | None = None
    plugin: str | None = None
    workspace: float | None = None
    timing_cache: str | None = None
    tensorrt_root: str | None = None

    def check(self) -> None:
        def bad(what):
            raise DMFExportError(what)

        if self.format not in FORMATS:
            bad(f"unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.graph not in GRAPHS:
            bad(f"unknown graph {self.graph!r}; choose from {', '.join(GRAPHS)}")
        if self.precision not in PRECISIONS:
            bad(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.onnx_flavor not in ("standard", "plugin"):
            bad(f"unknown ONNX flavour {self.onnx_flavor!r}; choose from standard, plugin")
        if self.steps < 1:
            bad(f"--steps must be ≥ 1 (got {self.steps})")
        for name in ("way", "shot", "queries"):
            if getattr(self, name) < 1:
                bad(f"--{name} must be ≥ 1 (got {getattr(self, name)})")
        if self.image_size < 8:
            bad(f"--image-size must be ≥ 8 (got {self.image_size})")
        if self.opset < 19:
            bad(f"--opset must be ≥ 19: DeformConv first appears in opset 19 (got {self.opset})")
        for name in ("way", "shot", "queries"):
            top = getattr(self, f"max_{name}")
            if top is not None and top < getattr(self, name):
                bad(f"--max-{name} ({top}) must be ≥ --{name} ({getattr(self, name)})")
        if self.workspace is not None and self.workspace <= 0:
            bad(f"--workspace must be a positive number of GiB (got {self.workspace})")


@dataclasses.dataclass
class Written:
    path: Path
    graph: str
    seconds: float

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


def _strip_checkpoint_suffix(name: str) -> str:
    for suffix in (".pth.tar", ".pth", ".pt", ".tar", ".ckpt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def output_paths(checkpoint: str, opts: ExportOptions) -> dict[str, Path]:
    """Where each graph goes: {'episode': p} or {'encoder': p1, 'head': p2}."""
    suffix = SUFFIX[opts.format]
    if opts.output:
        base = Path(opts.output)
        if base.suffix == suffix:
            base = base.with_suffix("")
    else:
        stem = _strip_checkpoint_suffix(Path(checkpoint).name)
        if opts.precision == "fp16":
            stem += ".fp16"
        if opts.format == "onnx" and opts.onnx_flavor == "plugin":
            stem += ".plugin"
        base = Path(checkpoint).parent / stem
    if opts.graph == "episode":
        return {"episode": Path(f"{base}{suffix}")}
    return {"encoder": Path(f"{base}.encoder{suffix}"), "head": Path(f"{base}.head{suffix}")}


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary name beside ``final``; rename onto it only if the body succeeds."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _check_writable(paths: dict[str, Path], force: bool) -> None:
    for path in paths.values():
        if path.exists() and not force:
            raise DMFExportError(f"{path} exists; pass --force to overwrite it")
        if path.is_dir():
            raise DMFExportError(f"{path} is a directory")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise DMFExportError(f"cannot write {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise DMFExportError(f"cannot write {path}: folder {parent} is not writable")


def trace_size(opts: ExportOptions) -> EpisodeSize:
    # torch.export specialises dimensions whose example value is 0 or 1; tracing at ≥ 2
    # keeps every episode axis dynamic (S = way·shot ≥ 2 follows). The graph is the same
    # for every size.
    return EpisodeSize(max(opts.way, 2), opts.shot, max(opts.queries, 2))


def example_inputs(graph: str, size: EpisodeSize, image_size: int, dtype: torch.dtype,
                   features_hw: int):
    support, labels, query = make_episode(size, image_size, seed=0, dtype=dtype)
    if graph == "episode":
        return support, labels, query
    if graph == "encoder":
        return (torch.cat([support, query]),)
    gen = torch.Generator().manual_seed(1)
    feats = lambda n: torch.randn(n, FEATURE_CHANNELS, features_hw, features_hw, generator=gen).to(dtype)  # noqa: E731
    return feats(size.support), labels, feats(size.queries)


def feature_size(image_size: int) -> int:
    size = image_size
    for _ in range(3):  # three max-pools with ceil_mode
        size = -(-size // 2)
    return size


_NAMES = {
    "episode": (EPISODE_INPUTS, EPISODE_OUTPUTS),
    "encoder": (ENCODER_INPUTS, ENCODER_OUTPUTS),
    "head": (HEAD_INPUTS, HEAD_OUTPUTS),
}


def _dynamic_shapes(graph: str):
    from torch.export import Dim

    support, way, query = Dim("S", min=1), Dim("way", min=1), Dim("Q", min=1)
    if graph == "episode":
        return {"support": {0: support}, "support_labels": {0: support, 1: way}, "query": {0: query}}
    if graph == "encoder":
        return {"images": {0: Dim("N", min=1)}}
    return {"support_features": {0: support}, "support_labels": {0: support, 1: way},
            "query_features": {0: query}}


def _quiet():
    """The dynamo exporter prints progress and warnings of its own; keep ours readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript"):
        logger = logging.getLogger(name)
        previous = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, previous)
    return stack


def save_torchscript(module: torch.nn.Module, path: Path, info: ArtifactInfo) -> None:
    # TorchScript is deprecated upstream but remains what libtorch/C++ serving loads.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_KEY: info.to_json()})


def save_onnx(module: torch.nn.Module, path: Path, info: ArtifactInfo, example: tuple,
              opset: int, flavor: str) -> None:
    from dmf_export.onnx_ops import translation_table

    inputs, outputs = _NAMES[info.graph]
    with _quiet():
        program = torch.onnx.export(
            module, example, dynamo=True, opset_version=opset,
            input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes=_dynamic_shapes(info.graph),
            custom_translation_table=translation_table(flavor),
            external_data=False, optimize=True, verbose=False,
        )
    program.model.metadata_props[METADATA_KEY] = info.to_json()
    program.model.producer_name = "dmf-export"
    program.model.producer_version = __version__
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
    import onnx

    onnx.checker.check_model(str(path))


def export_checkpoint(checkpoint: str, opts: ExportOptions,
                      log: Callable[[str], None] = lambda _: None) -> list[Written]:
    """Load ``checkpoint`` and write the artifact(s) ``opts`` asks for; returns what was written."""
    from dmf_export.checkpoint import load_checkpoint
    from dmf_export.deploy import build_episode_graph

    opts.check()
    if opts.format == "tensorrt":
        from dmf_export.tensorrt import export_engine  # needs TensorRT; says so clearly

        return export_engine(checkpoint, opts, log)
    if not Path(checkpoint).is_file():
        raise DMFExportError(f"cannot read {checkpoint}: no such file")
    paths = output_paths(checkpoint, opts)
    _check_writable(paths, opts.force)

    log(f"loading {checkpoint}")
    model = load_checkpoint(checkpoint, groups=opts.groups, kernel=opts.kernel)
    # TorchScript encodes 16 images at a time on a CPU; torch.export cannot loop over a dynamic batch
    cpu_batch = 16 if opts.format == "torchscript" else 0
    episode = build_episode_graph(model, solver=opts.solver, steps=opts.steps,
                                  cpu_batch=cpu_batch).eval()
    dtype = _DTYPE[opts.precision]
    episode = episode.to(dtype)
    modules = {"episode": episode} if opts.graph == "episode" else {
        "encoder": episode.encoder, "head": episode.head}
    size = trace_size(opts)
    written = []
    for graph, module in modules.items():
        info = ArtifactInfo(
            format=opts.format, graph=graph, precision=opts.precision,
            image_size=opts.image_size, groups=model.groups, kernel=model.kernel,
            solver=opts.solver, steps=opts.steps,
            onnx_flavor=opts.onnx_flavor if opts.format == "onnx" else None,
            example=dataclasses.asdict(EpisodeSize(opts.way, opts.shot, opts.queries)),
            checkpoint=Path(checkpoint).name, dmf_export_version=__version__)
        path = paths[graph]
        log(f"writing {opts.format} {graph} graph → {path}")
        start = time.perf_counter()
        try:
            if opts.format == "torchscript":
                save_torchscript(module, path, info)
            else:
                example = example_inputs(graph, size, opts.image_size, dtype,
                                         feature_size(opts.image_size))
                save_onnx(module, path, info, example, opts.opset, opts.onnx_flavor)
        except DMFExportError:
            raise
        except Exception as err:  # the exporters' own errors are long; keep the gist
            raise DMFExportError(f"{opts.format} export of the {graph} graph failed: "
                                 f"{summarize(err)}") from err
        written.append(Written(path, graph, time.perf_counter() - start))
    return written
