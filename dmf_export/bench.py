"""Per-episode latency and peak memory of the eager original and of artifacts, side by side.

Every candidate runs on the same seeded episode in this one process, one after the
other. Besides whole episodes, ``eager backbone`` and the encoder of a split export
time the ResNet-12 alone on the episode's S + Q images: the floor an episode graph is
measured against.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from dmf_export.contract import EpisodeSize, make_episode


@dataclasses.dataclass
class Timing:
    size: str
    name: str
    min_s: float
    median_s: float
    speedup: float | None = None     # eager median ÷ this median, same size, same run
    peak_mb: float | None = None     # peak resident memory above the idle process (CPU)
    gpu_peak_mb: float | None = None  # torch's peak CUDA allocation (torch-based candidates)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_episode(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


class _PeakMemory:
    """Peak RSS of this process during a block, above its RSS when the block began
    (Linux: /proc/self/clear_refs resets the high-water mark). None elsewhere."""

    def __init__(self, device: str):
        self.device, self.extra_mb, self.gpu_mb = device, None, None

    @staticmethod
    def _status(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        peak = self._status("VmHWM")
        if self.base is not None and peak is not None:
            self.extra_mb = max(peak - self.base, 0.0)
        if self.device.startswith("cuda"):
            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        return False


def bench(checkpoint: str, artifacts: Sequence[str], sizes: Sequence[EpisodeSize], *,
          image_size: int | None = None, repeats: int = 3, eager: bool = True,
          backbone: bool = True, provider: str = "cpu", device: str = "cpu",
          threads: int | None = None, log: Callable[[str], None] = lambda _: None) -> list[Timing]:
    from dmf_export.checkpoint import load_checkpoint
    from dmf_export.runtime import open_artifact

    if threads:
        torch.set_num_threads(threads)
    runners = [(str(a), open_artifact(a, provider=provider, device=device, threads=threads))
               for a in artifacts]
    if image_size is None:
        image_size = runners[0][1].info.image_size if runners else 84
    model = load_checkpoint(checkpoint).to(device) if (eager or backbone) else None
    rows: list[Timing] = []
    for size in sizes:
        support, labels, query = make_episode(size, image_size, seed=0, device=device)
        images = torch.cat([support, query])
        candidates = []
        if eager:
            candidates.append(("eager", lambda: model(support, labels, query)))
        if backbone:
            candidates.append(("eager backbone", lambda: model.base(images)))
        for name, runner in runners:
            if runner.info.graph == "encoder":
                candidates.append((f"{name} (encoder only)", lambda r=runner: r.encode(images)))
            candidates.append((name, lambda r=runner: r(support, labels, query)))
        eager_median = None
        for name, fn in candidates:
            with torch.inference_mode(), _PeakMemory(device) as memory:
                times = time_episode(fn, repeats, device=device)
            row = Timing(str(size), name, min(times), statistics.median(times),
                         peak_mb=memory.extra_mb, gpu_peak_mb=memory.gpu_mb)
            if name == "eager":
                eager_median = row.median_s
            elif eager_median:
                row.speedup = eager_median / row.median_s
            log(f"  {size} {name}: min {row.min_s * 1e3:.1f} ms, median {row.median_s * 1e3:.1f} ms"
                + (f", {row.speedup:.2f}× eager" if row.speedup else "")
                + (f", peak +{row.peak_mb:.0f} MB" if row.peak_mb is not None else ""))
            rows.append(row)
    return rows
