"""Backbone features encoded once per distinct image of the episodes to come.

``evaluate`` draws its episode list first (``data.draw_episodes`` is deterministic and
cheap), so for every image the cache knows each episode that will use it. A dry run of
the policy over that list (``plan``) decides, before any image is decoded, what each
episode encodes, reads back and keeps:

- an image used for the last time is dropped at once;
- when the in-memory store is full, the image used furthest in the future goes
  (Belady's rule, optimal for a known sequence); a newly encoded image that would itself
  be that one is not stored at all;
- what is evicted but used again is written to a memory-mapped file in a temporary
  folder (``overflow="spill"``, removed at the end, also on error) and read back when
  needed, or encoded again (``overflow="recompute"``).

Every encoder call takes exactly ``ENCODE_BATCH`` images (the last batch is padded with
copies of its last image): the arithmetic of an oneDNN convolution can depend on the
batch size (measured: a 32×32 image alone differs in the last bits from the same image
in a batch of 2 or more), so a fixed shape keeps an image's features the same whatever
images share its batch. The images to encode are decoded and preprocessed a few batches
ahead in ``data.prefetched``'s worker threads, overlapped with the encoder.

Memory: the store (at most ``cap_bytes``), one batch of pending features, the decoded
batches ahead, and the plan: for each image the episodes that use it (one int32 per
image use: 2000 episodes × 80 images = 0.6 MB).
"""
from __future__ import annotations

import dataclasses
import heapq
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from dmf_export.contract import FEATURE_CHANNELS, feature_size
from dmf_export.data import Episode, Preprocessing, Split, prefetched, refuse_decompression_bombs
from dmf_export.errors import DMFExportError

# Images per encoder call: every call the same shape (see above). 16 keeps a block's
# activations in cache (deploy.Encoder's cpu_batch, the TorchScript encoder's own chunk).
ENCODE_BATCH = 16
OVERFLOWS = ("spill", "recompute")
# The default cap: a quarter of the memory available when the run starts, at most this
# (a miniImageNet test split at 84×84 is 3.7 GB of features; tieredImageNet's 64 GB
# is never held whole by default).
DEFAULT_CAP_SHARE = 0.25
DEFAULT_CAP_MB_MAX = 8192
FALLBACK_CAP_MB = 1024  # where /proc/meminfo cannot be read
NEVER = np.iinfo(np.int64).max


def available_mb() -> float | None:
    """MemAvailable from /proc/meminfo, in MB (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_cap_mb() -> float:
    """min(25 % of MemAvailable, 8192 MB); 1024 MB where MemAvailable is unknown."""
    available = available_mb()
    if available is None:
        return float(FALLBACK_CAP_MB)
    return min(DEFAULT_CAP_SHARE * available, float(DEFAULT_CAP_MB_MAX))


def feature_bytes(image_size: int) -> int:
    """Bytes of one image's float32 features (84 → 640×11×11×4 = 309,760)."""
    side = feature_size(image_size)
    return FEATURE_CHANNELS * side * side * 4


# -- the plan ---------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    """What one episode does with the store: ``encode`` (in order: the stream of images
    to encode is every step's ``encode`` in turn), ``read`` from the spill file, then,
    once its features are gathered, ``after``: ("spill", image) writes it to the file,
    ("drop", image) frees its slot, ("keep", image) stores a gathered image, in order."""

    encode: list[int]
    read: list[int]
    after: list[tuple[str, int]]


@dataclasses.dataclass
class Plan:
    steps: list[Step]
    capacity: int        # images the store holds
    distinct: int        # distinct images over all episodes
    uses: int            # image uses (episodes × their distinct images)
    reused: int          # distinct images used in more than one episode
    slots: int           # the store's slots actually needed (≤ capacity)
    spill_slots: int     # distinct images the spill file may hold

    @property
    def encodes(self) -> int:
        return sum(len(s.encode) for s in self.steps)


def episode_images(episode: Episode) -> list[int]:
    """An episode's distinct images, support first, in the order the model sees them."""
    return list(dict.fromkeys(index for index, _ in episode.support + episode.query))


def plan(episodes: Sequence[Episode], capacity: int, overflow: str = "spill") -> Plan:
    """The policy's decisions for ``episodes`` with a store of ``capacity`` images."""
    if overflow not in OVERFLOWS:
        raise DMFExportError(f"unknown cache overflow {overflow!r}; choose from {', '.join(OVERFLOWS)}")
    per_episode = [episode_images(e) for e in episodes]
    uses: dict[int, list[int]] = {}
    for e, images in enumerate(per_episode):
        for image in images:
            uses.setdefault(image, []).append(e)
    position = dict.fromkeys(uses, 0)  # index into uses[image] of its current/next use
    stored: dict[int, int] = {}        # image → its next use (the heap's valid key)
    heap: list[tuple[int, int]] = []   # (−next use, image), stale entries skipped
    spilled: set[int] = set()
    steps, most = [], 0

    def furthest() -> tuple[int, int] | None:
        while heap:
            minus_next, image = heap[0]
            if stored.get(image) == -minus_next:
                return -minus_next, image
            heapq.heappop(heap)
        return None

    for e, images in enumerate(per_episode):
        step = Step([], [], [])
        following = {}
        for image in images:
            position[image] += 1
            later = uses[image]
            following[image] = later[position[image]] if position[image] < len(later) else NEVER
            if image in stored:
                continue
            (step.read if image in spilled else step.encode).append(image)
        # the hits' next uses first, so that the choice of a victim below sees them
        hits = {image for image in images if image in stored}
        for image in (i for i in images if i in hits):
            after = following[image]
            if after == NEVER:
                del stored[image]
                step.after.append(("drop", image))
            else:
                stored[image] = after
                heapq.heappush(heap, (-after, image))
        for image in images:
            after = following[image]
            if image in hits or after == NEVER:
                continue
            if len(stored) >= capacity:
                worst = furthest()
                if worst is None or worst[0] <= after:  # this one is the furthest: not stored
                    if overflow == "spill" and image not in spilled:
                        spilled.add(image)
                        step.after.append(("spill", image))
                    continue
                victim = worst[1]
                del stored[victim]
                if overflow == "spill" and victim not in spilled:
                    spilled.add(victim)
                    step.after.append(("spill", victim))
                step.after.append(("drop", victim))
            stored[image] = after
            heapq.heappush(heap, (-after, image))
            step.after.append(("keep", image))
            most = max(most, len(stored))
        steps.append(step)
    return Plan(steps, capacity, len(uses), sum(map(len, per_episode)),
                sum(len(v) > 1 for v in uses.values()), most, len(spilled))


# -- encoding in fixed-size batches ----------------------------------------------------

def encode_fixed(encode: Callable, images: torch.Tensor, batch: int = ENCODE_BATCH) -> torch.Tensor:
    """``encode`` over ``images`` in calls of exactly ``batch`` images (the last padded
    with copies of its last image; their features are dropped)."""
    parts = []
    for first in range(0, images.shape[0], batch):
        chunk = images[first:first + batch]
        real = chunk.shape[0]
        if real < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - real, *chunk.shape[1:])])
        features = torch.as_tensor(encode(chunk)).detach().float().cpu()
        parts.append(features[:real])
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def decoded_batches(split: Split, images: Sequence[int], preprocessing: Preprocessing,
                    workers: int, batch: int = ENCODE_BATCH,
                    ahead: int = 4) -> Iterator[tuple[torch.Tensor, float]]:
    """(normalised ``[≤batch, 3, H, W]``, seconds decoding) of ``images`` in order,
    decoded by ``workers`` threads ``ahead`` batches in advance."""
    refuse_decompression_bombs()

    def task(chunk):
        def run():
            began = time.perf_counter()
            tensor = preprocessing.normalise(split.pixels(chunk, preprocessing))
            return tensor, time.perf_counter() - began
        return run

    chunks = (list(images[i:i + batch]) for i in range(0, len(images), batch))
    return prefetched((task(c) for c in chunks), workers, ahead)


# -- the store --------------------------------------------------------------------------

class Store:
    """Features of one model: ``slots`` in memory and, with spill, a memory-mapped file
    with a slot per image that may be spilled (written only where spilled: sparse)."""

    def __init__(self, slots: int, spill_slots: int, shape: tuple[int, ...], spill_dir: Path | None):
        self.shape = shape
        self.memory = torch.empty((slots, *shape), dtype=torch.float32)  # pages touched as filled
        self.free = list(range(slots - 1, -1, -1))
        self.slot_of: dict[int, int] = {}
        self.spill = None
        self.spill_slot: dict[int, int] = {}
        if spill_slots and spill_dir is not None:
            self.spill = np.lib.format.open_memmap(spill_dir / f"features-{id(self)}.npy", mode="w+",
                                                   dtype=np.float32, shape=(spill_slots, *shape))
        self.hits = self.reads = self.spills = self.encodes = 0
        self.peak = 0

    def get(self, image: int) -> torch.Tensor:
        self.hits += 1
        return self.memory[self.slot_of[image]]

    def read(self, image: int) -> torch.Tensor:
        self.reads += 1
        return torch.from_numpy(np.array(self.spill[self.spill_slot[image]]))

    def write_spill(self, image: int, features: torch.Tensor) -> None:
        self.spills += 1
        slot = self.spill_slot.setdefault(image, len(self.spill_slot))
        self.spill[slot] = features.numpy()

    def keep(self, image: int, features: torch.Tensor) -> None:
        slot = self.free.pop()
        self.memory[slot].copy_(features)
        self.slot_of[image] = slot
        self.peak = max(self.peak, len(self.slot_of))

    def drop(self, image: int) -> None:
        self.free.append(self.slot_of.pop(image))


class SpillFolder:
    """A temporary folder for the spill files, removed on close (also after an error)."""

    def __init__(self, needed: bool):
        self.path = Path(tempfile.mkdtemp(prefix="dmf-features-")) if needed else None

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def gather(store: Store, step: Step, episode: Episode, encoded: dict[int, torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(support features, query features) of ``episode`` from the store, the spill file
    and ``encoded`` (this step's freshly encoded images); then the step's ``after``."""
    current = dict(encoded)
    for image in step.read:
        current[image] = store.read(image)

    def features(image):
        found = current.get(image)
        return store.get(image) if found is None else found

    support = torch.stack([features(i) for i, _ in episode.support])
    query = torch.stack([features(i) for i, _ in episode.query])
    for action, image in step.after:
        if action == "spill":
            store.write_spill(image, store.memory[store.slot_of[image]] if image in store.slot_of
                              else current[image])
        elif action == "drop":
            store.drop(image)
        else:
            store.keep(image, current[image])
    return support, query


def disk_free_mb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e6


def check_spill_room(folder: Path, needed_bytes: int) -> None:
    """One line when the spill file could not fit on its disk."""
    free = disk_free_mb(folder)
    if needed_bytes / 1e6 > free:
        raise DMFExportError(f"the feature cache may spill {needed_bytes / 1e6:.0f} MB to {folder} "
                             f"but only {free:.0f} MB are free there: give a larger --cache-mb, "
                             "--cache-overflow recompute, or TMPDIR on a larger disk")


def spill_bytes(plan_: Plan, image_size: int) -> int:
    return plan_.spill_slots * feature_bytes(image_size)

