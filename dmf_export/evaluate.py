"""``evaluate``: the original's test protocol on checkpoints and artifacts alike;
``predict``: classes for a person's own image files, from a support folder.

The figures are test.py's: the accuracy over all queries of all episodes, and
ci95 = 1.96 · std(per-episode accuracy) / √episodes (population std, per-episode
accuracies in float32 as its numpy computed them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dmf_export.checkpoint import load_checkpoint
from dmf_export.data import (
    ORIGINAL_SEED, iterate_episodes, one_hot, open_split, preprocessing_for, query_files,
    read_images, sample_episodes, support_folders,
)
from dmf_export.errors import DMFExportError, summarize
from dmf_export.formats import open_artifact
from dmf_export.formats._torch import ExactFloat32, check_device

CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".tar", ".pt")
PREDICT_BATCH = 75  # queries per call: one test episode's worth
HARDEST = 8  # queries the report shows as pictures, with their episode's support images


# -- path → runner ---------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry code/ and constants.pkl; a zip checkpoint only data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.endswith("/constants.pkl")
                       for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # the legacy (PyTorch 1.4) serialisation is no zip: a checkpoint


def is_checkpoint(path) -> bool:
    """A training checkpoint (run eagerly), as opposed to an exported artifact."""
    name = Path(path).name.lower()
    if name.endswith(".pt"):
        return not _is_torchscript(Path(path))
    return name.endswith(CHECKPOINT_SUFFIXES)


class EagerRunner:
    """The eager original from a checkpoint, with the artifact runners' call."""

    backend = "eager"
    info = None

    def __init__(self, path, device: str = "cpu"):
        check_device(device)
        self.device = torch.device(device)
        self.model = load_checkpoint(path).to(self.device)

    @torch.inference_mode()
    def __call__(self, support, support_labels, query):
        # PyTorch 1.4, which test.py ran on, had no TF32: keep a GPU's convolutions IEEE fp32
        args = [t.to(self.device) for t in (support, support_labels, query)]
        with ExactFloat32() if self.device.type == "cuda" else contextlib.nullcontext():
            return self.model(*args)


def open_model(path, *, provider: str = "cpu", device: str = "cpu", threads: int | None = None):
    """The runner for ``path``, ``runner(support, support_labels, query) -> scores [Q, way]``:
    a checkpoint runs eagerly, anything else is an artifact (a split export: its encoder).
    ``threads``: torch's intra-op threads (eager, TorchScript) and onnxruntime's."""
    path = Path(path)
    if not path.exists():  # a Triton repository is a folder; the registry says what else is wrong
        raise DMFExportError(f"{path}: no such file")
    if threads:
        torch.set_num_threads(threads)
    if is_checkpoint(path):
        return EagerRunner(path, device)
    return open_artifact(path, provider=provider, device=device, threads=threads)


def _check_image_size(path, runner, images: torch.Tensor) -> None:
    info = getattr(runner, "info", None)
    size = getattr(info, "image_size", None)
    height, width = images.shape[-2:]
    if size is not None and (height, width) != (size, size):
        raise DMFExportError(f"{path} takes {size}×{size} images; these are {width}×{height} "
                             f"(export it with --image-size {height}, or preprocess differently)")


def _scores(path, runner, support, support_labels, query, where: str) -> torch.Tensor:
    try:
        scores = runner(support, support_labels, query)
    except DMFExportError:
        raise
    except Exception as err:
        raise DMFExportError(f"{path} failed on {where} ({summarize(err)})") from err
    scores = torch.as_tensor(scores).detach().float().cpu()
    expected = (query.shape[0], support_labels.shape[1])
    if tuple(scores.shape) != expected:
        raise DMFExportError(f"{path} returned scores {list(scores.shape)} on {where}; "
                             f"expected {list(expected)}")
    return scores


# -- evaluate --------------------------------------------------------------------------

def _margins(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per query: the best other class's score − the true class's (−inf for 1-way)."""
    true = scores.gather(1, labels[:, None]).squeeze(1)
    others = scores.scatter(1, labels[:, None], float("-inf")).max(1).values
    return (others - true).tolist()


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
    seconds: float = 0.0           # in the model's calls
    # per episode, per query: the best other class's score − the true class's (> 0: wrong)
    margins: list[list[float]] = dataclasses.field(default_factory=list)

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
            "models": [{"path": r.path, "backend": r.backend, "accuracy": r.accuracy,
                        "ci95": r.ci95, "seconds": r.seconds,
                        "episodes_per_second": len(r.correct) / r.seconds if r.seconds else None}
                       for r in self.models],
            "agreement": [dataclasses.asdict(a) for a in self.agreements()],
            "timing": {"wall_seconds": self.wall_seconds, "setup_seconds": self.setup_seconds,
                       "data_seconds": self.data_seconds,
                       "data_wait_seconds": self.data_wait_seconds,
                       "data_share": self.data_seconds / run if run > 0 else None,
                       "data_wait_share": self.data_wait_seconds / run if run > 0 else None,
                       "episodes_per_second": self.episodes / run if run > 0 else None},
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
                worst = max((m for m in margins if math.isfinite(m)), default=-math.inf)
                ranked.append((wrong, worst, -e, -q))
        out = []
        for _, _, minus_episode, minus_query in sorted(ranked, reverse=True)[:count]:
            e, q = -minus_episode, -minus_query  # negated so that ties go to the earliest
            episode, classes = self.draws[e], self.episode_classes[e]
            image, label = episode.query[q]
            out.append({
                "episode": e, "query": q, "class": classes[label], **self._image(image),
                "predicted": {r.path: classes[r.predictions[e][q]] for r in self.models},
                "margin": {r.path: r.margins[e][q] if math.isfinite(r.margins[e][q]) else None
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


def _progress(total: int, enabled: bool | None):
    # enabled=None: a bar only when stderr is a terminal
    return tqdm(total=total, unit="episode", dynamic_ncols=True, file=sys.stderr,
                disable=(not sys.stderr.isatty()) if enabled is None else not enabled)


def evaluate(paths: Sequence, data_root, *, split: str = "test", layout: str | None = None,
             episodes: int = 2000, way: int = 5, shot: int = 1, queries_per_class: int = 15,
             seed: int = ORIGINAL_SEED, cifar: bool = False, all_images: bool = False,
             provider: str = "cpu", device: str = "cpu", threads: int | None = None,
             workers: int = 2, progress: bool | None = None,
             log: Callable[[str], None] = lambda _: None) -> Evaluation:
    """Every model in ``paths`` on the same ``episodes`` of ``split``, as test.py runs them
    (each episode is decoded once and given to every model in turn)."""
    if not paths:
        raise DMFExportError("give at least one checkpoint or artifact")
    if episodes < 1:
        raise DMFExportError(f"--episodes must be ≥ 1 (got {episodes})")
    start = time.perf_counter()
    data = open_split(data_root, split, layout, all_images)
    drawn = sample_episodes(data, episodes, way, shot, queries_per_class, seed)
    log(f"{data.where}: {len(data.class_ids)} classes, {len(data)} images ({data.layout}); "
        f"{episodes} episodes of {way}-way {shot}-shot, {queries_per_class} queries per class, "
        f"seed {seed}")
    runners = [open_model(p, provider=provider, device=device, threads=threads) for p in paths]
    preprocessing = preprocessing_for(cifar)
    results = [ModelResult(str(p), getattr(r, "backend", "?"), way * queries_per_class)
               for p, r in zip(paths, runners)]
    evaluation = Evaluation(str(data_root), split, data.layout, episodes, way, shot,
                            queries_per_class, seed, "cifar-fs" if cifar else "imagenet", results,
                            [[data.class_names.get(c, str(c)) for c in e.classes] for e in drawn])
    evaluation.draws, evaluation.source = drawn, (data, preprocessing)
    evaluation.setup_seconds = time.perf_counter() - start
    stream = iterate_episodes(data, drawn, preprocessing, workers)
    with contextlib.closing(stream), _progress(episodes, progress) as bar:
        for index in range(episodes):
            waited = time.perf_counter()
            tensors = next(stream)
            evaluation.data_wait_seconds += time.perf_counter() - waited
            evaluation.data_seconds += tensors.load_seconds
            for path, runner, result in zip(paths, runners, results):
                if index == 0:
                    _check_image_size(path, runner, tensors.query)
                began = time.perf_counter()
                scores = _scores(path, runner, tensors.support, tensors.support_labels,
                                 tensors.query, f"episode {index}")
                result.seconds += time.perf_counter() - began
                predicted = scores.argmax(1)
                result.predictions.append(predicted.tolist())
                result.correct.append(int((predicted == tensors.query_labels).sum()))
                result.margins.append(_margins(scores, tensors.query_labels))
            bar.set_postfix_str(f"accuracy {results[0].accuracy:.2%}", refresh=False)
            bar.update()
    evaluation.wall_seconds = time.perf_counter() - start
    return evaluation


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

    @property
    def predicted(self) -> list[str]:
        return [self.classes[int(np.argmax(row))] for row in self.scores]

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "backend": self.backend,
                "support": {"folder": self.support,
                            "classes": [{"name": n, "images": s} for n, s in zip(self.classes, self.shots)]},
                "predictions": [{"query": q, "class": c, "scores": dict(zip(self.classes, row))}
                                for q, c, row in zip(self.queries, self.predicted, self.scores)]}

    def rows(self) -> list[list[str]]:
        """Header and one row per query: file, predicted class, a score per class."""
        header = ["query", "class"] + [f"score_{name}" for name in self.classes]
        return [header] + [[q, c] + [f"{s:.6f}" for s in row]
                           for q, c, row in zip(self.queries, self.predicted, self.scores)]


def predict(path, support_dir, queries: Sequence, *, cifar: bool = False, provider: str = "cpu",
            device: str = "cpu", threads: int | None = None, workers: int = 2) -> Prediction:
    """Scores of each query image against the classes of ``support_dir`` (any number of
    images per class: a prototype is its class's mean feature)."""
    classes = support_folders(support_dir)
    query_paths = query_files(queries)
    preprocessing = preprocessing_for(cifar)
    runner = open_model(path, provider=provider, device=device, threads=threads)
    support_paths = [image for _, images in classes for image in images]
    support = read_images(support_paths, preprocessing, workers)
    _check_image_size(path, runner, support)
    support_labels = one_hot([label for label, (_, images) in enumerate(classes) for _ in images],
                             len(classes))
    scores: list[list[float]] = []
    for first in range(0, len(query_paths), PREDICT_BATCH):
        chunk = query_paths[first:first + PREDICT_BATCH]
        query = read_images(chunk, preprocessing, workers)
        if query.shape[-2:] != support.shape[-2:]:
            raise DMFExportError(f"{chunk[0]} is {query.shape[-1]}×{query.shape[-2]} after "
                                 f"preprocessing but the support images are "
                                 f"{support.shape[-1]}×{support.shape[-2]}")
        where = f"queries {first + 1}–{first + len(chunk)}"
        scores += _scores(path, runner, support, support_labels, query, where).tolist()
    return Prediction(str(path), getattr(runner, "backend", "?"), str(support_dir),
                      [name for name, _ in classes], [len(images) for _, images in classes],
                      [str(q) for q in query_paths], scores)
