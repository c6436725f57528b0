"""Per-episode latency and peak memory of the eager original and of artifacts, side by side.

Every candidate runs on the same seeded episode, one after the other, each in a fresh
process so that its peak memory is its own. A Triton server the user runs (``--server``)
is a candidate too: its latency is what a client sees, and with ``clients`` > 1 that many
requests are kept in flight at once, which gives its throughput (episodes/s) besides. Besides whole episodes, ``eager backbone`` and the encoder of a split export
time the ResNet-12 alone on the episode's S + Q images: the floor an episode graph is
measured against.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from dmf_export import formats
from dmf_export.checkpoint import load_checkpoint
from dmf_export.contract import EpisodeSize, make_episode
from dmf_export.errors import DMFExportError
from dmf_export.formats._torch import check_device
from dmf_export.triton.remote import DEFAULT_TIMEOUT, open_server


@dataclasses.dataclass
class Timing:
    size: str
    name: str
    min_s: float
    median_s: float
    speedup: float | None = None     # eager median ÷ this median, same size, same run
    vs_backbone: float | None = None  # this median ÷ the eager backbone's, same size
    vs_encoder: float | None = None   # this median ÷ its format's split encoder alone, same size
    peak_mb: float | None = None     # peak resident memory above the loaded process (CPU)
    gpu_peak_mb: float | None = None  # torch's peak CUDA allocation (torch-based candidates)
    kind: str | None = None          # eager, backbone, encoder or artifact
    format: str | None = None        # an artifact's or encoder's format, and its precision
    precision: str | None = None
    vs_fp32: float | None = None     # this median ÷ its fp32 twin's (same kind and format), same size
    clients: int | None = None       # a server: requests kept in flight at once
    episodes_per_s: float | None = None  # a server: episodes answered per second with them


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


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """What one child process measures: 'eager', 'backbone', 'encoder', 'artifact' or
    'server' (Triton servers the user runs, ``servers``)."""

    kind: str
    name: str
    checkpoint: str
    path: str | None = None
    family: tuple = ()  # (format, precision): whose encoder-only row is this one's floor
    run_flags: tuple = ()  # the RunOptions switches its format accepts
    servers: tuple = ()    # 'host:port' of the servers a 'server' candidate asks
    graph: str | None = None  # an artifact's: episode, or encoder (a split export's pair)


@dataclasses.dataclass(frozen=True)
class _Settings:
    repeats: int
    provider: str
    device: str
    threads: int | None
    cuda_graph: bool
    tf32: bool
    protocol: str = "http"
    timeout: float = DEFAULT_TIMEOUT
    clients: int = 1


def time_concurrently(fn: Callable[[], object], clients: int, repeats: int) -> tuple[list[float], float]:
    """(each request's latency, episodes per second) with ``clients`` threads each sending
    ``repeats`` requests after one warm-up, all started together."""
    start = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            fn()
        except BaseException as err:  # said once by the caller, after the others finish
            errors.append(err)
        start.wait()
        for _ in range(repeats if not errors else 0):
            began = time.perf_counter()
            try:
                fn()
            except BaseException as err:
                errors.append(err)
                return
            latencies[index].append(time.perf_counter() - began)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    times = [t for per_client in latencies for t in per_client]
    return times, len(times) / wall


def _measure(candidate: _Candidate, size: EpisodeSize, image_size: int,
             settings: _Settings) -> tuple[list[float], float | None, float | None, float | None]:
    """Runs in a fresh process: load, make the seeded episode, then time it; peak memory
    is the process's high-water mark above what it held once loaded (Linux; else None).
    On a GPU every candidate gets cuDNN's autotuner and the same TF32 setting."""
    device, threads = settings.device, settings.threads
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = settings.tf32
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    support, labels, query = make_episode(size, image_size, seed=0, device=device)
    images = torch.cat([support, query])
    runner = None
    if candidate.kind == "server":
        runner = open_server(candidate.servers, protocol=settings.protocol, timeout=settings.timeout)
        fn = lambda: runner(support, labels, query)  # noqa: E731
    elif candidate.kind in ("eager", "backbone"):
        model = load_checkpoint(candidate.checkpoint).to(device)
        fn = (lambda: model(support, labels, query)) if candidate.kind == "eager" else (lambda: model.base(images))
    else:
        flags = candidate.run_flags
        runner = formats.open_artifact(candidate.path, provider=settings.provider, device=device, threads=threads,
                               cuda_graph=settings.cuda_graph and "cuda_graph" in flags,
                               tf32=settings.tf32 and "tf32" in flags)
        fn = (lambda: runner.encode(images)) if candidate.kind == "encoder" else (lambda: runner(support, labels, query))
    loaded = _status_mb("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rate = None
    try:
        with torch.inference_mode():
            if candidate.kind == "server":
                times, rate = time_concurrently(fn, settings.clients, settings.repeats)
            else:
                times = time_episode(fn, settings.repeats, warmup=3 if device.startswith("cuda") else 1,
                                     device=device)
    finally:
        if runner is not None:
            runner.close()  # a Triton server: the pool ends this process without atexit
    peak = _status_mb("VmHWM")
    extra = max(peak - loaded, 0.0) if peak is not None and loaded is not None else None
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return times, extra, gpu, rate


def bench(checkpoint: str, artifacts: Sequence[str], sizes: Sequence[EpisodeSize], *,
          image_size: int | None = None, repeats: int = 3, eager: bool = True,
          backbone: bool = True, provider: str = "cpu", device: str = "cpu",
          threads: int | None = None, cuda_graph: bool = False, tf32: bool = False,
          servers: Sequence[str] = (), protocol: str = "http", timeout: float = DEFAULT_TIMEOUT,
          clients: int = 1, log: Callable[[str], None] = lambda _: None) -> list[Timing]:
    """Each candidate runs in a fresh process (so its peak memory is its own), one after
    another, on the same seeded episode.

    ``servers``: Triton servers the user runs ('host:port'), timed as one candidate
    ("triton @ host:port"), requests spread over them, ``clients`` at a time (its row's
    ``episodes_per_s``; its latencies are each request's, so they grow with ``clients``
    once the servers are busy).

    ``cuda_graph``: TorchScript artifacts replay a captured CUDA graph (``device`` cuda).
    ``tf32``: on a GPU, let fp32 convolutions and matmuls use TF32, for the eager model
    and the artifacts alike (off: IEEE fp32 everywhere, as the 1e-4 parity assumes)."""
    infos = {str(a): formats.read_info(a) for a in artifacts}
    served = None
    if servers:  # checked here, in one line, before minutes of timing
        remote = open_server(servers, protocol=protocol, timeout=timeout)
        served = remote.info
        remote.close()
        if any(info.image_size != served.image_size for info in infos.values()):
            raise DMFExportError(f"{', '.join(servers)} serve {served.image_size}×{served.image_size} "
                                 f"images but the artifacts take another size: one size per bench")
    if image_size is None:
        image_size = next(iter(infos.values())).image_size if infos else served.image_size if served else 84
    candidates = []
    if eager:
        candidates.append(_Candidate("eager", "eager", checkpoint))
    if backbone:
        candidates.append(_Candidate("backbone", "eager backbone", checkpoint))
    check_device(device, cuda_graph)  # refuse before minutes of timing, not after
    for path, info in infos.items():
        fmt = formats.get(info.format)
        if "cuda_graph" in fmt.run_flags:  # torch-based: the device must run it
            check_device(device, path=path, info=info)
        family = (info.format, info.precision)
        tag = " (CUDA graph)" if cuda_graph and "cuda_graph" in fmt.run_flags else ""
        if info.graph == "encoder":
            candidates.append(_Candidate("encoder", f"{path} (encoder only){tag}", checkpoint, path, family,
                                         fmt.run_flags))
        candidates.append(_Candidate("artifact", f"{path}{tag}", checkpoint, path, family, fmt.run_flags,
                                     graph=info.graph))
    if servers:
        candidates.append(_Candidate("server", f"triton @ {', '.join(servers)}"
                                     + (f" ({clients} clients)" if clients > 1 else ""), checkpoint,
                                     family=("triton", served.precision), servers=tuple(servers)))
    settings = _Settings(repeats, provider, device, threads, cuda_graph, tf32, protocol, timeout, clients)
    context = multiprocessing.get_context("spawn")
    rows: list[Timing] = []
    for size in sizes:
        measured = []
        for candidate in candidates:
            with context.Pool(1) as pool:
                times, extra, gpu, rate = pool.apply(
                    _measure, (candidate, size, image_size, settings))
            row = Timing(str(size), candidate.name, min(times), statistics.median(times),
                         peak_mb=extra, gpu_peak_mb=gpu, kind=candidate.kind,
                         format=candidate.family[0] if candidate.family else None,
                         precision=candidate.family[1] if candidate.family else None,
                         clients=clients if candidate.kind == "server" else None, episodes_per_s=rate)
            log(f"  {size} {candidate.name}: min {row.min_s * 1e3:.1f} ms, median {row.median_s * 1e3:.1f} ms"
                + (f", peak +{row.peak_mb:.0f} MB" if row.peak_mb is not None else "")
                + (f", {rate:.2f} episodes/s" if rate is not None else ""))
            measured.append((candidate, row))
        _ratios(measured)
        rows.extend(row for _, row in measured)
    return rows


def _ratios(measured: list) -> None:
    """Fill each row's ratios from the same size's eager, eager-backbone, encoder and fp32
    rows (the fp32 twin: the first fp32 candidate of the same kind, format and graph: an
    episode graph beside an episode graph, a split pair beside a split pair)."""
    medians = {c.kind: r.median_s for c, r in measured if c.kind in ("eager", "backbone")}
    encoders = {c.family: r.median_s for c, r in measured if c.kind == "encoder"}
    fp32 = {}
    for c, r in measured:
        if c.family and c.family[1] == "fp32":
            fp32.setdefault((c.kind, c.family[0], c.graph), r.median_s)
    for candidate, row in measured:
        if candidate.kind != "eager" and "eager" in medians:
            row.speedup = medians["eager"] / row.median_s
        if candidate.kind not in ("eager", "backbone") and "backbone" in medians:
            row.vs_backbone = row.median_s / medians["backbone"]
        if candidate.kind == "artifact" and candidate.family in encoders:
            row.vs_encoder = row.median_s / encoders[candidate.family]
        twin = (candidate.kind, candidate.family[0], candidate.graph) if candidate.family else None
        if twin in fp32 and candidate.family[1] != "fp32":
            row.vs_fp32 = row.median_s / fp32[twin]
