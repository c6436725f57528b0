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
from dmf_export.checkpoint import load_checkpoint
from dmf_export.contract import DEFAULT_IMAGE_SIZE
from dmf_export.errors import DMFExportError, summarize
from dmf_export.formats.base import GRAPHS, Format, Job, Log, Option, Staging, Written  # noqa: F401  (Written: API)

PRECISIONS = ("fp32", "fp16",
              "bf16",
              "int8")  # int8: ONNX and Triton (Format.precisions), calibrated on the user's images
SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4")

# What every format reads: (field, default). The options of some formats only are
# declared by those formats (``Format.options``) and added to ExportOptions below.
COMMON_OPTIONS = (
    ("format", "onnx"), ("output", None), ("solver", "rk4"), ("steps", 1), ("precision", "fp32"),
    ("graph", "episode"), ("groups", None), ("kernel", None), ("way", 5), ("shot", 1),
    ("queries", 75), ("image_size", DEFAULT_IMAGE_SIZE), ("force", False),
)


def format_options() -> dict[str, Option]:
    """{field: Option} of every registered format's own options, each once."""
    declared: dict[str, Option] = {}
    for fmt in formats.all_formats():
        for option in fmt.options:
            if declared.setdefault(option.name, option) is not option:
                raise TypeError(f"two formats declare the option {option.name} differently: "
                                f"share one Option object")
    return declared


def _check(self) -> Format:
    """Refuse bad options in one line; returns the format."""
    def bad(what):
        raise DMFExportError(what)

    fmt = formats.get(self.format)
    if self.graph not in GRAPHS:
        bad(f"unknown graph {self.graph!r}; choose from {', '.join(GRAPHS)}")
    if self.precision not in PRECISIONS:
        bad(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
    if self.solver not in SOLVERS:
        bad(f"unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}")
    if self.steps < 1:
        bad(f"--steps must be ≥ 1 (got {self.steps})")
    for name in ("way", "shot", "queries"):
        if getattr(self, name) < 1:
            bad(f"--{name} must be ≥ 1 (got {getattr(self, name)})")
    if self.image_size < 8:
        bad(f"--image-size must be ≥ 8 (got {self.image_size})")
    for name, option in format_options().items():
        value = getattr(self, name)
        if name not in fmt.export_options and value != option.default:
            users = [f.name for f in formats.all_formats() if name in f.export_options]
            bad(f"{option.flag} applies to --format {' or '.join(users)}, not {fmt.name}")
        option.check(value)
    fmt.check_options(self)
    return fmt


ExportOptions = dataclasses.make_dataclass(
    "ExportOptions",
    [(name, object, dataclasses.field(default=default)) for name, default in COMMON_OPTIONS]
    + [(name, object, dataclasses.field(default=option.default)) for name, option in format_options().items()],
    namespace={"check": _check, "__module__": __name__,
               "__doc__": "What ``export_checkpoint`` writes: the options every format reads, and "
                          "each format's own (``Format.options``; refused for other formats)."},
)


def prepare_job(checkpoint: str, opts, cpu_batch: int = 0, log: Log = lambda _: None) -> Job:
    """Load ``checkpoint`` and build its deployment graph(s) for ``opts``."""
    log(f"loading {checkpoint}")
    model = load_checkpoint(checkpoint, groups=opts.groups, kernel=opts.kernel)
    return Job.build(checkpoint, opts, model, cpu_batch)


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
