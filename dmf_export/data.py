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
- episodes drawn as they are consumed and their images decoded a fixed number of
  episodes ahead (``PREFETCH_EPISODES``, whatever the thread count) in a pool of at most
  ``MAX_WORKERS`` threads (Pillow and torch release the GIL while they decode, resize and
  normalise), so memory stays bounded on splits of 200k images and any episode count;
- every failure one ``DMFExportError`` naming the file and what is wrong with it;
  entries a folder listing cannot read (symlink loops, dangling links, no permission)
  are skipped and counted (``Split.skipped``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pickle
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dmf_export import sniff
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
# Threads decoding images: more than this many cores rarely help one model's evaluation,
# and each thread holds its episode's images while it works.
MAX_WORKERS = 8
# Episodes decoded ahead of the model: fixed, so memory does not grow with --workers
# (an 84×84 5-way 1-shot 15-query episode is 6.8 MB of float32: 8 ahead ≈ 55 MB), and
# as many as the most threads there are, so that every thread has one to decode.
PREFETCH_EPISODES = MAX_WORKERS
# Pixel modes Pillow's convert('RGB') would clip rather than scale (16- and 32-bit
# integer greyscale: a 16-bit PNG would come out almost white).
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


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
        image = to_rgb(image)
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
        images = images.to(torch.float32).div_(255)  # in place: the same values, one buffer fewer
        mean = torch.as_tensor(self.normalization.mean, dtype=torch.float32)[:, None, None]
        std = torch.as_tensor(self.normalization.std, dtype=torch.float32)[:, None, None]
        return images.sub_(mean).div_(std)


def to_rgb(image) -> Image.Image:
    """``image.convert('RGB')``, as the original's loader does, except for what it would
    clip: 16-bit (and 32-bit integer) greyscale is scaled to 8 bits (v·255/65535,
    rounded) first; floating-point pixels are refused."""
    if image.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DMFExportError(f"{image.mode} pixels outside 0–65535: not a 16-bit image "
                                 "this reader can scale to 8 bits")
        eight = (values.astype(np.uint32) * 255 + 32767) // 65535
        image = Image.fromarray(eight.astype(np.uint8))  # 2-D uint8: mode L
    elif image.mode == "F":
        raise DMFExportError("floating-point pixels (mode F): convert the image to 8 or "
                             "16 bits per channel")
    elif image.mode == "P":
        # RGB drops a palette's transparency either way; dropping it first spares
        # Pillow's "should be converted to RGBA" warning (same pixels)
        image.info.pop("transparency", None)
    return image.convert("RGB")


def refuse_decompression_bombs() -> None:
    """A decompression bomb (over Image.MAX_IMAGE_PIXELS, up to twice that: above, Pillow
    raises by itself) is refused in one line by ``read_image`` rather than warned about
    in Pillow's words and decoded anyway. A filter for the process (re-)set by the
    calling thread before the decoding threads start: ``warnings.catch_warnings`` is not
    thread-safe. Setting it again replaces it, so it never piles up."""
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


refuse_decompression_bombs()


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
    except DMFExportError as err:
        raise DMFExportError(f"{path}: {err}") from err
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DMFExportError(f"{path}: too many pixels to decode safely ({err})".replace(
            " could be decompression bomb DOS attack.", "")) from err
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
    Python 2 pickles. A file of another kind (gzip, zip, an image, text, …) is named as
    what it is, from its first bytes, before the unpickler reads it."""
    path = Path(path)
    try:
        kind = sniff.kind_of(path)
    except OSError as err:
        raise DMFExportError(f"{path}: cannot read it ({summarize(err)})") from err
    if kind == sniff.EMPTY:
        raise DMFExportError(f"{path} is an empty file, not a pickle")
    if kind not in (None, sniff.PICKLE, sniff.TEXT):  # protocol 0 pickles are text
        raise DMFExportError(f"{path} is {kind}, not a pickle")
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, encoding="latin1").load()
    except OSError as err:
        raise DMFExportError(f"{path}: cannot read it ({summarize(err)})") from err
    except RecursionError as err:
        raise DMFExportError(f"{path}: nested too deeply to unpickle") from err
    except MemoryError as err:
        raise DMFExportError(f"{path}: asks for more memory than there is") from err
    except pickle.UnpicklingError as err:
        if kind == sniff.TEXT:
            raise DMFExportError(f"{path} is a text file, not a pickle") from err
        if str(err).startswith("refusing"):
            raise DMFExportError(f"{path}: {err} (a data pickle may hold only numpy arrays, "
                                 "lists, dicts, numbers and strings)") from err
        raise DMFExportError(f"{path}: truncated or not a pickle ({summarize(err)})") from err
    except Exception as err:
        if kind == sniff.TEXT:
            raise DMFExportError(f"{path} is a text file, not a pickle") from err
        raise DMFExportError(f"{path}: truncated or not a readable pickle ({summarize(err)})") from err


# -- splits ----------------------------------------------------------------------------

class Split:
    """One split of a dataset: its classes in sorted order (the original's ``labelIds``)
    and each class's image indices in order of appearance (``labels2inds``);
    ``skipped``: (path, why) of the entries a listing could not read."""

    layout: str

    def __init__(self, where: str, class_ids: list, images_of: dict, class_names: dict,
                 skipped: list | None = None):
        self.where = where
        self.class_ids = class_ids
        self.images_of = images_of
        self.class_names = class_names
        self.skipped = skipped or []

    def __len__(self) -> int:
        return sum(len(v) for v in self.images_of.values())

    def pixels(self, indices: Sequence[int], preprocessing: Preprocessing) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` of the images at ``indices``."""
        raise NotImplementedError

    def describe_class(self, class_id) -> str:
        """The class, named so that a user finds it (in messages)."""
        raise NotImplementedError


def _is_label(value) -> bool:
    """A class id as the original's labels are: an integer or a string (numpy's too),
    never a bool, a float or a container."""
    return (isinstance(value, (int, str, bytes, np.integer, np.str_, np.bytes_))
            and not isinstance(value, (bool, np.bool_)))


def _plain_label(value):
    value = value.item() if isinstance(value, np.generic) else value
    return value.decode("latin1") if isinstance(value, bytes) else value


def pickle_labels(path: Path, labels, count: int) -> list:
    """``labels`` as a list of ``count`` class ids: a list or tuple of integers or strings,
    or a 1-D (or ``[N, 1]`` column) integer or string array; one line otherwise."""
    want = f"'labels' must be {count} class ids (integers or strings, one per image)"
    if isinstance(labels, np.ndarray):
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DMFExportError(f"{path}: {want}; found an array of shape {list(labels.shape)}")
        if labels.dtype.kind not in "iuUSO":
            raise DMFExportError(f"{path}: {want}; found an array of {labels.dtype}")
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)):
        raise DMFExportError(f"{path}: {want}; found {type(labels).__name__}")
    if len(labels) != count:
        raise DMFExportError(f"{path}: {want}; found {len(labels)}")
    odd = next((i for i, label in enumerate(labels) if not _is_label(label)), None)
    if odd is not None:
        raise DMFExportError(f"{path}: {want}; label {odd} is {type(labels[odd]).__name__} "
                             f"{_short(labels[odd])}")
    labels = [_plain_label(label) for label in labels]
    if len({type(label) for label in labels}) > 1:
        raise DMFExportError(f"{path}: 'labels' mixes integers and strings")
    return labels


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class PickleSplit(Split):
    layout = "pickle"

    def __init__(self, path: Path):
        content = load_pickle(path)
        if not isinstance(content, dict) or "data" not in content or "labels" not in content:
            found = (f"a dict with keys {', '.join(_short(k, 20) for k in list(content)[:6])}"
                     if isinstance(content, dict) else f"a {type(content).__name__}")
            raise DMFExportError(f"{path}: expected a dict with 'data' and 'labels' "
                                 f"(miniImageNet_load's layout), found {found}")
        data = content["data"]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4
                and data.shape[3] == 3):
            found = (f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray)
                     else type(data).__name__)
            raise DMFExportError(f"{path}: 'data' must be uint8 images [N, H, W, 3], found {found}")
        if len(data) == 0:
            raise DMFExportError(f"{path} holds no images ('data' is {list(data.shape)})")
        if min(data.shape[1:3]) == 0:
            raise DMFExportError(f"{path}: 'data' holds images of no pixels {list(data.shape)}")
        labels = pickle_labels(path, content["labels"], len(data))
        images_of: dict = {}
        for index, label in enumerate(labels):
            images_of.setdefault(label, []).append(index)
        names = content.get("catname2label")
        class_names: dict = {}
        if names is not None:
            if not isinstance(names, dict) or not all(
                    _is_label(label) and isinstance(name, (str, bytes)) for name, label in names.items()):
                raise DMFExportError(f"{path}: 'catname2label' must map class names (strings) "
                                     "to labels (integers or strings)")
            class_names = {_plain_label(label): _plain_label(name) for name, label in names.items()}
        super().__init__(str(path), sorted(images_of), images_of, class_names)
        self.data = data

    def pixels(self, indices, preprocessing):
        return self.data[np.asarray(indices, dtype=np.int64)]

    def describe_class(self, class_id) -> str:
        name = self.class_names.get(class_id)
        return f"class {class_id}" + (f" ({name})" if name else "") + f" of {self.where}"


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', or why the entry cannot be used ('a symlink loop', …)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        if entry.is_symlink():
            return "a dangling link"
        return "other"
    except OSError as err:  # ELOOP, EACCES: is_dir/is_file raise what is not FileNotFound
        return "a symlink loop" if err.errno == getattr(os, "ELOOP", 40) else (
            err.strerror or type(err).__name__).lower()


def _listing(folder: Path, keep: Callable[[str], bool], skipped: list) -> dict[str, list[str]]:
    """{'dir': names, 'file': names} in ``folder`` that ``keep`` admits, sorted as the
    original's ``sorted(os.listdir(...))`` (scandir: no stat per file on 200k-image
    splits). Entries that cannot be read are appended to ``skipped`` as (path, why); a
    folder that cannot be listed is itself one such entry."""
    found: dict[str, list[str]] = {"dir": [], "file": []}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not keep(entry.name):
                    continue
                kind = _entry_kind(entry)
                if kind in found:
                    found[kind].append(entry.name)
                elif kind != "other":
                    skipped.append((Path(folder) / entry.name, kind))
    except OSError as err:
        skipped.append((Path(folder), (err.strerror or type(err).__name__).lower()))
    return {kind: sorted(names) for kind, names in found.items()}


def _sorted_entries(folder: Path, want: str, keep: Callable[[str], bool],
                    skipped: list) -> list[str]:
    """The names of kind ``want`` ('dir' or 'file') of ``_listing``."""
    return _listing(folder, keep, skipped)[want]


def describe_skipped(skipped: Sequence[tuple[Path, str]]) -> str | None:
    """One warning line for what a listing skipped, or None."""
    if not skipped:
        return None
    whys = sorted({why for _, why in skipped})
    path, why = skipped[0]
    count = len(skipped)
    return (f"skipped {count} entr{'ies' if count != 1 else 'y'} that cannot be read "
            f"({', '.join(whys)}), the first {path} ({why})")


def _all(_name: str) -> bool:
    return True


class FolderSplit(Split):
    layout = "folders"

    def __init__(self, folder: Path, admit: Callable[[str], bool] = admits_original):
        self.paths: list[Path] = []
        images_of: dict = {}
        class_names: dict = {}
        skipped: list = []
        try:
            os.scandir(folder).close()
        except OSError as err:
            raise DMFExportError(f"{folder}: cannot list it ({summarize(err)})") from err
        for name in _sorted_entries(folder, "dir", _all, skipped):
            class_folder = folder / name
            files = _sorted_entries(class_folder, "file", admit, skipped)
            if not files:
                continue  # the original's labelIds leave out a class without images
            class_names[name] = name
            images_of[name] = list(range(len(self.paths), len(self.paths) + len(files)))
            self.paths.extend(class_folder / f for f in files)
        super().__init__(str(folder), sorted(images_of), images_of, class_names, skipped)

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
        count = len(split.class_ids)
        raise DMFExportError(f"{split.where} has {count} class{'es' if count != 1 else ''}; "
                             f"{way}-way episodes need at least {way}")
    needed = shot + queries_per_class
    for class_id in split.class_ids:
        count = len(split.images_of[class_id])
        if count < needed:
            raise DMFExportError(
                f"{split.describe_class(class_id)} has {count} image"
                f"{'s' if count != 1 else ''}; {shot}-shot episodes with {queries_per_class} "
                f"queries per class need {needed}")


def draw_episodes(split: Split, episodes: int, way: int = 5, shot: int = 1,
                  queries_per_class: int = 15, seed: int = ORIGINAL_SEED) -> Iterator[Episode]:
    """The original's ``FewShotDataset_test`` sampler, draw for draw, one episode at a
    time as they are consumed (so memory does not grow with ``episodes``).

    One ``random.Random(seed)`` for all episodes; per episode: ``sample`` of the sorted
    class ids (label k = the k-th class drawn), for each class in that order ``sample``
    of its image indices (the first ``queries_per_class`` are queries, the rest shots),
    then ``shuffle`` of the support list and then of the query list. The episode size is
    checked here, before the first draw.
    """
    check_episode_size(split, way, shot, queries_per_class)
    return _draws(split, episodes, way, shot, queries_per_class, seed)


def _draws(split, episodes, way, shot, queries_per_class, seed) -> Iterator[Episode]:
    rng = random.Random(seed)
    for _ in range(episodes):
        classes = rng.sample(split.class_ids, way)
        support, query = [], []
        for label, class_id in enumerate(classes):
            picked = rng.sample(split.images_of[class_id], queries_per_class + shot)
            query += [(index, label) for index in picked[:queries_per_class]]
            support += [(index, label) for index in picked[queries_per_class:]]
        rng.shuffle(support)
        rng.shuffle(query)
        yield Episode(tuple(classes), tuple(support), tuple(query))


def sample_episodes(split: Split, episodes: int, way: int = 5, shot: int = 1,
                    queries_per_class: int = 15, seed: int = ORIGINAL_SEED) -> list[Episode]:
    """``draw_episodes`` as a list (for a few episodes: tests, examples)."""
    return list(draw_episodes(split, episodes, way, shot, queries_per_class, seed))


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


def worker_threads(workers: int) -> int:
    """The threads ``workers`` asks for, capped at ``MAX_WORKERS``."""
    return max(1, min(int(workers), MAX_WORKERS))


def prefetched(tasks: Iterable[Callable[[], object]], workers: int = 2,
               ahead: int = PREFETCH_EPISODES) -> Iterator[object]:
    """Results of ``tasks`` in order, computed by ``workers`` threads (at most
    ``MAX_WORKERS``) at most ``ahead`` tasks in advance, so only that many results exist
    at once whatever ``workers`` is. ``tasks`` is consumed in the calling thread, one
    task per result handed out (a lazy sampler stays in one thread, in order)."""
    ahead = max(1, ahead)
    tasks = iter(tasks)
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=worker_threads(workers),
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


def iterate_episodes(split: Split, episodes: Iterable[Episode], preprocessing: Preprocessing,
                     workers: int = 2) -> Iterator[EpisodeTensors]:
    """Each episode's tensors, decoded ``PREFETCH_EPISODES`` episodes ahead by
    ``workers`` threads; ``episodes`` may be lazy (``draw_episodes``)."""
    refuse_decompression_bombs()
    return prefetched(((lambda e=e: load_episode(split, e, preprocessing)) for e in episodes),
                      workers)


# -- predict's folders -----------------------------------------------------------------

def support_folders(folder, skipped: list | None = None) -> list[tuple[str, list[Path]]]:
    """``DIR/<class>/<images>`` → [(class, image paths)] in sorted order; any number of
    images per class. Entries that cannot be read go to ``skipped`` as (path, why)."""
    folder = Path(folder)
    skipped = [] if skipped is None else skipped
    if not folder.is_dir():
        raise DMFExportError(f"{folder}: no such folder (expected DIR/<class>/<images>)")
    try:
        os.scandir(folder).close()
    except OSError as err:
        raise DMFExportError(f"{folder}: cannot list it ({summarize(err)})") from err
    classes = []
    for name in _sorted_entries(folder, "dir", _all, skipped):
        class_folder = folder / name
        files = [class_folder / f for f in _sorted_entries(class_folder, "file", admits_image, skipped)]
        if not files:
            raise DMFExportError(f"{class_folder}: no images in this class folder")
        classes.append((name, files))
    if not classes:
        raise DMFExportError(f"{folder}: no class folders (expected DIR/<class>/<images>)")
    return classes


def query_files(paths: Iterable, skipped: list | None = None) -> list[Path]:
    """Image files given directly, and every image under given folders (sorted; links
    to folders are not followed, so a loop cannot recur). Entries that cannot be read
    go to ``skipped`` as (path, why)."""
    skipped = [] if skipped is None else skipped
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside: list[Path] = []
            pending = [path]
            while pending:
                where = pending.pop()
                listed = _listing(where, _all, skipped)
                folders = listed["dir"]
                inside += [where / f for f in listed["file"] if admits_image(f)]
                # os.walk's order: this folder's files, then each subfolder in sorted order
                pending += [where / f for f in reversed(folders)
                            if not (where / f).is_symlink()]
            if not inside:
                raise DMFExportError(f"{path}: no images in this folder")
            found += inside
        elif path.is_symlink():
            raise DMFExportError(f"{path}: a link that leads nowhere (dangling or a loop)")
        else:
            raise DMFExportError(f"{path}: no such file or folder")
    if not found:
        raise DMFExportError("no query images given")
    return found


def read_images(paths: Sequence[Path], preprocessing: Preprocessing, workers: int = 2) -> torch.Tensor:
    """Normalised ``[N, 3, H, W]`` of image files, decoded by ``workers`` threads."""
    refuse_decompression_bombs()
    pixels = list(prefetched(((lambda p=p: read_image(p, preprocessing)) for p in paths), workers))
    return preprocessing.normalise(stack_pixels(paths, pixels))


# -- calibration images (int8 export) --------------------------------------------------

# Distinct images a calibration set holds at most: they are all in memory at once
# (84×84: 85 kB each, so 1024 ≈ 87 MB), and a few hundred already fix the ranges.
MAX_CALIBRATION_IMAGES = 1024


@dataclasses.dataclass
class CalibrationSet:
    """The images an int8 export is calibrated on, and where they came from (recorded
    in the artifact's metadata)."""

    images: torch.Tensor  # [N, 3, H, W] normalised, as evaluate feeds them
    where: str            # the split's file or folder
    split: str
    layout: str
    episodes: int


def calibration_images(root, split: str = "test", episodes: int = 4, *, layout: str | None = None,
                       cifar: bool = False, image_size: int | None = None,
                       way: int = 5, shot: int = 1, queries_per_class: int = 15,
                       seed: int = ORIGINAL_SEED, limit: int = MAX_CALIBRATION_IMAGES) -> CalibrationSet:
    """The distinct images of the first ``episodes`` episodes that ``evaluate``'s sampler
    draws on ``split`` (the original's, seed 112, 5-way 1-shot 15 queries by default), in
    the order they are first drawn, at most ``limit`` of them, read and preprocessed as
    ``evaluate`` feeds them. ``image_size``: the size they must have after preprocessing
    (one line otherwise, naming the first image)."""
    data = open_split(root, split, layout)
    indices: dict[int, None] = {}  # an ordered set
    for episode in draw_episodes(data, episodes, way, shot, queries_per_class, seed):
        for index, _ in episode.support + episode.query:
            indices.setdefault(index, None)
    chosen = list(indices)[:limit]
    preprocessing = preprocessing_for(cifar)
    refuse_decompression_bombs()
    images = preprocessing.normalise(data.pixels(chosen, preprocessing))
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        first = data.paths[chosen[0]] if isinstance(data, FolderSplit) else data.where
        raise DMFExportError(f"{first}: calibration images are {images.shape[3]}×{images.shape[2]} "
                             f"after preprocessing, but the export is for {image_size}×{image_size} "
                             f"(--image-size{'' if cifar else '; the ImageNet transform crops to 84'})")
    return CalibrationSet(images, data.where, split, data.layout, episodes)
