"""``evaluate``: the original's test protocol on checkpoints and artifacts alike;
``predict``: classes for a person's own image files, from a support folder.

The figures are test.py's: the accuracy over all queries of all episodes, and
ci95 = 1.96 · std(per-episode accuracy) / √episodes (population std, per-episode
accuracies in float32 as its numpy computed them).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import math
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dmf_export import feature_cache, sniff
from dmf_export.checkpoint import inspect_checkpoint, load_checkpoint
from dmf_export.contract import DEFAULT_IMAGE_SIZE, check_episode, check_images
from dmf_export.data import (
    ORIGINAL_SEED, describe_skipped, draw_episodes, iterate_episodes, load_episode, one_hot,
    open_split, preprocessing_for, query_files, read_images, support_folders,
)
from dmf_export.errors import DMFExportError, summarize
from dmf_export.formats import for_path, open_artifact, read_info
from dmf_export.formats._torch import ExactFloat32, check_device
from dmf_export.triton.remote import DEFAULT_TIMEOUT, MAX_CLIENTS, open_server

CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".tar", ".pt")
PREDICT_BATCH = 75  # queries per call: one test episode's worth
HARDEST = 8  # queries the report shows as pictures, with their episode's support images
CIFAR_IMAGE_SIZE = 32  # CIFAR-FS's images, used at their stored size by its transform
PROGRESS_SECONDS = 10.0  # off a terminal: a progress line this often


def checkpoint_image_size(image_size: int | None, cifar: bool) -> int:
    """The image size a checkpoint runs at: the one given, else the original's (84, or
    CIFAR-FS's 32). An artifact runs at the size it was exported for."""
    return image_size or (CIFAR_IMAGE_SIZE if cifar else DEFAULT_IMAGE_SIZE)


# -- path → runner ---------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry code/ and constants.pkl; a zip checkpoint only data.pkl
    (the legacy, PyTorch 1.4 serialisation is no zip: a checkpoint)."""
    try:
        return sniff.kind_of(path) == sniff.TORCHSCRIPT
    except OSError:
        return False


def is_checkpoint(path) -> bool:
    """A training checkpoint (run eagerly), as opposed to an exported artifact."""
    name = Path(path).name.lower()
    if name.endswith(".pt"):
        return not _is_torchscript(Path(path))
    return name.endswith(CHECKPOINT_SUFFIXES)


class EagerRunner:
    """The eager original from a checkpoint, with the artifact runners' call and their
    episode checks (``contract.check_episode``) at ``image_size``, so that the same data
    gets the same answer, or the same refusal, from a checkpoint as from an artifact."""

    backend = "eager"
    info = None
    splittable = True  # model.base encodes, model.head scores features

    def __init__(self, path, device: str = "cpu", image_size: int = DEFAULT_IMAGE_SIZE):
        check_device(device)
        self.device = torch.device(device)
        self.image_size = image_size
        self.model = load_checkpoint(path).to(self.device)

    def _exact(self):
        # PyTorch 1.4, which test.py ran on, had no TF32: keep a GPU's convolutions IEEE fp32
        return ExactFloat32() if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, support, support_labels, query):
        support, support_labels, query = (torch.as_tensor(t) for t in (support, support_labels, query))
        check_episode(support, support_labels, query, image_size=self.image_size)
        args = [t.to(self.device) for t in (support, support_labels, query)]
        with self._exact():
            return self.model(*args)

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """The backbone's features ``[N, 640, h, w]`` (the eager model's ``base``)."""
        images = torch.as_tensor(images)
        check_images(images, image_size=self.image_size)
        with self._exact():
            return self.model.base(images.to(self.device))

    @torch.inference_mode()
    def head(self, support_features, support_labels, query_features) -> torch.Tensor:
        """Scores from features (the eager model's ``head``, with its feature checks)."""
        args = [torch.as_tensor(t).to(self.device) for t in (support_features, support_labels, query_features)]
        with self._exact():
            return self.model.head(*args)


def open_model(path, *, provider: str = "cpu", device: str = "cpu", threads: int | None = None,
               image_size: int = DEFAULT_IMAGE_SIZE):
    """The runner for ``path``, ``runner(support, support_labels, query) -> scores [Q, way]``:
    a checkpoint runs eagerly (at ``image_size``), anything else is an artifact (a split
    export: its encoder; at the size it was exported for). ``threads``: torch's intra-op
    threads (eager, TorchScript) and onnxruntime's."""
    path = Path(path)
    if not path.exists():  # a Triton repository is a folder; the registry says what else is wrong
        raise DMFExportError(f"{path}: no such file")
    if threads:
        torch.set_num_threads(threads)
    if is_checkpoint(path):
        return EagerRunner(path, device, image_size)
    return open_artifact(path, provider=provider, device=device, threads=threads)


def _check_image_size(path, runner, images: torch.Tensor) -> None:
    info = getattr(runner, "info", None)
    height, width = images.shape[-2:]
    if isinstance(runner, EagerRunner):
        size = runner.image_size
        if (height, width) != (size, size):
            raise DMFExportError(f"{path} (a checkpoint) runs at {size}×{size} images here; these "
                                 f"are {width}×{height} (give --image-size {height} to run it at "
                                 "their size, or preprocess differently)")
        return
    size = getattr(info, "image_size", None)
    if size is not None and (height, width) != (size, size):
        raise DMFExportError(f"{path} takes {size}×{size} images; these are {width}×{height} "
                             f"(export it with --image-size {height}, or preprocess differently)")


def _scores(path, runner, support, support_labels, query, where: str) -> torch.Tensor:
    scores = _call(path, lambda: runner(support, support_labels, query), where)
    return _checked_scores(path, scores, query.shape[0], support_labels.shape[1], where)


def _checked_scores(path, scores, queries: int, way: int, where: str) -> torch.Tensor:
    """``scores`` as a float32 CPU tensor, or one line if they are not ``[queries, way]``
    (a whole episode's call, or a head's on cached features)."""
    scores = torch.as_tensor(scores).detach().float().cpu()
    if tuple(scores.shape) != (queries, way):
        raise DMFExportError(f"{path} returned scores {list(scores.shape)} on {where}; "
                             f"expected {[queries, way]}")
    return scores


def describe(path) -> dict:
    """What a checkpoint or an artifact is, as a JSON-serialisable dict (``inspect``):
    a checkpoint's layout and configuration, or an artifact's format, graph, precision,
    sizes and the metadata its export wrote. Nothing in the file runs (checkpoints are
    read with torch's restricted unpickler; an artifact's metadata is read, not run,
    except TorchScript's, which torch.jit loads without Python pickles)."""
    path = Path(path)
    if not path.exists():
        raise DMFExportError(f"{path}: no such file")
    if path.is_file():
        try:
            kind = sniff.kind_of(path)
        except OSError as err:
            raise DMFExportError(f"{path}: cannot read it ({summarize(err)})") from err
        # an artifact by its content, or by its name where the content says nothing
        # else; anything else is read as a checkpoint, which says what it is if it is not
        if kind in (sniff.PICKLE, sniff.TORCH_ZIP) or (kind not in sniff.ARTIFACT_KINDS and (
                is_checkpoint(path) or not _named_as_artifact(path))):
            return {"kind": "checkpoint", **inspect_checkpoint(path)}
    info = read_info(path)
    report = {"kind": "artifact", "path": str(path), **dataclasses.asdict(info)}
    report["size_bytes"] = (path.stat().st_size if path.is_file() else
                            sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
    if info.format == "onnx":
        report.update(_onnx_graph(path))
    return {key: value for key, value in report.items() if value is not None}


def _named_as_artifact(path: Path) -> bool:
    try:
        for_path(path)
    except DMFExportError:
        return False
    return True


def _onnx_graph(path: Path) -> dict:
    import onnx  # heavy (protobuf schemas): only describing an .onnx needs it

    model = onnx.load(str(path), load_external_data=False)
    return {"opset": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
            "ir_version": model.ir_version, "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "inputs": {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                       for i in model.graph.input},
            "outputs": {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                        for o in model.graph.output},
            "nodes": len(model.graph.node)}


# -- evaluate --------------------------------------------------------------------------

def _margins(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per query: the best other class's score − the true class's (−inf for 1-way);
    float32, kept for every episode (a list of Python floats would take 4× the memory)."""
    true = scores.gather(1, labels[:, None]).squeeze(1)
    others = scores.scatter(1, labels[:, None], float("-inf")).max(1).values
    return (others - true).numpy().astype(np.float32)


def original_figures(correct: Sequence[int], queries: int) -> tuple[float, float]:
    """(accuracy, ci95) as test.py computes them from per-episode correct counts.

    Its accuracy is an AverageMeter of float32 batch accuracies weighted by their query
    count: the exact fraction here, which prints the same to the digit (the fraction is
    k / (episodes·queries), never within float error of a rounding boundary of 4
    decimals for the usual sizes). Its ci95 is ``1.96 * np.std(acc) / np.sqrt(episodes)``
    over the float32 per-episode accuracies (population std).
    """
    if not correct:
        return float("nan"), float("nan")
    accuracy = sum(correct) / (len(correct) * queries)
    per_episode = np.asarray(correct, dtype=np.float32) / np.float32(queries)
    ci95 = 1.96 * float(np.std(per_episode)) / math.sqrt(len(correct))
    return accuracy, ci95


@dataclasses.dataclass
class ModelResult:
    path: str
    backend: str
    queries: int                   # per episode
    correct: list[int] = dataclasses.field(default_factory=list)  # per episode
    predictions: list[list[int]] = dataclasses.field(default_factory=list)  # per episode, per query
    seconds: float = 0.0           # in the model's calls (encoder and head, or episodes)
    encode_seconds: float = 0.0    # cached: in the encoder
    head_seconds: float = 0.0      # cached: in the head
    # the feature cache's figures (whether it ran, why not, hits, encodes, spills, peak MB)
    feature_cache: dict = dataclasses.field(default_factory=dict)
    # per episode, per query: the best other class's score − the true class's (> 0: wrong)
    margins: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return original_figures(self.correct, self.queries)[0]

    @property
    def ci95(self) -> float:
        return original_figures(self.correct, self.queries)[1]

    def line(self) -> str:
        """test.py's line (it labels the ci95 "std: :"; the figure is the ci95)."""
        return f"Accuracy: {self.accuracy:.2%}, ci95: {self.ci95:.2%}"


@dataclasses.dataclass
class Agreement:
    """One model against the first one given, episode by episode."""

    model: str
    reference: str
    episodes_identical: int        # episodes where every query's prediction is the same
    queries_identical: int
    queries: int
    accuracy_difference: float     # |overall accuracy − the reference's|
    largest_episode_difference: float  # the largest |episode accuracy − the reference's|
    largest_episode: int | None    # which episode that was (first of equals)


def compare(result: ModelResult, reference: ModelResult) -> Agreement:
    same_episodes = same_queries = 0
    largest, where = 0.0, None
    for index, (mine, theirs) in enumerate(zip(result.predictions, reference.predictions)):
        matches = sum(a == b for a, b in zip(mine, theirs))
        same_queries += matches
        same_episodes += matches == len(mine)
        gap = abs(result.correct[index] - reference.correct[index]) / result.queries
        if gap > largest:
            largest, where = gap, index
    return Agreement(result.path, reference.path, same_episodes, same_queries,
                     result.queries * len(result.predictions),
                     abs(result.accuracy - reference.accuracy), largest, where)


@dataclasses.dataclass
class Evaluation:
    data: str
    split: str
    layout: str
    episodes: int
    way: int
    shot: int
    queries_per_class: int
    seed: int
    normalization: str
    models: list[ModelResult]
    episode_classes: list[list[str]]
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0     # reading the split's index or pickle, sampling episodes
    data_seconds: float = 0.0      # decoding + preprocessing, summed over the workers
    data_wait_seconds: float = 0.0  # the evaluation loop waiting for the next episode
    error: str | None = None       # why the run ended before its last episode (a server died)
    # the episodes as drawn, and the split and preprocessing they came from: the hardest
    # queries' images (never in to_dict; a report reads their pixels through ``pixels``)
    draws: list = dataclasses.field(default_factory=list, repr=False)
    source: tuple | None = dataclasses.field(default=None, repr=False)

    def agreements(self) -> list[Agreement]:
        return [compare(result, self.models[0]) for result in self.models[1:]]

    def to_dict(self) -> dict:
        run = self.wall_seconds - self.setup_seconds
        return {
            "data": self.data, "split": self.split, "layout": self.layout,
            "episodes": self.episodes, "way": self.way, "shot": self.shot,
            "queries_per_class": self.queries_per_class, "seed": self.seed,
            "normalization": self.normalization,
            "episodes_completed": len(self.episode_classes), "error": self.error,
            "models": [{"path": r.path, "backend": r.backend, "accuracy": r.accuracy,
                        "ci95": r.ci95, "seconds": r.seconds,
                        "encode_seconds": r.encode_seconds, "head_seconds": r.head_seconds,
                        "feature_cache": r.feature_cache,
                        "episodes_per_second": len(r.correct) / r.seconds if r.seconds else None}
                       for r in self.models],
            "agreement": [dataclasses.asdict(a) for a in self.agreements()],
            "timing": {"wall_seconds": self.wall_seconds, "setup_seconds": self.setup_seconds,
                       "data_seconds": self.data_seconds,
                       "data_wait_seconds": self.data_wait_seconds,
                       "data_share": self.data_seconds / run if run > 0 else None,
                       "data_wait_share": self.data_wait_seconds / run if run > 0 else None,
                       # the cached path's split of the models' time: encoder, head
                       "encode_seconds": sum(r.encode_seconds for r in self.models),
                       "head_seconds": sum(r.head_seconds for r in self.models),
                       "encode_share": sum(r.encode_seconds for r in self.models) / run if run > 0 else None,
                       "head_share": sum(r.head_seconds for r in self.models) / run if run > 0 else None,
                       "episodes_per_second": len(self.episode_classes) / run if run > 0 else None},
            "per_episode": [
                {"episode": index, "classes": classes,
                 "correct": {r.path: r.correct[index] for r in self.models},
                 "accuracy": {r.path: r.correct[index] / r.queries for r in self.models},
                 # labels index "classes", in the order the model saw the queries
                 "query_labels": [label for _, label in self.draws[index].query]
                 if index < len(self.draws) else None,
                 "predicted": {r.path: r.predictions[index] for r in self.models
                               if index < len(r.predictions)}}
                for index, classes in enumerate(self.episode_classes)],
            "hardest": self.hardest(),
        }

    def _image(self, index: int) -> dict:
        """An image of the split: its index there and, for image folders, its file."""
        paths = getattr(self.source[0], "paths", None) if self.source else None
        return {"index": index, "file": str(paths[index]) if paths is not None else None}

    def hardest(self, count: int = HARDEST) -> list[dict]:
        """The ``count`` hardest queries: wrong for the most models, then by the largest
        margin of a wrong class over the true one; each with its episode's support set."""
        if not self.draws or not self.models or not self.models[0].margins:
            return []
        ranked = []
        for e, episode in enumerate(self.draws[:len(self.models[0].margins)]):
            for q, (_, label) in enumerate(episode.query):
                margins = [r.margins[e][q] for r in self.models]
                wrong = sum(r.predictions[e][q] != label for r in self.models)
                worst = max((float(m) for m in margins if math.isfinite(m)), default=-math.inf)
                ranked.append((wrong, worst, -e, -q))
        out = []
        for _, _, minus_episode, minus_query in sorted(ranked, reverse=True)[:count]:
            e, q = -minus_episode, -minus_query  # negated so that ties go to the earliest
            episode, classes = self.draws[e], self.episode_classes[e]
            image, label = episode.query[q]
            out.append({
                "episode": e, "query": q, "class": classes[label], **self._image(image),
                "predicted": {r.path: classes[r.predictions[e][q]] for r in self.models},
                "margin": {r.path: float(r.margins[e][q]) if math.isfinite(r.margins[e][q]) else None
                           for r in self.models},
                "support": [{"class": classes[k], **self._image(i)} for i, k in episode.support]})
        return out

    def pixels(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` of the split's images at ``indices``, as the models saw
        them before normalisation (resized and cropped)."""
        if self.source is None:
            raise DMFExportError("this evaluation holds no dataset to read images from")
        split, preprocessing = self.source
        return split.pixels(list(indices), preprocessing)


class _Progress:
    """A tqdm bar when stderr is a terminal; off a terminal, a line every
    ``PROGRESS_SECONDS`` (done, rate, ETA), so a long run in a log is never silent.
    ``enabled`` False: neither."""

    def __init__(self, total: int, enabled: bool | None):
        self.total, self.done = total, 0
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="episode", dynamic_ncols=True, file=sys.stderr,
                        disable=not terminal or enabled is False)
        self.lines = enabled is not False and not terminal
        self.started = self.last = time.perf_counter()

    def update(self, accuracy: float) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"accuracy {accuracy:.2%}", refresh=False)
        self.bar.update()
        now = time.perf_counter()
        if self.lines and now - self.last >= PROGRESS_SECONDS and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.started)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"episode {self.done}/{self.total} ({self.done / self.total:.1%}), "
                  f"{rate:.2f} episodes/s, ETA {_duration(eta)}, accuracy {accuracy:.2%}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400 * 2:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds / 86400:.0f} days"


def evaluate(paths: Sequence, data_root, *, split: str = "test", layout: str | None = None,
             episodes: int = 2000, way: int = 5, shot: int = 1, queries_per_class: int = 15,
             seed: int = ORIGINAL_SEED, cifar: bool = False, all_images: bool = False,
             provider: str = "cpu", device: str = "cpu", threads: int | None = None,
             workers: int = 2, progress: bool | None = None, image_size: int | None = None,
             cache: bool = True, cache_mb: float | None = None, cache_overflow: str = "spill",
             servers: Sequence[str] = (), protocol: str = "http", timeout: float = DEFAULT_TIMEOUT,
             clients: int = 1, log: Callable[[str], None] = lambda _: None) -> Evaluation:
    """Every model in ``paths`` (or the models served at ``servers``) on the same
    ``episodes`` of ``split``, as test.py runs them. ``image_size``: what a checkpoint runs
    at (default 84, or 32 with ``cifar``); artifacts run at their own and refuse any other.

    A model whose encoder and head run apart (a checkpoint, a split export, a server with
    both) encodes each distinct image once (``feature_cache``; ``cache`` False: not);
    ``cache_mb`` caps the features held in memory (default ``feature_cache.default_cap_mb``),
    beyond it they are spilled to a temporary file or encoded again (``cache_overflow``).
    Its first episode is also run uncached: if the scores differ in any bit (an encoder
    whose arithmetic depends on the batch), that model runs uncached and says so.
    A whole-episode model decodes each episode (``data.PREFETCH_EPISODES`` ahead).
    The episode list is drawn first and kept (the report keeps it anyway: ~1 KB an episode).
    A model failing mid-run (a server that dies) ends the run with ``error`` set and the
    episodes completed so far in the figures. ``clients``: requests in flight (servers)."""
    if servers and paths:
        raise DMFExportError("--server evaluates the served models: give no model paths with it "
                             "(evaluate local models in a run of their own)")
    if not paths and not servers:
        raise DMFExportError("give at least one checkpoint or artifact, or --server")
    if episodes < 1:
        raise DMFExportError(f"--episodes must be ≥ 1 (got {episodes})")
    if not 1 <= clients <= MAX_CLIENTS:
        raise DMFExportError(f"--clients must be between 1 and {MAX_CLIENTS} (got {clients})")
    if cache_mb is not None and cache_mb < 0:
        raise DMFExportError(f"--cache-mb must be ≥ 0 (got {cache_mb})")
    if cache_overflow not in feature_cache.OVERFLOWS:
        raise DMFExportError(f"--cache-overflow: choose from {', '.join(feature_cache.OVERFLOWS)}")
    start = time.perf_counter()
    data = open_split(data_root, split, layout, all_images)
    drawn = list(draw_episodes(data, episodes, way, shot, queries_per_class, seed))
    log(f"{data.where}: {len(data.class_ids)} classes, {len(data)} images ({data.layout}); "
        f"{episodes} episodes of {way}-way {shot}-shot, {queries_per_class} queries per class, "
        f"seed {seed}")
    warning = describe_skipped(data.skipped)
    if warning:
        log(f"Warning: {data.where}: {warning}")
    size = checkpoint_image_size(image_size, cifar)
    if servers:
        runners = [open_server(list(servers), protocol=protocol, timeout=timeout)]
        paths = [", ".join(servers)]
    else:
        runners = [open_model(p, provider=provider, device=device, threads=threads, image_size=size)
                   for p in paths]
    preprocessing = preprocessing_for(cifar)
    results = [ModelResult(str(p), getattr(r, "backend", "?"), way * queries_per_class)
               for p, r in zip(paths, runners)]
    evaluation = Evaluation(str(data_root), split, data.layout, episodes, way, shot,
                            queries_per_class, seed, "cifar-fs" if cifar else "imagenet", results,
                            [])
    evaluation.source = (data, preprocessing)
    evaluation.draws = drawn
    first = load_episode(data, drawn[0], preprocessing)
    for path, runner in zip(paths, runners):
        _check_image_size(path, runner, first.query)
    cached = _choose_cached(paths, runners, results, first, cache, log)
    evaluation.setup_seconds = time.perf_counter() - start
    bar = _Progress(episodes, progress)
    right = 0
    try:
        with contextlib.ExitStack() as stack:
            for runner in runners:  # a server's clients, a local repository's server
                if callable(getattr(runner, "close", None)):
                    stack.callback(runner.close)
            stack.enter_context(contextlib.closing(bar))
            # servers: up to ``clients`` requests in flight (encode batches and heads, or
            # episodes); local models: one call at a time, in this thread
            requests = stack.enter_context(contextlib.closing(_Requests(clients if servers else 1)))
            jobs = _episode_jobs(evaluation, data, drawn, preprocessing, paths, runners, results,
                                 cached, workers, cache_mb, cache_overflow, requests, stack, log)
            stream = requests.in_order((lambda job=job: (job[0], job[1], [fn() for fn in job[2]]))
                                       for job in jobs)
            stack.enter_context(contextlib.closing(stream))
            for index, query_labels, all_scores in stream:
                episode = drawn[index]
                for result, scores in zip(results, all_scores):
                    predicted = scores.argmax(1)
                    result.predictions.append(predicted.tolist())
                    result.correct.append(int((predicted == query_labels).sum()))
                    result.margins.append(_margins(scores, query_labels))
                evaluation.episode_classes.append(
                    [data.class_names.get(c, str(c)) for c in episode.classes])
                right += results[0].correct[-1]  # a running sum: the figures' own are O(episodes)
                bar.update(right / ((index + 1) * results[0].queries))
    except DMFExportError as err:
        if not evaluation.episode_classes:
            raise
        evaluation.error = str(err)
        for result in results:  # a model may have scored an episode the others did not
            del result.correct[len(evaluation.episode_classes):]
            del result.predictions[len(evaluation.episode_classes):]
            del result.margins[len(evaluation.episode_classes):]
    evaluation.wall_seconds = time.perf_counter() - start
    return evaluation


class _Requests:
    """Requests to the models, ``clients`` at a time, results taken in order.

    One pool of ``clients`` threads (its own: ``data.prefetched``'s decoding pool is capped
    at ``data.MAX_WORKERS``, --clients at ``remote.MAX_CLIENTS``) shared by the streams of
    a run: the cached path's encode batches and its heads, or the uncached path's episodes.
    No request waits on another (a head's features are gathered in the calling thread
    before it is submitted), so sharing the pool cannot deadlock, and at most ``clients``
    requests are in flight in all. Each stream runs at most ``clients`` tasks ahead, so
    memory is bounded by ``clients`` × (one episode's features or images + one encode
    batch's features). ``clients`` 1: each task runs in the calling thread when taken."""

    def __init__(self, clients: int):
        self.clients = clients
        self.pool = (concurrent.futures.ThreadPoolExecutor(clients, thread_name_prefix="dmf-request")
                     if clients > 1 else None)

    def in_order(self, tasks) -> Iterator:
        if self.pool is None:
            return (task() for task in tasks)
        return self._ahead(iter(tasks))

    def _ahead(self, tasks) -> Iterator:
        pending: collections.deque = collections.deque()
        try:
            for task in itertools.islice(tasks, self.clients):
                pending.append(self.pool.submit(task))
            while pending:
                result = pending.popleft().result()
                task = next(tasks, None)
                if task is not None:
                    pending.append(self.pool.submit(task))
                yield result
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _choose_cached(paths, runners, results, first, cache: bool, log) -> list[int]:
    """The models that run on cached features: splittable ones, unless ``cache`` is off or
    their first episode's scores through the cache differ from their own call's."""
    chosen = []
    for k, (path, runner, result) in enumerate(zip(paths, runners, results)):
        if not cache:
            result.feature_cache = {"used": False, "reason": "--no-feature-cache"}
            continue
        if not getattr(runner, "splittable", False):
            reason = ("a whole-episode graph (its input is images, not features): each episode "
                      "encodes its images (export with --graph split to encode each image once)")
            log(f"{path}: uncached, {reason}")
            result.feature_cache = {"used": False, "reason": reason}
            continue
        own, _, through_cache = _through_cache(path, runner, first.support, first.support_labels,
                                               first.query, "episode 0 (checking the cache)")
        if not torch.equal(own, through_cache):
            difference = float((own - through_cache).abs().max())
            reason = (f"encoding in batches of {feature_cache.ENCODE_BATCH} changes its scores on "
                      f"episode 0 (by up to {difference:.3g}): its encoder's arithmetic depends on "
                      "the batch here, so it runs uncached to keep the episode graph's digits")
            log(f"{path}: {reason}")
            result.feature_cache = {"used": False, "reason": reason}
            continue
        chosen.append(k)
    return chosen


def _through_cache(path, runner, support, support_labels, query, where: str):
    """(``runner``'s own scores, the features encoded in fixed-size batches, the head's
    scores on them): the cached path must give the own scores to the bit."""
    own = _scores(path, runner, support, support_labels, query, where)
    features = [_call(path, lambda images=images: feature_cache.encode_fixed(runner.encode, images), where)
                for images in (support, query)]
    return own, features, _head_scores(path, runner, features[0], support_labels, features[1], where)


def _call(path, fn, where: str):
    try:
        return fn()
    except DMFExportError:
        raise
    except Exception as err:
        raise DMFExportError(f"{path} failed on {where} ({summarize(err)})") from err


def _episode_jobs(evaluation, data, drawn, preprocessing, paths, runners, results, cached,
                  workers, cache_mb, overflow, requests, stack, log):
    """(episode index, query labels, a scores function per model) for each episode, in
    order: uncached models get their episode's images, cached ones their features."""
    way, queries = evaluation.way, evaluation.way * evaluation.queries_per_class
    uncached = [k for k in range(len(runners)) if k not in cached]
    episodes_stream = None
    if uncached:
        episodes_stream = stack.enter_context(contextlib.closing(
            iterate_episodes(data, drawn, preprocessing, workers)))
    caches = None
    if cached:
        caches = _Caches(evaluation, data, drawn, preprocessing, [runners[k] for k in cached],
                         [results[k] for k in cached], workers, cache_mb, overflow, requests, stack, log)
    for index, episode in enumerate(drawn):
        labels = one_hot([label for _, label in episode.support], way)
        query_labels = torch.as_tensor([label for _, label in episode.query], dtype=torch.int64)
        functions: list = [None] * len(runners)
        if uncached:
            waited = time.perf_counter()
            tensors = next(episodes_stream)
            evaluation.data_wait_seconds += time.perf_counter() - waited
            evaluation.data_seconds += tensors.load_seconds
            for k in uncached:
                functions[k] = _timed_scores(paths[k], runners[k], results[k], tensors.support,
                                             tensors.support_labels, tensors.query, index)
        if cached:
            for k, (support, query) in zip(cached, caches.features(index)):
                functions[k] = _timed_head(paths[k], runners[k], results[k], support, labels, query,
                                           queries, index)
        yield index, query_labels, functions


# the scores functions below run in the request pool's threads with --clients N: their
# seconds are added under a lock (a float's += is a read and a write)
_TIMINGS = threading.Lock()


def _timed_scores(path, runner, result, support, support_labels, query, index):
    def run():
        began = time.perf_counter()
        scores = _scores(path, runner, support, support_labels, query, f"episode {index}")
        spent = time.perf_counter() - began
        with _TIMINGS:
            result.seconds += spent
        return scores
    return run


def _timed_head(path, runner, result, support, labels, query, queries, index):
    def run():
        where = f"episode {index}"
        began = time.perf_counter()
        scores = _call(path, lambda: runner.head(support, labels, query), where)
        spent = time.perf_counter() - began
        with _TIMINGS:
            result.head_seconds += spent
            result.seconds += spent
        return _checked_scores(path, scores, queries, labels.shape[1], where)
    return run


class _Caches:
    """The cached models' stores, fed by one stream of decoded images (each batch is
    encoded by every cached model): one plan, the cap shared equally."""

    def __init__(self, evaluation, data, drawn, preprocessing, runners, results, workers, cache_mb,
                 overflow, requests, stack, log):
        self.evaluation, self.runners, self.results = evaluation, runners, results
        image_size = data.pixels([drawn[0].query[0][0]], preprocessing).shape[1]
        per_image = feature_cache.feature_bytes(image_size)
        cap_mb = feature_cache.default_cap_mb() if cache_mb is None else float(cache_mb)
        capacity = int(cap_mb * 1e6 / len(runners) // per_image)
        self.plan = feature_cache.plan(drawn, capacity, overflow)
        plan = self.plan
        folder = stack.enter_context(contextlib.closing(feature_cache.SpillFolder(plan.spill_slots > 0)))
        if folder.path is not None:
            feature_cache.check_spill_room(folder.path, len(runners) * feature_cache.spill_bytes(plan, image_size))
        shape = (feature_cache.FEATURE_CHANNELS, feature_cache.feature_size(image_size),
                 feature_cache.feature_size(image_size))
        self.stores = [feature_cache.Store(plan.slots, plan.spill_slots, shape, folder.path) for _ in runners]
        default = " (default: min(25% of available memory, 8192 MB))" if cache_mb is None else ""
        log(f"feature cache: {plan.distinct} distinct images in {len(drawn)} episodes "
            f"({plan.uses} uses, {plan.reused} used more than once); {per_image / 1e6:.3f} MB of "
            f"features per image; all reused ones {plan.reused * per_image / 1e6:.0f} MB per model; "
            f"cap {cap_mb:.0f} MB{default} = {capacity} images per model for {len(runners)} "
            f"model(s); in memory at most {plan.slots} per model "
            f"({plan.slots * per_image / 1e6:.0f} MB); beyond the cap: {overflow}"
            + (f" (up to {plan.spill_slots * per_image / 1e6:.0f} MB per model to {folder.path})"
               if plan.spill_slots else "")
            + f"; {plan.encodes} encodes")
        order = [image for step in plan.steps for image in step.encode]
        batches = stack.enter_context(contextlib.closing(
            feature_cache.decoded_batches(data, order, preprocessing, workers)))
        # encoded batches in order, ``requests.clients`` at a time (a server: in flight at once)
        self.encoded = stack.enter_context(contextlib.closing(
            requests.in_order(self._encode_tasks(batches))))
        self.pending = [collections.deque() for _ in runners]
        for result, store in zip(results, self.stores):
            result.feature_cache = {"used": True, "overflow": overflow, "cap_mb": cap_mb,
                                    "capacity_images": capacity, "distinct_images": plan.distinct,
                                    "feature_mb_per_image": per_image / 1e6,
                                    "encode_batch": feature_cache.ENCODE_BATCH}
        self.per_image = per_image
        self.drawn = drawn

    def _encode_tasks(self, batches):
        """A task per decoded batch (taken in the calling thread, which waits for the
        decoding): every cached model's features of it, and the seconds each took."""
        while True:
            waited = time.perf_counter()
            try:
                images, seconds = next(batches)
            except StopIteration:
                return
            self.evaluation.data_wait_seconds += time.perf_counter() - waited
            self.evaluation.data_seconds += seconds
            yield lambda images=images: [self._encode(runner, result, images)
                                         for runner, result in zip(self.runners, self.results)]

    @staticmethod
    def _encode(runner, result, images):
        began = time.perf_counter()
        features = _call(result.path, lambda: feature_cache.encode_fixed(runner.encode, images),
                         "encoding images")
        return features, time.perf_counter() - began

    def _encode_next_batch(self) -> None:
        # the seconds are added here, in the calling thread; with several requests in
        # flight they are the requests' own times, summed (more than the wall time)
        for result, pending, (features, spent) in zip(self.results, self.pending, next(self.encoded)):
            result.encode_seconds += spent
            result.seconds += spent
            pending.extend(features)

    def features(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        step = self.plan.steps[index]
        while len(self.pending[0]) < len(step.encode):
            self._encode_next_batch()
        out = []
        for result, store, pending in zip(self.results, self.stores, self.pending):
            encoded = {image: pending.popleft() for image in step.encode}
            store.encodes += len(encoded)
            out.append(feature_cache.gather(store, step, self.drawn[index], encoded))
            result.feature_cache.update({"encodes": store.encodes, "hits": store.hits,
                                         "spill_writes": store.spills, "spill_reads": store.reads,
                                         "peak_mb": store.peak * self.per_image / 1e6})
        return out


def printable(text: str) -> str:
    """``text`` with control characters escaped as Python writes them (``\\n``,
    ``\\x1b``): a file or class name never moves the cursor or recolours a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- predict ---------------------------------------------------------------------------

@dataclasses.dataclass
class Prediction:
    artifact: str
    backend: str
    support: str
    classes: list[str]
    shots: list[int]               # support images per class
    queries: list[str]
    scores: list[list[float]]      # [query][class]
    feature_cache: bool = False    # the support and the queries encoded once (not per chunk)

    @property
    def predicted(self) -> list[str]:
        return [self.classes[int(np.argmax(row))] for row in self.scores]

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "backend": self.backend,
                "support": {"folder": self.support,
                            "classes": [{"name": n, "images": s} for n, s in zip(self.classes, self.shots)]},
                "feature_cache": self.feature_cache,
                "predictions": [{"query": q, "class": c, "scores": dict(zip(self.classes, row))}
                                for q, c, row in zip(self.queries, self.predicted, self.scores)]}

    def rows(self) -> list[list[str]]:
        """Header and one row per query: file, predicted class, a score per class."""
        header = ["query", "class"] + [f"score_{name}" for name in self.classes]
        return [header] + [[q, c] + [f"{s:.6f}" for s in row]
                           for q, c, row in zip(self.queries, self.predicted, self.scores)]


def predict(path, support_dir, queries: Sequence, *, cifar: bool = False, provider: str = "cpu",
            device: str = "cpu", threads: int | None = None, workers: int = 2,
            image_size: int | None = None, cache: bool = True, servers: Sequence[str] = (),
            protocol: str = "http", timeout: float = DEFAULT_TIMEOUT,
            log: Callable[[str], None] = lambda _: None) -> Prediction:
    """Scores of each query image against the classes of ``support_dir`` (any number of
    images per class: a prototype is its class's mean feature). ``image_size``: as
    ``evaluate``'s. ``log`` gets the warnings (entries skipped, a one-class support).
    ``servers``: the models served there answer (``path`` is None).

    The queries go ``PREDICT_BATCH`` at a time. A model whose encoder and head run apart
    encodes the support once and each chunk of queries once, and runs the head per chunk
    (``cache`` False: each chunk is a whole episode, its support encoded again); as in
    ``evaluate``, the first chunk is also run uncached and must give the same scores to
    the bit, else the model runs uncached and says why."""
    if servers and path is not None:
        raise DMFExportError("--server classifies with the served models: give no ARTIFACT with it")
    if not servers and path is None:
        raise DMFExportError("give an ARTIFACT (a checkpoint or any artifact), or --server")
    skipped: list = []
    classes = support_folders(support_dir, skipped)
    query_paths = query_files(queries, skipped)
    warning = describe_skipped(skipped)
    if warning:
        log(f"Warning: {warning}")
    if len(classes) == 1:
        log(f"Warning: {support_dir} has one class ({classes[0][0]}): every query gets it; "
            "give two or more class folders for an answer that means something")
    preprocessing = preprocessing_for(cifar)
    with contextlib.ExitStack() as stack:
        if servers:
            runner = open_server(list(servers), protocol=protocol, timeout=timeout)
            path = ", ".join(servers)
        else:
            runner = open_model(path, provider=provider, device=device, threads=threads,
                                image_size=checkpoint_image_size(image_size, cifar))
        if callable(getattr(runner, "close", None)):
            stack.callback(runner.close)
        support_paths = [image for _, images in classes for image in images]
        support = read_images(support_paths, preprocessing, workers)
        _check_image_size(path, runner, support)
        support_labels = one_hot([label for label, (_, images) in enumerate(classes) for _ in images],
                                 len(classes))
        support_features = None  # the cached path's, encoded with the first chunk
        scores: list[list[float]] = []
        for first in range(0, len(query_paths), PREDICT_BATCH):
            chunk = query_paths[first:first + PREDICT_BATCH]
            query = read_images(chunk, preprocessing, workers)
            if query.shape[-2:] != support.shape[-2:]:
                raise DMFExportError(f"{chunk[0]} is {query.shape[-1]}×{query.shape[-2]} after "
                                     f"preprocessing but the support images are "
                                     f"{support.shape[-1]}×{support.shape[-2]}")
            where = f"queries {first + 1}–{first + len(chunk)}"
            if first == 0 and cache:
                checked = _predict_cached(path, runner, support, support_labels, query, where, log)
                cache = checked is not None
                if cache:
                    support_features, chunk_scores = checked
                    scores += chunk_scores.tolist()
                    continue
            if not cache:
                scores += _scores(path, runner, support, support_labels, query, where).tolist()
                continue
            query_features = _call(path, lambda: feature_cache.encode_fixed(runner.encode, query), where)
            scores += _head_scores(path, runner, support_features, support_labels, query_features,
                                   where).tolist()
    return Prediction(str(path), getattr(runner, "backend", "?"), str(support_dir),
                      [name for name, _ in classes], [len(images) for _, images in classes],
                      [str(q) for q in query_paths], scores, bool(cache and support_features is not None))


def _head_scores(path, runner, support_features, support_labels, query_features, where: str) -> torch.Tensor:
    scores = _call(path, lambda: runner.head(support_features, support_labels, query_features), where)
    return _checked_scores(path, scores, query_features.shape[0], support_labels.shape[1], where)


def _predict_cached(path, runner, support, support_labels, query, where: str, log):
    """(support features, the first chunk's scores) where ``runner`` classifies on
    features encoded once: splittable, and the first chunk's scores through its encoder
    and head the same to the bit as its own call's; else None."""
    if not getattr(runner, "splittable", False):
        return None  # a whole-episode graph: each chunk is an episode, as it always was
    own, features, through_cache = _through_cache(path, runner, support, support_labels, query, where)
    if torch.equal(own, through_cache):
        return features[0], own
    log(f"{path}: encoding in batches of {feature_cache.ENCODE_BATCH} changes its scores on the "
        "first queries: its encoder's arithmetic depends on the batch here, so each chunk of "
        "queries runs with its support as one episode")
    return None
