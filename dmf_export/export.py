"""Checkpoint → artifact(s), in any registered format (``dmf_export.formats``).

``export_checkpoint`` checks the options, loads the checkpoint, builds the deployment
graph once and hands it to the format, whose files are staged and land together or not
at all.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from dmf_export import formats
from dmf_export.contract import DEFAULT_IMAGE_SIZE
from dmf_export.errors import DMFExportError, summarize
from dmf_export.formats.base import GRAPHS, Staging, Written, prepare_job  # noqa: F401  (Written: API)

PRECISIONS = ("fp32", "fp16")


@dataclasses.dataclass
class ExportOptions:
    format: str = "onnx"
    output: str | None = None
    solver: str = "rk4"
    steps: int = 1
    precision: str = "fp32"
    graph: str = "episode"
    groups: int | None = None
    kernel: int | None = None
    way: int = 5
    shot: int = 1
    queries: int = 75
    image_size: int = DEFAULT_IMAGE_SIZE
    force: bool = False
    # Options of one format (each format lists its own in Format.export_options; given to
    # another format they are refused, not ignored).
    onnx_flavor: str = "standard"      # onnx: standard (DeformConv) | plugin (the TensorRT node)
    opset: int = 19                    # onnx, tensorrt (through its ONNX graph)
    device: str = "cpu"                # aoti: the device the package is compiled for
    variants: tuple = ("onnx",)        # triton: the artifact formats the repository holds
    # TensorRT engines: the optimisation profile's upper bounds (None: dmf_export.formats.
    # tensorrt's defaults, which cover 10-way 5-shot 75-query), the plugin library (None:
    # build it), the builder's workspace limit in GiB (None: TensorRT's default), the
    # timing cache file (None: one in the cache folder), TensorRT's headers.
    max_way: int | None = None
    max_shot: int | None = None
    max_queries: int | None = None
    plugin: str | None = None
    workspace: float | None = None
    timing_cache: str | None = None
    tensorrt_root: str | None = None

    def check(self) -> formats.Format:
        """Refuse bad options in one line; returns the format."""
        def bad(what):
            raise DMFExportError(what)

        fmt = formats.get(self.format)
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
        defaults = ExportOptions()
        for other in formats.all_formats():
            for name in other.export_options:
                if name not in fmt.export_options and getattr(self, name) != getattr(defaults, name):
                    users = [f.name for f in formats.all_formats() if name in f.export_options]
                    bad(f"--{name.replace('_', '-')} applies to --format {' or '.join(users)}, not {fmt.name}")
        fmt.check_options(self)
        return fmt


def output_paths(checkpoint: str, opts: ExportOptions) -> dict[str, Path]:
    """Where each graph goes: {'episode': p} or {'encoder': p1, 'head': p2}."""
    return formats.get(opts.format).outputs(checkpoint, opts)


def export_checkpoint(checkpoint: str, opts: ExportOptions,
                      log: Callable[[str], None] = lambda _: None) -> list[Written]:
    """Load ``checkpoint`` and write the artifact(s) ``opts`` asks for; returns what was
    written. Every file of the export lands, or none does."""
    fmt = opts.check()
    reason = fmt.unavailable(opts.device, purpose="export")
    if reason:
        raise DMFExportError(f"cannot export {fmt.title} here: {reason}")
    if not Path(checkpoint).is_file():
        raise DMFExportError(f"cannot read {checkpoint}: no such file")
    outputs = fmt.outputs(checkpoint, opts)
    with Staging(fmt.staged(outputs), opts.force) as staging:
        job = prepare_job(checkpoint, opts, cpu_batch=fmt.cpu_batch, log=log)
        try:
            return fmt.write(job, outputs, staging, log)
        except DMFExportError:
            raise
        except Exception as err:  # the exporters' own errors are long; keep the gist
            raise DMFExportError(f"{fmt.name} export failed: {summarize(err)}") from err
