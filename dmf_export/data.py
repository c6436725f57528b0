"""Few-shot data as the original DMF test code reads it: layouts, preprocessing, episodes.

Both ``evaluate`` and ``predict`` (and the tests) go through this module:

- layouts: the miniImageNet pickles of the original's ``miniImageNet_load`` and the
  image folders ``ROOT/{train,val,test}/<class>/<image>`` of its tieredImageNet /
  miniImageNet / CIFAR-FS datasets, classes and files in sorted order;
- preprocessing: ToTensor + Normalize for pickled arrays; RGB → Resize((92, 92))
  bilinear (PIL) → CenterCrop(84) → ToTensor → Normalize for image files (CIFAR-FS:
  no resize or crop, its own mean/std);
- pickles read by an unpickler that admits only what numpy arrays, lists, dicts,
  numbers and strings need (``dmf_export.safe_pickle``), so a file from elsewhere never
  runs code;
- episodes drawn exactly as the original's ``FewShotDataset_test`` draws them;
- images decoded lazily, a few episodes ahead, in a pool of worker threads (Pillow and
  torch release the GIL while they decode, resize and normalise), so memory stays
  bounded on splits of 200k images.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pickle
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dmf_export.errors import DMFExportError, summarize
from dmf_export.safe_pickle import RestrictedUnpickler

SPLITS = ("train", "val", "test")
LAYOUTS = ("pickle", "folders")
# miniImageNet_load's file names (the train split is the "train phase" of the train classes)
PICKLE_NAMES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
ORIGINAL_SEED = 112  # FewShotDataset_test seeds Python's random with it when built
RESIZE = 92
CROP = 84
# what --all-images and predict admit; the original's folders admit names containing ".jpg"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclasses.dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR_FS = Normalization((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))


# -- preprocessing ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the original's test transform does to one image.

    ``resize``/``crop`` apply to image files only (pickled arrays are used as stored);
    ``None`` skips the step (CIFAR-FS).
    """

    normalization: Normalization = IMAGENET
    resize: int | None = RESIZE
    crop: int | None = CROP

    def pixels(self, image) -> np.ndarray:
        """A PIL image → uint8 ``[H, W, 3]``: RGB, Resize((r, r)) bilinear, CenterCrop(c)."""
        image = image.convert("RGB")
        if self.resize is not None:
            image = image.resize((self.resize, self.resize), Image.Resampling.BILINEAR)
        if self.crop is not None:
            width, height = image.size
            # torchvision's CenterCrop: offsets int(round((size - crop) / 2))
            top, left = int(round((height - self.crop) / 2.0)), int(round((width - self.crop) / 2.0))
            image = image.crop((left, top, left + self.crop, top + self.crop))
        return np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` → float32 ``[N, 3, H, W]``, as torchvision's ToTensor
        (``float().div(255)``) then Normalize (``sub_(mean).div_(std)``), op for op."""
        images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()
        images = images.to(torch.float32).div(255)
        mean = torch.as_tensor(self.normalization.mean, dtype=torch.float32)[:, None, None]
        std = torch.as_tensor(self.normalization.std, dtype=torch.float32)[:, None, None]
        return images.sub_(mean).div_(std)


def preprocessing_for(cifar: bool = False) -> Preprocessing:
    """The original's test transform: ImageNet's, or CIFAR-FS's (its own mean/std, no
    resize or crop: images are used at their stored size)."""
    if cifar:
        return Preprocessing(CIFAR_FS, resize=None, crop=None)
    return Preprocessing(IMAGENET)


def read_image(path, preprocessing: Preprocessing) -> np.ndarray:
    """Decode the image file at ``path`` and apply ``preprocessing.pixels``; a file that
    does not decode is one line naming it (the original retries such a file forever)."""
    try:
        with Image.open(path) as image:
            return preprocessing.pixels(image)
    except DMFExportError:
        raise
    except Exception as err:
        raise DMFExportError(f"{path}: cannot decode it as an image ({summarize(err)})") from err


def stack_pixels(paths: Sequence[Path], images: Sequence[np.ndarray]) -> np.ndarray:
    """``[N, H, W, 3]`` of images that must share one size (CIFAR-FS's transform, which
    does not resize, passes each file's own)."""
    odd = next((i for i, image in enumerate(images) if image.shape != images[0].shape), None)
    if odd is not None:
        size = lambda image: f"{image.shape[1]}×{image.shape[0]}"  # noqa: E731
        raise DMFExportError(f"{paths[odd]} is {size(images[odd])} but {paths[0]} is "
                             f"{size(images[0])}: images must share one size after preprocessing")
    return np.stack(images)


def admits_original(name: str) -> bool:
    """The original's image folders read every name that contains ".jpg"."""
    return ".jpg" in name


def admits_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


# -- restricted unpickling -------------------------------------------------------------

def load_pickle(path) -> object:
    """Unpickle ``path`` admitting only numpy arrays and plain data
    (``safe_pickle.ARRAY_GLOBALS``), with ``encoding='latin1'`` as the original loads the
    Python 2 pickles."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, encoding="latin1").load()
    except OSError as err:
        raise DMFExportError(f"{path}: cannot read it ({summarize(err)})") from err
    except pickle.UnpicklingError as err:
        raise DMFExportError(f"{path}: {err} (a data pickle may hold only numpy arrays, lists, "
                             "dicts, numbers and strings)") from err
    except Exception as err:
        raise DMFExportError(f"{path}: not a readable pickle ({summarize(err)})") from err


# -- splits ----------------------------------------------------------------------------

class Split:
    """One split of a dataset: its classes in sorted order (the original's ``labelIds``)
    and each class's image indices in order of appearance (``labels2inds``)."""

    layout: str

    def __init__(self, where: str, class_ids: list, images_of: dict, class_names: dict):
        self.where = where
        self.class_ids = class_ids
        self.images_of = images_of
        self.class_names = class_names

    def __len__(self) -> int:
        return sum(len(v) for v in self.images_of.values())

    def pixels(self, indices: Sequence[int], preprocessing: Preprocessing) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` of the images at ``indices``."""
        raise NotImplementedError

    def describe_class(self, class_id) -> str:
        """The class, named so that a user finds it (in messages)."""
        raise NotImplementedError


class PickleSplit(Split):
    layout = "pickle"

    def __init__(self, path: Path):
        content = load_pickle(path)
        if not isinstance(content, dict) or "data" not in content or "labels" not in content:
            raise DMFExportError(f"{path}: expected a dict with 'data' and 'labels' "
                                 "(miniImageNet_load's layout)")
        data, labels = content["data"], content["labels"]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4
                and data.shape[3] == 3):
            found = (f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray)
                     else type(data).__name__)
            raise DMFExportError(f"{path}: 'data' must be uint8 images [N, H, W, 3], found {found}")
        labels = labels.tolist() if isinstance(labels, np.ndarray) else labels
        if not isinstance(labels, (list, tuple)) or len(labels) != len(data):
            raise DMFExportError(f"{path}: 'labels' must be a list of {len(data)} class ids "
                                 "(one per image)")
        images_of: dict = {}
        for index, label in enumerate(labels):
            images_of.setdefault(label, []).append(index)
        try:
            class_ids = sorted(images_of)
        except TypeError as err:
            raise DMFExportError(f"{path}: 'labels' mixes kinds of class id ({err})") from err
        names = content.get("catname2label")
        class_names = ({label: str(name) for name, label in names.items()}
                       if isinstance(names, dict) else {})
        super().__init__(str(path), class_ids, images_of, class_names)
        self.data = data

    def pixels(self, indices, preprocessing):
        return self.data[np.asarray(indices, dtype=np.int64)]

    def describe_class(self, class_id) -> str:
        name = self.class_names.get(class_id)
        return f"class {class_id}" + (f" ({name})" if name else "") + f" of {self.where}"


def _sorted_entries(folder: Path, keep: Callable[[os.DirEntry], bool]) -> list[str]:
    """Names in ``folder`` that ``keep`` admits, sorted as the original's
    ``sorted(os.listdir(...))`` (scandir: no stat per file on 200k-image splits)."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if keep(entry))


class FolderSplit(Split):
    layout = "folders"

    def __init__(self, folder: Path, admit: Callable[[str], bool] = admits_original):
        self.paths: list[Path] = []
        images_of: dict = {}
        class_names: dict = {}
        for name in _sorted_entries(folder, lambda entry: entry.is_dir()):
            class_folder = folder / name
            files = _sorted_entries(class_folder, lambda entry: admit(entry.name) and entry.is_file())
            if not files:
                continue  # the original's labelIds leave out a class without images
            class_names[name] = name
            images_of[name] = list(range(len(self.paths), len(self.paths) + len(files)))
            self.paths.extend(class_folder / f for f in files)
        super().__init__(str(folder), sorted(images_of), images_of, class_names)

    def pixels(self, indices, preprocessing):
        paths = [self.paths[i] for i in indices]
        return stack_pixels(paths, [read_image(path, preprocessing) for path in paths])

    def describe_class(self, class_id) -> str:
        return str(Path(self.where) / class_id)


def detect_layout(root: Path, split: str) -> str:
    pickle_path, folder = root / PICKLE_NAMES[split], root / split
    has_pickle, has_folder = pickle_path.is_file(), folder.is_dir()
    if has_pickle and has_folder:
        raise DMFExportError(f"{root} holds the {split} split both as {pickle_path.name} and as "
                             f"{split}/: choose one with --layout pickle or --layout folders")
    if has_pickle:
        return "pickle"
    if has_folder:
        return "folders"
    if not root.is_dir():
        raise DMFExportError(f"{root}: no such folder")
    raise DMFExportError(f"{root} has no {split} split: neither {PICKLE_NAMES[split]} "
                         f"(miniImageNet pickles) nor {split}/<class>/<images> (image folders)")


def open_split(root, split: str = "test", layout: str | None = None,
               all_images: bool = False) -> Split:
    """The ``split`` of the dataset at ``root`` in ``layout`` (None: detected).
    ``all_images``: image folders admit every image suffix instead of the original's
    rule (names containing ".jpg")."""
    root = Path(root)
    if split not in SPLITS:
        raise DMFExportError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    layout = layout or detect_layout(root, split)
    if layout == "pickle":
        path = root / PICKLE_NAMES[split]
        if not path.is_file():
            raise DMFExportError(f"{root} has no {split} split: {path.name} is missing")
        result: Split = PickleSplit(path)
    elif layout == "folders":
        folder = root / split
        if not folder.is_dir():
            raise DMFExportError(f"{root} has no {split} split: {folder} is not a folder")
        result = FolderSplit(folder, admits_image if all_images else admits_original)
    else:
        raise DMFExportError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if not result.class_ids:
        hint = "" if all_images or layout == "pickle" else (
            " (the original reads names containing '.jpg'; --all-images admits "
            + ", ".join(IMAGE_SUFFIXES) + ")")
        raise DMFExportError(f"{result.where} holds no images{hint}")
    return result


# -- episodes --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Episode:
    """One episode: ``classes[k]`` is the class of label k; ``support`` and ``query`` are
    (image index, label) pairs in the order the model sees them."""

    classes: tuple
    support: tuple[tuple[int, int], ...]
    query: tuple[tuple[int, int], ...]


def check_episode_size(split: Split, way: int, shot: int, queries_per_class: int) -> None:
    """One line for an episode size this split cannot give (before any sampling)."""
    for name, value in (("--way", way), ("--shot", shot), ("--queries-per-class", queries_per_class)):
        if value < 1:
            raise DMFExportError(f"{name} must be ≥ 1 (got {value})")
    if way > len(split.class_ids):
        raise DMFExportError(f"{split.where} has {len(split.class_ids)} classes; "
                             f"{way}-way episodes need at least {way}")
    needed = shot + queries_per_class
    for class_id in split.class_ids:
        count = len(split.images_of[class_id])
        if count < needed:
            raise DMFExportError(
                f"{split.describe_class(class_id)} has {count} image"
                f"{'s' if count != 1 else ''}; {shot}-shot episodes with {queries_per_class} "
                f"queries per class need {needed}")


def sample_episodes(split: Split, episodes: int, way: int = 5, shot: int = 1,
                    queries_per_class: int = 15, seed: int = ORIGINAL_SEED) -> list[Episode]:
    """The original's ``FewShotDataset_test`` sampler, draw for draw.

    One ``random.Random(seed)`` for all episodes; per episode: ``sample`` of the sorted
    class ids (label k = the k-th class drawn), for each class in that order ``sample``
    of its image indices (the first ``queries_per_class`` are queries, the rest shots),
    then ``shuffle`` of the support list and then of the query list.
    """
    check_episode_size(split, way, shot, queries_per_class)
    rng = random.Random(seed)
    drawn = []
    for _ in range(episodes):
        classes = rng.sample(split.class_ids, way)
        support, query = [], []
        for label, class_id in enumerate(classes):
            picked = rng.sample(split.images_of[class_id], queries_per_class + shot)
            query += [(index, label) for index in picked[:queries_per_class]]
            support += [(index, label) for index in picked[queries_per_class:]]
        rng.shuffle(support)
        rng.shuffle(query)
        drawn.append(Episode(tuple(classes), tuple(support), tuple(query)))
    return drawn


@dataclasses.dataclass
class EpisodeTensors:
    episode: Episode
    support: torch.Tensor         # [S, 3, H, W] normalised
    support_labels: torch.Tensor  # [S, way] one-hot, float32
    query: torch.Tensor           # [Q, 3, H, W]
    query_labels: torch.Tensor    # [Q] int64
    load_seconds: float           # decoding and preprocessing, in the worker


def one_hot(labels: Sequence[int], way: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(list(labels), dtype=torch.int64), way).float()


def load_episode(split: Split, episode: Episode, preprocessing: Preprocessing) -> EpisodeTensors:
    start = time.perf_counter()
    indices = [index for index, _ in episode.support + episode.query]
    images = preprocessing.normalise(split.pixels(indices, preprocessing))
    shots = len(episode.support)
    way = len(episode.classes)
    return EpisodeTensors(
        episode, images[:shots], one_hot([label for _, label in episode.support], way),
        images[shots:], torch.as_tensor([label for _, label in episode.query], dtype=torch.int64),
        time.perf_counter() - start)


def prefetched(tasks: Iterable[Callable[[], object]], workers: int = 2,
               ahead: int | None = None) -> Iterator[object]:
    """Results of ``tasks`` in order, computed by ``workers`` threads at most ``ahead``
    tasks in advance (default 2·workers), so only that many results exist at once."""
    ahead = max(1, ahead or 2 * workers)
    tasks = iter(tasks)
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                 thread_name_prefix="dmf-data")
    try:
        for _ in range(ahead):
            task = next(tasks, None)
            if task is None:
                break
            pending.append(pool.submit(task))
        while pending:
            result = pending.popleft().result()
            task = next(tasks, None)
            if task is not None:
                pending.append(pool.submit(task))
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def iterate_episodes(split: Split, episodes: Sequence[Episode], preprocessing: Preprocessing,
                     workers: int = 2) -> Iterator[EpisodeTensors]:
    """Each episode's tensors, decoded a few episodes ahead by ``workers`` threads."""
    return prefetched(((lambda e=e: load_episode(split, e, preprocessing)) for e in episodes),
                      workers)


# -- predict's folders -----------------------------------------------------------------

def support_folders(folder) -> list[tuple[str, list[Path]]]:
    """``DIR/<class>/<images>`` → [(class, image paths)] in sorted order; any number of
    images per class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DMFExportError(f"{folder}: no such folder (expected DIR/<class>/<images>)")
    classes = []
    for name in _sorted_entries(folder, lambda entry: entry.is_dir()):
        class_folder = folder / name
        files = [class_folder / f for f in
                 _sorted_entries(class_folder, lambda entry: admits_image(entry.name) and entry.is_file())]
        if not files:
            raise DMFExportError(f"{class_folder}: no images in this class folder")
        classes.append((name, files))
    if not classes:
        raise DMFExportError(f"{folder}: no class folders (expected DIR/<class>/<images>)")
    return classes


def query_files(paths: Iterable) -> list[Path]:
    """Image files given directly, and every image under given folders (sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside = []
            for where, folders, files in os.walk(path):
                folders.sort()
                inside += [Path(where) / f for f in sorted(files) if admits_image(f)]
            if not inside:
                raise DMFExportError(f"{path}: no images in this folder")
            found += inside
        else:
            raise DMFExportError(f"{path}: no such file or folder")
    if not found:
        raise DMFExportError("no query images given")
    return found


def read_images(paths: Sequence[Path], preprocessing: Preprocessing, workers: int = 2) -> torch.Tensor:
    """Normalised ``[N, 3, H, W]`` of image files, decoded by ``workers`` threads."""
    pixels = list(prefetched(((lambda p=p: read_image(p, preprocessing)) for p in paths), workers))
    return preprocessing.normalise(stack_pixels(paths, pixels))
