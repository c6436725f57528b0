"""What every artifact format shares: the surface a format module fills in, the runner
every format returns, the one metadata schema, output naming and all-or-nothing writes.

A format is one module in ``dmf_export/formats/`` with one ``Format`` subclass; the
registry (``dmf_export.formats``) lists it once, and ``export``, ``verify``, ``bench`` and
``demo`` read only the registry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable, ClassVar

import torch

from dmf_export._version import __version__
from dmf_export.contract import ArtifactInfo, EpisodeSize, check_episode
from dmf_export.cpu import bf16_unavailable
from dmf_export.deploy import Bfloat16Encoder, build_episode_graph
from dmf_export.errors import DMFExportError, summarize
from dmf_export.staging import Staging  # noqa: F401  (formats write through it)

Log = Callable[[str], None]
GRAPHS = {"episode": ("episode",), "split": ("encoder", "head")}


# ------------------------------------------------------------------------- writing

@dataclasses.dataclass
class Written:
    """One file (or folder) an export wrote."""

    path: Path
    graph: str
    seconds: float

    @property
    def size_mb(self) -> float:
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file()) / 1e6
        return self.path.stat().st_size / 1e6


def strip_checkpoint_suffix(name: str) -> str:
    for suffix in (".pth.tar", ".pth", ".pt", ".tar", ".ckpt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def split_partner(path: Path, info: ArtifactInfo) -> Path:
    """The head beside a split export's encoder (``x.encoder.S`` → ``x.head.S``)."""
    if info.graph != "encoder":
        raise DMFExportError(f"{path} is the head of a split export: pass the encoder's path")
    partner = path.with_name(path.name.replace(".encoder.", ".head.", 1))
    if partner == path or not partner.exists():
        raise DMFExportError(f"{path} is a split encoder but its head {partner} is missing")
    return partner


# ------------------------------------------------------------------------- running

# The most CPU threads any option may ask for: each is a stack and an arena of its own, so
# past the largest machines a thread count only grows memory.
MAX_THREADS = 256


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run an artifact. Each format reads what applies to it (``Format.run_flags``
    names the switches it accepts; one given to a format that has no use for it is an error)."""

    provider: str = "cpu"           # onnxruntime execution provider
    device: str = "cpu"             # torch device (TorchScript, AOTInductor)
    threads: int | None = None      # CPU threads (onnxruntime; torch reads torch.set_num_threads)
    cuda_graph: bool = False        # replay each episode size from a captured CUDA graph
    tf32: bool = False              # let fp32 convolutions use TF32 on a GPU
    plugin: str | None = None       # TensorRT plugin library


GraphFn = Callable[..., torch.Tensor]


class Runner:
    """``runner(support, support_labels, query) -> scores [Q, way]`` for any format.

    Torch tensors (any device; the runner moves and casts them) or NumPy arrays in, a torch
    tensor out.
    The episode is checked first (``contract.check_episode``), so a bad one is one clear
    line whatever the backend. A split export runs its encoder on the support and the
    query and its head on the features; ``encode(images)`` is the encoder alone.
    """

    def __init__(self, path: Path, info: ArtifactInfo, backend: str, graphs: dict[str, GraphFn],
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 close: Callable[[], None] | None = None):
        self.path, self.info, self.backend = Path(path), info, backend
        self.graphs = graphs
        self._context = context
        self._close = close

    @torch.inference_mode()
    def __call__(self, support, support_labels, query) -> torch.Tensor:
        support, support_labels, query = (torch.as_tensor(t) for t in (support, support_labels, query))
        check_episode(support, support_labels, query, image_size=self.info.image_size,
                      precision=self.info.precision)
        with self._context():
            if "episode" in self.graphs:
                return self.graphs["episode"](support, support_labels, query)
            encode = self.graphs["encoder"]
            return self.graphs["head"](encode(support), support_labels, encode(query))

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """Backbone features ``[N, 640, h, w]`` (the encoder of a split export)."""
        if "encoder" not in self.graphs:
            raise DMFExportError(f"{self.path}: encode() needs the encoder of a split export")
        with self._context():
            return self.graphs["encoder"](images)

    @property
    def splittable(self) -> bool:
        """Whether the encoder and the head run apart (``encode`` once per image, ``head``
        per episode on the features): a split export, or a server with both models."""
        return "encoder" in self.graphs and "head" in self.graphs

    @torch.inference_mode()
    def head(self, support_features, support_labels, query_features) -> torch.Tensor:
        """Scores ``[Q, way]`` from backbone features (the head of a split export)."""
        if "head" not in self.graphs:
            raise DMFExportError(f"{self.path}: head() needs the head of a split export")
        with self._context():
            return self.graphs["head"](support_features, support_labels, query_features)

    def close(self) -> None:
        """Free what the runner holds beyond memory (``close``, given by a format that
        holds a server process); a no-op for most."""
        if self._close is not None:
            self._close()


# ------------------------------------------------------------------------- a format

def gpu_available() -> bool:
    """Whether torch sees a CUDA GPU (one place, so that a test can pretend it does)."""
    return torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Option:
    """An export option that only some formats read: one field of ``export.ExportOptions``
    and one flag of ``dmf-export export`` (``--name-with-dashes``). Declared by the formats
    that read it (one object, shared by reference when two formats read it); given to a
    format that does not declare it, refused in one line."""

    name: str
    default: object
    help: str
    kind: str = "text"             # text | int | number | choice | file | new-file | folder | list
    choices: tuple[str, ...] = ()  # choice, list: the allowed values
    minimum: float | None = None   # int, number: the smallest allowed value
    open_minimum: bool = False     # number: the minimum itself is not allowed
    maximum: float | None = None   # int, number: the largest allowed value

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value) -> None:
        """DMFExportError, one line naming the flag, unless ``value`` is allowed."""
        if value is None or value == self.default:
            return
        if self.kind in ("choice", "list"):
            values = value if self.kind == "list" else (value,)
            unknown = [v for v in values if v not in self.choices]
            if unknown or not values:
                raise DMFExportError(f"{self.flag}: choose from {', '.join(self.choices)} "
                                     f"(got {', '.join(map(str, unknown)) or 'none'})")
        if self.minimum is not None and (value < self.minimum or (self.open_minimum and value == self.minimum)):
            relation = ">" if self.open_minimum else "≥"
            raise DMFExportError(f"{self.flag} must be {relation} {self.minimum:g} (got {value})")
        if self.maximum is not None and value > self.maximum:
            raise DMFExportError(f"{self.flag} must be ≤ {self.maximum:g} (got {value})")


class Format:
    """One artifact format. Subclasses set the class attributes and implement
    ``write_graph`` (or ``write``), ``read_info`` and ``open``."""

    name: ClassVar[str]                       # the CLI's --format value
    title: ClassVar[str]                      # how summaries name it
    suffix: ClassVar[str]                     # what export writes
    read_suffixes: ClassVar[tuple[str, ...]] = ()  # also recognised when reading
    graphs: ClassVar[tuple[str, ...]] = ("episode", "split")
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16")
    # the export options only this format (and the others that declare the same Option)
    # reads: fields of ExportOptions and flags of the export command
    options: ClassVar[tuple[Option, ...]] = ()
    # RunOptions switches it accepts besides provider/device/threads
    run_flags: ClassVar[tuple[str, ...]] = ()
    # images the TorchScript encoder takes at a time on a CPU (deploy.Encoder); 0: all
    cpu_batch: ClassVar[int] = 0

    # -- what it needs
    def unavailable(self, device: str = "cpu", purpose: str = "run") -> str | None:
        """Why this machine cannot write (``purpose`` "export") or run ("run") the format
        (one line), or None."""
        return None

    def claims(self, path: Path) -> bool:
        """Whether ``path`` (which may not exist yet) is an artifact of this format."""
        return path.suffix in (self.suffix, *self.read_suffixes)

    @property
    def export_options(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)

    def check_options(self, opts) -> None:
        """Refuse in one line what this format cannot do with ``opts`` (beyond ``unavailable``)."""
        if opts.graph not in self.graphs:
            raise DMFExportError(f"{self.title} artifacts are built for the "
                                 f"{' or '.join(self.graphs)} graph: use --graph {self.graphs[0]}")
        if opts.precision not in self.precisions:
            raise DMFExportError(f"{self.title} artifacts come in {', '.join(self.precisions)}, "
                                 f"not {opts.precision}")

    def verification(self, opts) -> tuple[str | None, dict]:
        """How ``export --verify`` checks what this format wrote from ``opts``: (None, the
        ``open_artifact`` keywords to run it with), or (why it cannot be run here, {})."""
        reason = self.unavailable(opts.device)
        if reason:
            return reason, {}
        if opts.precision == "fp16":
            if not gpu_available():
                return "fp16 artifacts run on a GPU; none here (verify it where one is)", {}
            return None, {"device": "cuda"}
        if opts.precision == "bf16":
            reason = bf16_unavailable()
            if reason:
                return reason, {}
        return None, {"device": opts.device}

    # -- writing
    def outputs(self, checkpoint: str, opts) -> dict[str, Path]:
        """Where each graph goes: {'episode': p} or {'encoder': p1, 'head': p2}."""
        if opts.output:
            base = Path(opts.output)
            if base.suffix == self.suffix:
                base = base.with_suffix("")
        else:
            stem = strip_checkpoint_suffix(Path(checkpoint).name) + self.name_tags(opts)
            base = Path(checkpoint).parent / stem
        if opts.graph == "episode":
            return {"episode": Path(f"{base}{self.suffix}")}
        return {g: Path(f"{base}.{g}{self.suffix}") for g in GRAPHS["split"]}

    def staged(self, outputs: dict[str, Path]) -> list[Path]:
        """Every file (or folder) that lands with ``outputs`` (an engine's JSON, say)."""
        return list(outputs.values())

    def name_tags(self, opts) -> str:
        """What a default output name says beyond the checkpoint's (``.fp16``, ``.plugin``)."""
        return "" if opts.precision == "fp32" else f".{opts.precision}"

    def write(self, job, outputs: dict[str, Path], staging: Staging, log: Log) -> list[Written]:
        """Write every graph of ``job`` to its staging name (committed by the caller)."""
        written = []
        for graph, final in outputs.items():
            log(f"writing {self.name} {graph} graph → {final}")
            start = time.perf_counter()
            try:
                self.write_graph(job, graph, staging.temp(final), log)
            except DMFExportError:
                raise
            except Exception as err:  # the exporters' own errors are long; keep the gist
                raise DMFExportError(f"{self.name} export of the {graph} graph failed: "
                                     f"{summarize(err)}") from err
            written.append(Written(final, graph, time.perf_counter() - start))
        return written

    def write_graph(self, job, graph: str, path: Path, log: Log) -> None:
        raise NotImplementedError

    # -- reading and running
    def read_info(self, path: Path) -> ArtifactInfo:
        raise NotImplementedError

    def open(self, path: Path, info: ArtifactInfo, run: RunOptions) -> Runner:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name}>"


# ------------------------------------------------------------------------- the export job

@dataclasses.dataclass
class Job:
    """What a format writes from: the deployment graph(s) of one checkpoint, in the
    export's precision, with the metadata every artifact carries (``export.prepare_job``
    makes one from a checkpoint file)."""

    checkpoint: str
    opts: object                       # dmf_export.export.ExportOptions
    model: torch.nn.Module             # the eager model the graphs were built from
    modules: dict[str, torch.nn.Module]
    cpu_batch: int = 0
    # what a format computes once per export and reuses for each graph (int8 calibration images)
    cache: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, checkpoint: str, opts, model: torch.nn.Module, cpu_batch: int = 0) -> "Job":
        """The deployment graphs of ``model`` for ``opts`` (``cpu_batch``: images the
        encoder takes at a time on a CPU; 0: all)."""
        episode = build_episode_graph(model, solver=opts.solver, steps=opts.steps, cpu_batch=cpu_batch)
        episode = episode.to(torch.float16 if opts.precision == "fp16" else torch.float32).eval()
        if opts.precision == "bf16":  # the backbone in bf16 between fp32 images and features
            episode.encoder = Bfloat16Encoder(episode.encoder).eval()
        modules = {"episode": episode, "encoder": episode.encoder, "head": episode.head}
        return cls(checkpoint, opts, model, modules, cpu_batch)

    def for_format(self, fmt: "Format") -> "Job":
        """This job as ``fmt`` writes it (its own encoder batching), rebuilt only if needed."""
        return self if fmt.cpu_batch == self.cpu_batch else Job.build(self.checkpoint, self.opts, self.model,
                                                                      fmt.cpu_batch)

    @property
    def groups(self) -> int:
        return self.model.groups

    @property
    def kernel(self) -> int:
        return self.model.kernel

    @property
    def dtype(self) -> torch.dtype:
        """The graphs' input and output dtype (bf16 graphs take and give fp32)."""
        return torch.float16 if self.opts.precision == "fp16" else torch.float32

    def info(self, fmt: str, graph: str, **extra) -> ArtifactInfo:
        """The one metadata schema (``contract.ArtifactInfo``), as stored in every artifact."""
        opts = self.opts
        return ArtifactInfo(
            format=fmt, graph=graph, precision=opts.precision, image_size=opts.image_size,
            groups=self.groups, kernel=self.kernel, solver=opts.solver, steps=opts.steps,
            example=dataclasses.asdict(EpisodeSize(opts.way, opts.shot, opts.queries)),
            checkpoint=Path(self.checkpoint).name, dmf_export_version=__version__, **extra)
