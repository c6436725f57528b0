"""The dataset reader on random malformed input: every case ends in a result or in one
``DMFExportError``, never in another exception (which the command line would print as a
traceback).

Property-based (hypothesis), bounded to a few seconds: a fixed number of examples each,
no per-example deadline (the suite's machine is shared).
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the test extra installs hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from dmf_export import data  # noqa: E402
from dmf_export.errors import DMFExportError  # noqa: E402

PICKLE_NAME = "miniImageNet_category_split_test.pickle"  # miniImageNet_load's test split
BOUNDED = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies --------------------------------------------------------------------------

DTYPES = [np.uint8, np.int8, np.int64, np.float32, np.float64, np.bool_, "U3", "S2", object]


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=5)))
    size = int(np.prod(shape)) if shape else 1
    if dtype is object:
        values = draw(st.lists(st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=2)),
                               min_size=size, max_size=size))
        array = np.empty(size, dtype=object)
        array[:] = values
        return array.reshape(shape)
    raw = draw(st.binary(min_size=size * 8, max_size=size * 8))
    if np.dtype(dtype).kind in "US":
        return np.array([raw[i:i + 2].hex()[:3] for i in range(0, size * 8, 8)],
                        dtype=dtype).reshape(shape)
    if np.dtype(dtype).kind == "b":
        return (np.frombuffer(raw[:size], np.uint8) % 2).astype(bool).reshape(shape)
    return np.frombuffer(raw[:size * np.dtype(dtype).itemsize], dtype).reshape(shape).copy()


# uint8 [N, H, W, 3]: the layout the reader wants, at odd counts and sizes (0 included)
images = st.builds(lambda n, h, w: np.random.default_rng(n * 31 + h).integers(0, 255, (n, h, w, 3), np.uint8),
                   st.integers(0, 8), st.integers(0, 5), st.integers(0, 5))


plain = st.one_of(st.none(), st.booleans(), st.integers(-2, 70), st.floats(allow_nan=True),
                  st.text(max_size=4), st.binary(max_size=4))
labels_like = st.one_of(
    arrays(),
    st.lists(plain, max_size=10),
    st.lists(st.integers(0, 3), max_size=10),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=10),
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
    st.dictionaries(st.text(max_size=2), plain, max_size=3),
    plain,
)
data_like = st.one_of(images, images, arrays(), st.lists(plain, max_size=3), plain)
names_like = st.one_of(st.none(), st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 3)),
                                                  st.one_of(plain, st.lists(plain, max_size=2)), max_size=4),
                       st.lists(plain, max_size=2), plain)


@st.composite
def pickle_files(draw):
    """The bytes of a dataset pickle: the expected dict with random members, something
    else entirely, or either cut short."""
    kind = draw(st.sampled_from(["dict", "dict", "dict", "other", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "other":
        content = draw(st.one_of(labels_like, data_like))
    else:
        content = {}
        content["data"] = draw(data_like)
        if draw(st.integers(0, 9)):
            content["labels"] = draw(labels_like)
        names = draw(names_like)
        if names is not None:
            content["catname2label"] = names
    raw = pickle.dumps(content, protocol=draw(st.sampled_from([0, 2, 4, 5])))
    if draw(st.integers(0, 4)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


ENTRY_KINDS = ["image", "image", "image", "text", "empty", "loop", "dangling", "folder", "bytes"]
MODES = ["RGB", "L", "P", "RGBA", "1", "I;16", "I", "F", "CMYK", "LA"]


@st.composite
def folder_trees(draw):
    """[(class name, [(entry name, kind, mode, size)])] with odd names and odd images."""
    names = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                    min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
    classes = draw(st.lists(names, max_size=4, unique=True))
    tree = []
    for name in classes:
        entries = draw(st.lists(st.tuples(names, st.sampled_from(ENTRY_KINDS), st.sampled_from(MODES),
                                          st.integers(1, 12)), max_size=5, unique_by=lambda e: e[0]))
        tree.append((name, entries, draw(st.booleans())))  # the class folder itself a loop?
    return tree


def _write_tree(root: Path, tree) -> None:
    split = root / "test"
    split.mkdir(parents=True)
    for name, entries, looped in tree:
        folder = split / name
        if looped:
            os.symlink(name, folder)
            continue
        folder.mkdir()
        for entry, kind, mode, size in entries:
            target = folder / (entry + ".jpg")
            if kind == "image":  # TIFF holds every mode drawn (16-bit, float, CMYK, …)
                Image.new(mode, (size, size + 1)).save(target, format="TIFF")
            elif kind == "text":
                target.write_text("not an image")
            elif kind == "empty":
                target.write_bytes(b"")
            elif kind == "bytes":
                target.write_bytes(bytes(range(size)))
            elif kind == "loop":
                os.symlink(target.name, target)
            elif kind == "dangling":
                os.symlink("nowhere", target)
            else:
                target.mkdir()


def _read_everything(root: Path, cifar: bool) -> None:
    """What evaluate does with a dataset, short of a model: open the split, draw a few
    small episodes, decode them."""
    split = data.open_split(root, "test")
    data.describe_skipped(split.skipped)
    episodes = data.draw_episodes(split, 2, way=min(2, len(split.class_ids)), shot=1,
                                  queries_per_class=1)
    for tensors in data.iterate_episodes(split, episodes, data.preprocessing_for(cifar), workers=2):
        assert tensors.query.dtype.is_floating_point


# -- the properties ----------------------------------------------------------------------

@BOUNDED
@given(raw=pickle_files(), cifar=st.booleans())
def test_a_random_pickle_is_read_or_refused_in_one_line(raw, cifar):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / PICKLE_NAME).write_bytes(raw)
        try:
            _read_everything(Path(folder), cifar)
        except DMFExportError as err:
            assert "\n" not in str(err) and str(err)


@BOUNDED
@given(tree=folder_trees(), cifar=st.booleans())
def test_a_random_folder_tree_is_read_or_refused_in_one_line(tree, cifar):
    with tempfile.TemporaryDirectory() as folder:
        _write_tree(Path(folder), tree)
        try:
            _read_everything(Path(folder), cifar)
        except DMFExportError as err:
            assert str(err)
        try:
            data.support_folders(Path(folder) / "test", [])
            data.query_files([Path(folder) / "test"], [])
        except DMFExportError as err:
            assert str(err)
