"""The one place that knows the artifacts' I/O contract (docs/artifacts.md).

Input and output names, their dims and which axes are dynamic, the backbone's feature
size and channels, the metadata every artifact carries, the seeded episodes that
``verify`` and ``bench`` feed, the default tolerances and the episode checks. It imports
nothing of the project but its errors: the model, the exporters and the Triton writer
all read it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterable

import torch

from dmf_export.errors import DMFExportError

EPISODE_INPUTS = ("support", "support_labels", "query")
EPISODE_OUTPUTS = ("scores",)
ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("features",)
HEAD_INPUTS = ("support_features", "support_labels", "query_features")
HEAD_OUTPUTS = ("scores",)
GRAPH_IO = {"episode": (EPISODE_INPUTS, EPISODE_OUTPUTS), "encoder": (ENCODER_INPUTS, ENCODER_OUTPUTS),
            "head": (HEAD_INPUTS, HEAD_OUTPUTS)}

DEFAULT_IMAGE_SIZE = 84
IMAGE_CHANNELS = 3
FEATURE_CHANNELS = 640  # the ResNet-12 backbone's last block
POOLINGS = 3            # the backbone's max-pools that reach the features (ceil mode)

# Every tensor's dims, in order: a number, "H" (the image size), "h" (the feature size),
# or the name of a dynamic axis (S support images, way classes, Q queries, N images).
# Axes with one name are one size across a graph's tensors.
DYNAMIC_AXES = ("S", "way", "Q", "N")
_IMAGES = ("N", IMAGE_CHANNELS, "H", "H")
TENSORS = {
    "episode": {"support": ("S", IMAGE_CHANNELS, "H", "H"), "support_labels": ("S", "way"),
                "query": ("Q", IMAGE_CHANNELS, "H", "H"), "scores": ("Q", "way")},
    "encoder": {"images": _IMAGES, "features": ("N", FEATURE_CHANNELS, "h", "h")},
    "head": {"support_features": ("S", FEATURE_CHANNELS, "h", "h"), "support_labels": ("S", "way"),
             "query_features": ("Q", FEATURE_CHANNELS, "h", "h"), "scores": ("Q", "way")},
}


def feature_size(image_size: int) -> int:
    """The features' height and width for ``image_size`` images (84 → 11)."""
    size = image_size
    for _ in range(POOLINGS):
        size = -(-size // 2)
    return size


def tensor_dims(graph: str, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, list[int]]:
    """{tensor name: dims} of ``graph``'s inputs and outputs, -1 where dynamic (as
    Triton's config.pbtxt and TensorRT's shapes write them)."""
    sizes = {"H": image_size, "h": feature_size(image_size)}
    return {name: [-1 if d in DYNAMIC_AXES else sizes.get(d, d) for d in dims]
            for name, dims in TENSORS[graph].items()}


# how messages name each dynamic axis
AXIS_WORDS = {"S": "images (S = way·shot)", "way": "classes (way)", "Q": "queries (Q)", "N": "images (N)"}


def episode_shapes(size: "EpisodeSize", image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, tuple[int, ...]]:
    """{input name: shape} of the episode graph's inputs for an episode of ``size``."""
    sizes = {"S": size.support, "way": size.way, "Q": size.queries, "H": image_size}
    return {name: tuple(sizes.get(d, d) for d in TENSORS["episode"][name]) for name in EPISODE_INPUTS}


def dynamic_axes(graph: str) -> dict[str, dict[int, str]]:
    """{input name: {axis: dynamic axis name}} of ``graph``'s inputs (what torch.export's
    dynamic shapes and ONNX's dynamic axes say)."""
    inputs = GRAPH_IO[graph][0]
    return {name: {axis: d for axis, d in enumerate(TENSORS[graph][name]) if d in DYNAMIC_AXES}
            for name in inputs}

METADATA_KEY = "dmf_export"  # ONNX metadata_props key / TorchScript extra file name


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    min_agreement: float  # fraction of queries whose arg-max must match the eager model


TOLERANCES = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-4, min_agreement=1.0),
    "fp16": Tolerance(rtol=1e-2, atol=1e-2, min_agreement=0.99),
    # measured drift of the bf16 backbone: at most 5.8e-3 · (1 + |score|) (README)
    "bf16": Tolerance(rtol=2e-2, atol=2e-2, min_agreement=0.99),
    # int8 (the backbone; benchmarks/int8_drift.py, README): on verify's noise episodes the
    # largest share of this tolerance used was 0.89 of rtol = atol = 0.1 at 32×32 (a score
    # 10.5 % off) and 0.51 at 84×84 (5.5 %): twice the worst; agreement as for fp16
    "int8": Tolerance(rtol=2e-1, atol=2e-1, min_agreement=0.99),
}


@dataclasses.dataclass(frozen=True)
class EpisodeSize:
    way: int
    shot: int
    queries: int

    @property
    def support(self) -> int:
        return self.way * self.shot

    def __str__(self) -> str:
        return f"{self.way}w{self.shot}s{self.queries}q"


# verify runs these besides the export-time size: one-shot, many-shot, fewer and more
# classes than the usual 5, and a single query.
VERIFY_SIZES = (
    EpisodeSize(5, 1, 10),
    EpisodeSize(5, 5, 6),
    EpisodeSize(3, 2, 4),
    EpisodeSize(10, 1, 3),
    EpisodeSize(2, 1, 1),
)


def make_episode(size: EpisodeSize, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A seeded random episode: normalised-looking images and one-hot labels whose
    classes are shuffled (not in class order), as a user's sampler would give them."""
    gen = torch.Generator().manual_seed(seed)
    support = torch.randn(size.support, 3, image_size, image_size, generator=gen)
    query = torch.randn(size.queries, 3, image_size, image_size, generator=gen)
    classes = torch.arange(size.way).repeat(size.shot)
    classes = classes[torch.randperm(classes.numel(), generator=gen)]
    labels = torch.nn.functional.one_hot(classes, size.way).float()
    return tuple(t.to(device=device, dtype=dtype) for t in (support, labels, query))


@dataclasses.dataclass
class ArtifactInfo:
    """What an artifact says about itself (stored inside it as JSON)."""

    format: str
    graph: str = "episode"         # episode | encoder | head
    precision: str = "fp32"
    image_size: int = DEFAULT_IMAGE_SIZE
    groups: int = 64
    kernel: int = 1
    solver: str = "rk4"
    steps: int = 1
    onnx_flavor: str | None = None
    example: dict | None = None    # the export-time episode size
    checkpoint: str | None = None
    dmf_export_version: str | None = None
    device: str | None = None      # what a compiled package runs on (AOTInductor: cpu, cuda)
    cpu_isa: str | None = None     # the vector instructions a CPU package was compiled for
    calibration: dict | None = None  # int8: the data, split, image count and method calibrated on

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ArtifactInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in fields})


# -- inputs the original would turn into garbage ------------------------------------------

_LARGEST = {name: torch.finfo(dtype).max for name, dtype in
            (("fp16", torch.float16), ("fp32", torch.float32), ("fp64", torch.float64),
             ("bf16", torch.bfloat16))}
_LARGEST["int8"] = _LARGEST["fp32"]  # int8 artifacts take fp32 images (quantized inside)


def check_images(images, *, image_size: int | None, precision: str = "fp32",
                 name: str = "images", channels: int = IMAGE_CHANNELS) -> None:
    """DMFExportError (one line naming ``name``) unless ``images`` is a floating-point
    tensor [N, channels, image_size, image_size] (``image_size`` None: any size) of finite
    values that stay finite in the artifact's ``precision``.

    Any floating dtype passes: the runners cast to the artifact's dtype, and float16 into
    an fp32 artifact is exact (fp32 into an fp16 one rounds as the fp16 graph would).
    Integer images (unnormalised pixels) are refused.
    """
    if precision not in _LARGEST:
        raise ValueError(f"precision must be one of {sorted(_LARGEST)}, got {precision!r}")
    if not isinstance(images, torch.Tensor):
        raise DMFExportError(f"{name} must be a tensor [N, {channels}, H, W], "
                             f"got {type(images).__name__}")
    if images.dim() != 4:
        raise DMFExportError(f"{name} must be [N, {channels}, H, W], got shape "
                             f"{list(images.shape)} ({images.dim()}-D)")
    if not images.is_floating_point():
        raise DMFExportError(f"{name} is {str(images.dtype).replace('torch.', '')}: expected "
                             f"floating-point images, normalised (mean/std) outside the network")
    if images.shape[0] == 0:
        raise DMFExportError(f"{name} is empty: at least one image is needed")
    if images.shape[1] != channels:
        raise DMFExportError(f"{name} has {images.shape[1]} channels, expected {channels} "
                             f"(shape {list(images.shape)}, [N, {channels}, H, W])")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise DMFExportError(f"{name} is {images.shape[2]}×{images.shape[3]}, expected "
                             f"{image_size}×{image_size} (the artifact's image size)")
    finite = torch.isfinite(images).flatten(1).all(1)
    if not finite.all():
        first = int((~finite).nonzero()[0])
        raise DMFExportError(f"{name} has NaN or Inf values (image {first} is the first of "
                             f"{int((~finite).sum())})")
    largest = images.abs().max().item()
    if largest > _LARGEST[precision]:
        raise DMFExportError(f"{name} holds {largest:.4g}, beyond {precision}'s range "
                             f"({_LARGEST[precision]:.6g}): the artifact would see Inf")


def check_episode(support, support_labels, query, *, image_size: int | None,
                  precision: str = "fp32", channels: int = IMAGE_CHANNELS,
                  names: tuple[str, str, str] = EPISODE_INPUTS) -> None:
    """DMFExportError, one line naming the input, for an episode the original would turn
    into garbage or refuse: ``support`` and ``query`` as in ``check_images``;
    ``support_labels`` [S, way] one-hot (every value 0 or 1, every row summing to 1),
    with S the support's images and every class given at least one support image (the
    original divides by the class's count: NaN scores). Returns nothing; casting to the
    artifact's dtype is the runner's (see ``check_images`` for what passes).

    ``channels``, ``image_size`` and ``names`` fit the split head too (features [N, 640,
    h, w], ``HEAD_INPUTS``).
    """
    support_name, labels_name, query_name = names
    check_images(support, image_size=image_size, precision=precision, name=support_name,
                 channels=channels)
    check_images(query, image_size=image_size, precision=precision, name=query_name,
                 channels=channels)
    if support.shape[2:] != query.shape[2:]:
        raise DMFExportError(f"{support_name} is {support.shape[2]}×{support.shape[3]} but "
                             f"{query_name} is {query.shape[2]}×{query.shape[3]}: one size "
                             f"for the episode")
    labels = support_labels
    if not isinstance(labels, torch.Tensor):
        raise DMFExportError(f"{labels_name} must be a one-hot tensor [S, way], "
                             f"got {type(labels).__name__}")
    if labels.dim() != 2:
        hint = " (class indices? give one-hot rows)" if labels.dim() == 1 else ""
        raise DMFExportError(f"{labels_name} must be one-hot [S, way], got shape "
                             f"{list(labels.shape)}{hint}")
    if labels.shape[0] != support.shape[0]:
        raise DMFExportError(f"{labels_name} has {labels.shape[0]} rows but {support_name} "
                             f"has {support.shape[0]} images (one row per support image)")
    labels = labels.double()
    off = ((labels != 0) & (labels != 1)).nonzero()
    if off.numel():
        row, column = (int(i) for i in off[0])
        raise DMFExportError(f"{labels_name} is not one-hot: row {row} holds "
                             f"{labels[row, column].item():g} (only 0 and 1 are allowed)")
    sums = labels.sum(1)
    if (sums != 1).any():
        row = int((sums != 1).nonzero()[0])
        raise DMFExportError(f"{labels_name} is not one-hot: row {row} sums to "
                             f"{sums[row].item():g}, not 1")
    empty = [int(k) for k in (labels.sum(0) == 0).nonzero().flatten()]
    if empty:  # (way >= 1 here: S >= 1 rows each sum to 1)
        which = f"class {empty[0]} has" if len(empty) == 1 else \
            f"classes {', '.join(map(str, empty))} have"
        raise DMFExportError(f"{labels_name}: {which} no support image; the original "
                             f"divides by each class's count (NaN scores)")


def parse_sizes(text: str) -> list[EpisodeSize]:
    """'5w1s75q,5w5s75q' -> sizes (the notation bench and verify print)."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        match = re.fullmatch(r"(\d+)w(\d+)s(\d+)q", item)
        if not match or min(int(g) for g in match.groups()) < 1:
            raise ValueError(f"bad episode size {item!r}: expected e.g. 5w1s75q (way, shot, queries ≥ 1)")
        sizes.append(EpisodeSize(*(int(g) for g in match.groups())))
    return sizes


def unique(sizes: Iterable[EpisodeSize]) -> list[EpisodeSize]:
    seen, out = set(), []
    for s in sizes:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
