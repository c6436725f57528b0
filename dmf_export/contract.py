"""The one place that knows the artifacts' I/O contract (CONTRACT.md).

Input and output names, which axes are dynamic, the metadata every artifact carries,
the seeded episodes that ``verify`` and ``bench`` feed, and the default tolerances.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterable

import torch

from dmf_export.models.dmf import FEATURE_CHANNELS  # noqa: F401  (features are [N, 640, h, w])

EPISODE_INPUTS = ("support", "support_labels", "query")
EPISODE_OUTPUTS = ("scores",)
ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("features",)
HEAD_INPUTS = ("support_features", "support_labels", "query_features")
HEAD_OUTPUTS = ("scores",)

DEFAULT_IMAGE_SIZE = 84
METADATA_KEY = "dmf_export"  # ONNX metadata_props key / TorchScript extra file name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    min_agreement: float  # fraction of queries whose arg-max must match the eager model


TOLERANCES = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-4, min_agreement=1.0),
    "fp16": Tolerance(rtol=1e-2, atol=1e-2, min_agreement=0.99),
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ArtifactInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in fields})


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


def check_episode(support, support_labels, query, *, image_size: int, precision: str = "fp32") -> None:
    """Refuse, in one line naming the input, an episode the graph cannot score."""
    from dmf_export.errors import DMFExportError

    for name, images in (("support", support), ("query", query)):
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[2:] != (image_size, image_size):
            raise DMFExportError(f"{name} has shape {list(shape)}; expected [N, 3, {image_size}, {image_size}]")
    if tuple(support_labels.shape[:1]) != tuple(support.shape[:1]) or len(support_labels.shape) != 2:
        raise DMFExportError(f"support_labels has shape {list(support_labels.shape)}; expected "
                             f"[{support.shape[0]}, way] (one row per support image)")
