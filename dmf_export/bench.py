"""Per-episode latency of the eager original and of artifacts, on the same inputs."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import torch

from dmf_export.contract import EpisodeSize, make_episode


@dataclasses.dataclass
class Timing:
    size: str
    name: str
    min_s: float
    median_s: float
    speedup: float | None = None  # eager median ÷ this median, same size, same run


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


def bench(checkpoint: str, artifacts: Sequence[str], sizes: Sequence[EpisodeSize], *,
          image_size: int | None = None, repeats: int = 3, eager: bool = True,
          provider: str = "cpu", device: str = "cpu", threads: int | None = None,
          log: Callable[[str], None] = lambda _: None) -> list[Timing]:
    from dmf_export.checkpoint import load_checkpoint
    from dmf_export.runtime import open_artifact

    if threads:
        torch.set_num_threads(threads)
    runners = [(str(a), open_artifact(a, provider=provider, device=device, threads=threads))
               for a in artifacts]
    if image_size is None:
        image_size = runners[0][1].info.image_size if runners else 84
    model = load_checkpoint(checkpoint).to(device) if eager else None
    rows: list[Timing] = []
    for size in sizes:
        support, labels, query = make_episode(size, image_size, seed=0, device=device)
        candidates = []
        if model is not None:
            candidates.append(("eager", lambda: model(support, labels, query)))
        candidates += [(name, lambda r=r: r(support, labels, query)) for name, r in runners]
        eager_median = None
        for name, fn in candidates:
            with torch.inference_mode():
                times = time_episode(fn, repeats, device=device)
            row = Timing(str(size), name, min(times), statistics.median(times))
            if name == "eager":
                eager_median = row.median_s
            elif eager_median:
                row.speedup = eager_median / row.median_s
            log(f"  {size} {name}: min {row.min_s * 1e3:.1f} ms, median {row.median_s * 1e3:.1f} ms"
                + (f", {row.speedup:.2f}× eager" if row.speedup else ""))
            rows.append(row)
    return rows
