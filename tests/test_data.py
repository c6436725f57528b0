"""dmf_export.data: layouts, preprocessing, the episode sampler, the restricted unpickler.

References are independent: the original's sampler and folder listing re-rendered from
its source (FewShotDataset_test, miniImageNet_load, tieredImageNet), and pixels computed
by hand.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmf_export import data
from dmf_export.errors import DMFExportError
from fewshot_data import (PICKLE_NAMES, original_episodes, original_file_transform, original_folder_index,
                          original_pickle_index, write_folders, write_pickle)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = write_folders(tmp_path_factory.mktemp("folders"), classes=12, images=25, size=40)
    split = root / "test"
    # what the original's rule leaves out: a PNG, a text file, a class without a .jpg
    first = sorted(os.listdir(split))[0]
    Image.new("RGB", (40, 40), (1, 2, 3)).save(split / first / "extra.png")
    (split / first / "notes.txt").write_text("not an image")
    (split / "zz_empty").mkdir()
    return root


@pytest.fixture(scope="module")
def pickle_root(tmp_path_factory):
    return write_pickle(tmp_path_factory.mktemp("pickle"), classes=12, images=25, size=16)


SIZES = [(5, 1, 15, 112, 20), (5, 5, 15, 112, 20), (12, 1, 1, 112, 5), (3, 2, 4, 7, 20)]


@pytest.mark.parametrize("way,shot,queries,seed,count", SIZES)
def test_folder_episodes_are_the_originals(folder_root, way, shot, queries, seed, count):
    split = data.open_split(folder_root, "test")
    dataset, labels2inds, labelIds, cats = original_folder_index(folder_root / "test")
    expected = original_episodes(labels2inds, labelIds, way, shot, way * queries, count, seed)
    drawn = data.sample_episodes(split, count, way, shot, queries, seed)
    for episode, (classes, query, support) in zip(drawn, expected):
        assert list(episode.classes) == [cats[c] for c in classes]
        assert list(episode.query) == query and list(episode.support) == support
    assert [str(p) for p in split.paths] == [path for path, _ in dataset]


@pytest.mark.parametrize("way,shot,queries,seed,count", SIZES)
def test_pickle_episodes_are_the_originals(pickle_root, way, shot, queries, seed, count):
    with open(pickle_root / PICKLE_NAMES["test"], "rb") as handle:
        labels = pickle.load(handle)["labels"]
    labels2inds, labelIds = original_pickle_index(labels)
    expected = original_episodes(labels2inds, labelIds, way, shot, way * queries, count, seed)
    drawn = data.sample_episodes(data.open_split(pickle_root, "test"), count, way, shot, queries, seed)
    assert [(list(e.classes), list(e.query), list(e.support)) for e in drawn] == expected


def test_episode_tensors_follow_the_drawn_indices_and_labels(pickle_root):
    split = data.open_split(pickle_root, "test")
    episode = data.sample_episodes(split, 1, 3, 2, 2, seed=5)[0]
    tensors = data.load_episode(split, episode, data.preprocessing_for())
    raw = pickle.load(open(pickle_root / PICKLE_NAMES["test"], "rb"))["data"]
    for images, pairs in ((tensors.support, episode.support), (tensors.query, episode.query)):
        for image, (index, _) in zip(images, pairs):
            expected = (raw[index].transpose(2, 0, 1) / 255.0 - np.array(MEAN)[:, None, None]) \
                / np.array(STD)[:, None, None]
            np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)
    assert tensors.support_labels.tolist() == [[float(k == label) for k in range(3)]
                                               for _, label in episode.support]
    assert tensors.query_labels.tolist() == [label for _, label in episode.query]


def test_folder_episode_tensors_are_the_originals_transform_of_the_drawn_files(folder_root):
    split = data.open_split(folder_root, "test")
    dataset, labels2inds, label_ids, _ = original_folder_index(folder_root / "test")
    _, query, support = original_episodes(labels2inds, label_ids, 4, 2, 4, 1)[0]
    tensors = next(data.iterate_episodes(split, data.sample_episodes(split, 1, 4, 2, 1),
                                         data.preprocessing_for()))
    for images, pairs in ((tensors.support, support), (tensors.query, query)):
        expected = np.stack([original_file_transform(dataset[index][0]) for index, _ in pairs])
        np.testing.assert_allclose(images.numpy(), expected, atol=1e-6)


def test_all_images_admits_other_suffixes(folder_root):
    original = data.open_split(folder_root, "test")
    everything = data.open_split(folder_root, "test", all_images=True)
    first = original.class_ids[0]
    assert len(everything.images_of[first]) == len(original.images_of[first]) + 1  # extra.png
    assert "zz_empty" not in original.class_ids and len(original.class_ids) == 12


def test_layout_is_detected_and_chosen(folder_root, pickle_root):
    assert data.open_split(folder_root, "test").layout == "folders"
    assert data.open_split(pickle_root, "test").layout == "pickle"
    with pytest.raises(DMFExportError, match="is missing"):
        data.open_split(folder_root, "test", layout="pickle")


# -- preprocessing against pixels computed by hand -------------------------------------

def _normalised(pixels_hwc, mean=MEAN, std=STD):
    return (pixels_hwc.transpose(2, 0, 1) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


def test_file_preprocessing_is_bilinear_resize_centre_crop_normalise(tmp_path):
    # 46 wide, 92 high, every row the same: Resize((92, 92)) only doubles the width, with
    # PIL's bilinear weights (3/4, 1/4 between neighbours; edge pixels copied), rounded
    # half up to uint8; then rows and columns 4..87 remain.
    row = np.array([[(k * 37 + 11) % 256, (200 - 3 * k) % 256, (k * k) % 256] for k in range(46)], float)
    image = np.repeat(row[None], 92, 0).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "ramp.png")
    doubled = np.empty((92, 3))
    for x in range(92):
        k = (x - 1) // 2
        if x == 0 or x == 91:
            doubled[x] = row[0 if x == 0 else 45]
        elif x % 2:
            doubled[x] = 0.75 * row[k] + 0.25 * row[k + 1]
        else:
            doubled[x] = 0.25 * row[k] + 0.75 * row[k + 1]
    expected = np.repeat(np.floor(doubled + 0.5)[None], 92, 0)[4:88, 4:88]
    preprocessing = data.preprocessing_for()
    pixels = data.read_image(tmp_path / "ramp.png", preprocessing)
    np.testing.assert_array_equal(pixels, expected.astype(np.uint8))
    tensor = preprocessing.normalise(pixels[None])[0]
    np.testing.assert_allclose(tensor.numpy(), _normalised(expected), atol=1e-6)


def test_grayscale_file_becomes_rgb_and_is_cropped_at_the_centre(tmp_path):
    grey = np.fromfunction(lambda y, x: (3 * x + 7 * y) % 256, (92, 92)).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    pixels = data.read_image(tmp_path / "grey.png", data.preprocessing_for())
    np.testing.assert_array_equal(pixels, np.repeat(grey[4:88, 4:88, None], 3, 2))


def test_cifar_preprocessing_keeps_the_size_and_uses_its_constants(tmp_path):
    image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3) % 256
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / "c.png")
    preprocessing = data.preprocessing_for(cifar=True)
    tensor = preprocessing.normalise(data.read_image(tmp_path / "c.png", preprocessing)[None])[0]
    expected = _normalised(image.astype(float), (0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-6)


# -- the restricted unpickler ----------------------------------------------------------

def _python2_pickle(array: np.ndarray, labels: list[int]) -> bytes:
    """A protocol-2 pickle as Python 2's cPickle wrote the miniImageNet files: numpy.core
    paths, dtype('u1', 0, 1), the raw bytes as a str (BINSTRING)."""
    def string(raw):
        return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw

    def integer(n):
        return b"K" + bytes([n]) if n < 256 else b"J" + struct.pack("<i", n)

    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape = b"(" + b"".join(integer(n) for n in array.shape) + b"t"
    ndarray = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b")
               + b"\x87R(K\x01" + shape + dtype + b"\x89" + string(array.tobytes()) + b"tb")
    items = b"]" + b"(" + b"".join(integer(n) for n in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + ndarray + string(b"labels") + items + b"u."


def test_unpickler_reads_python2_numpy_pickles(tmp_path):
    array = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    (tmp_path / "py2.pickle").write_bytes(_python2_pickle(array, [3, 300]))
    loaded = data.load_pickle(tmp_path / "py2.pickle")
    np.testing.assert_array_equal(loaded["data"], array)
    assert loaded["labels"] == [3, 300]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_unpickler_reads_numpy_pickles_of_this_python(tmp_path, protocol):
    content = {"data": np.ones((2, 3, 3, 3), np.uint8), "labels": [np.int64(7), 8],
               "names": {"a": 1.5, "b": (None, True, "x")}}
    (tmp_path / "p.pickle").write_bytes(pickle.dumps(content, protocol=protocol))
    loaded = data.load_pickle(tmp_path / "p.pickle")
    np.testing.assert_array_equal(loaded["data"], content["data"])
    assert loaded["labels"] == [7, 8] and loaded["names"] == content["names"]


class _CreatesFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


class _RunsShell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [_CreatesFile, _RunsShell])
def test_unpickler_refuses_a_payload_and_runs_nothing(tmp_path, payload):
    target = tmp_path / "created"
    (tmp_path / "evil.pickle").write_bytes(
        pickle.dumps({"data": payload(target), "labels": [1]}, protocol=2))
    with pytest.raises(DMFExportError, match=r"refusing to load (builtins|io)\.open|refusing to load posix\.system"):
        data.load_pickle(tmp_path / "evil.pickle")
    assert not target.exists()


# -- bad data: one line naming it -------------------------------------------------------

def test_missing_split_is_named(folder_root):
    with pytest.raises(DMFExportError, match=r"has no val split: neither .*_val\.pickle .* nor val/"):
        data.open_split(folder_root, "val")


def test_way_larger_than_the_class_count(folder_root):
    split = data.open_split(folder_root, "test")
    with pytest.raises(DMFExportError, match=r"test has 12 classes; 13-way episodes need at least 13"):
        data.sample_episodes(split, 1, way=13)


def test_class_with_too_few_images(folder_root):
    split = data.open_split(folder_root, "test")
    with pytest.raises(DMFExportError, match=r"test/n00_class has 25 images; 5-shot episodes with "
                                             r"21 queries per class need 26"):
        data.sample_episodes(split, 1, way=5, shot=5, queries_per_class=21)


def test_image_that_does_not_decode(tmp_path):
    root = write_folders(tmp_path, classes=5, images=3, size=24)
    broken = sorted((root / "test").iterdir())[2] / "img_001.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    split = data.open_split(root, "test")  # listing decodes nothing
    episodes = data.sample_episodes(split, 1, way=5, shot=1, queries_per_class=2)
    with pytest.raises(DMFExportError, match=rf"{broken}: cannot decode it as an image"):
        list(data.iterate_episodes(split, episodes, data.preprocessing_for()))


def test_pickle_with_the_wrong_content(tmp_path):
    (tmp_path / PICKLE_NAMES["test"]).write_bytes(pickle.dumps({"data": np.zeros((2, 4, 4, 3)), "labels": [1, 2]}))
    with pytest.raises(DMFExportError, match=r"'data' must be uint8 images \[N, H, W, 3\], found float64"):
        data.open_split(tmp_path, "test")


def test_images_of_different_sizes_without_resize(tmp_path):
    folder = tmp_path / "test" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(folder / "1.jpg")
    Image.new("RGB", (30, 32)).save(folder / "2.jpg")
    split = data.open_split(tmp_path, "test")
    with pytest.raises(DMFExportError, match=r"2\.jpg is 30×32 but .*1\.jpg is 32×32"):
        split.pixels([0, 1], data.preprocessing_for(cifar=True))


def test_prefetch_keeps_only_a_few_episodes_in_flight():
    started = []

    def task(n):
        started.append(n)
        return n

    stream = data.prefetched((lambda n=n: task(n) for n in range(100)), workers=2, ahead=3)
    assert next(stream) == 0
    assert len(started) <= 4  # three submitted ahead, one more after the first result
    assert list(stream) == list(range(1, 100))


# -- episodes drawn lazily: the original's digits do not move -----------------------------

def test_lazy_draws_are_the_originals_over_2000_episodes(pickle_root):
    # test.py's run: 2000 episodes, 5-way 1-shot, 15 queries per class, seed 112; the
    # reference is the original's sampler re-rendered in fewshot_data (the module-level
    # random, its own draw order), not this module's code
    with open(pickle_root / PICKLE_NAMES["test"], "rb") as handle:
        labels = pickle.load(handle)["labels"]
    labels2inds, labelIds = original_pickle_index(labels)
    expected = original_episodes(labels2inds, labelIds, 5, 1, 75, 2000, 112)
    drawn = data.draw_episodes(data.open_split(pickle_root, "test"), 2000, 5, 1, 15, 112)
    assert [(list(e.classes), list(e.query), list(e.support)) for e in drawn] == expected


def test_draws_are_made_as_consumed(pickle_root):
    split = data.open_split(pickle_root, "test")
    drawn = data.draw_episodes(split, 10 ** 15, 5, 1, 15)  # a list of these would never end
    first = [next(drawn) for _ in range(3)]
    with open(pickle_root / PICKLE_NAMES["test"], "rb") as handle:
        labels2inds, labelIds = original_pickle_index(pickle.load(handle)["labels"])
    assert [(list(e.classes), list(e.query), list(e.support)) for e in first] == \
        original_episodes(labels2inds, labelIds, 5, 1, 75, 3)


def test_episode_size_is_checked_before_the_first_draw(folder_root):
    split = data.open_split(folder_root, "test")
    with pytest.raises(DMFExportError, match="13-way episodes need at least 13"):
        data.draw_episodes(split, 10 ** 15, way=13)  # not on the first next()


def test_prefetch_depth_does_not_grow_with_the_thread_count():
    started = []
    stream = data.prefetched((lambda n=n: started.append(n) or n for n in range(10_000)), workers=1000)
    assert next(stream) == 0
    # 8 submitted before the first result, one more after it, whatever workers says
    assert len(started) <= 9
    stream.close()


# -- labels and names in the shapes datasets store them -------------------------------------

def _pickle_with(tmp_path, labels, **extra):
    images = np.zeros((4, 2, 2, 3), np.uint8)  # four images, whatever the labels say
    path = tmp_path / PICKLE_NAMES["test"]
    path.write_bytes(pickle.dumps({"data": images, "labels": labels, **extra}, protocol=2))
    return tmp_path


@pytest.mark.parametrize("labels", [
    np.array([[7], [3], [7], [3]]),                     # a column, as numpy scripts save it
    np.array([7, 3, 7, 3], dtype=np.int32),
    [np.int64(7), 3, np.uint8(7), 3],
])
def test_integer_labels_in_any_unambiguous_container(tmp_path, labels):
    split = data.open_split(_pickle_with(tmp_path, labels), "test")
    assert split.class_ids == [3, 7] and split.images_of == {3: [1, 3], 7: [0, 2]}


def test_string_labels(tmp_path):
    split = data.open_split(_pickle_with(tmp_path, np.array(["n02", "n01", "n02", "n01"])), "test")
    assert split.class_ids == ["n01", "n02"] and split.images_of["n02"] == [0, 2]


@pytest.mark.parametrize("labels, needle", [
    (np.array([[1, 2], [3, 4], [5, 6], [7, 8]]), r"found an array of shape \[4, 2\]"),
    (np.array([1.0, 2.0, 1.0, 2.0]), "found an array of float64"),
    ([1, 2, [3], 4], "label 2 is list"),
    ([1, 2, True, 4], "label 2 is bool"),
    ({"a": 1}, "found dict"),
    ([1, 2, 3], "found 3"),
    ([1, "a", 1, "a"], "mixes integers and strings"),
])
def test_labels_that_are_not_plain_class_ids_are_one_line(tmp_path, labels, needle):
    root = _pickle_with(tmp_path, labels)
    with pytest.raises(DMFExportError, match=needle):
        data.open_split(root, "test")


def test_class_names_that_are_not_labels_are_one_line(tmp_path):
    root = _pickle_with(tmp_path, [1, 2, 1, 2], catname2label={"n01": [1], "n02": {"x": 2}})
    with pytest.raises(DMFExportError, match="'catname2label' must map class names"):
        data.open_split(root, "test")


def test_a_pickle_of_no_images_says_so(tmp_path):
    # Python 3 writes an empty array's data in protocol 2 as bytes(): not a hostile file
    path = tmp_path / PICKLE_NAMES["test"]
    path.write_bytes(pickle.dumps({"data": np.zeros((0, 84, 84, 3), np.uint8), "labels": []}, protocol=2))
    assert b"bytes" in path.read_bytes()
    with pytest.raises(DMFExportError, match=r"holds no images"):
        data.open_split(tmp_path, "test")


@pytest.mark.parametrize("content, kind", [
    (b"\x1f\x8b\x08\x00" + bytes(40), "a gzip file"),
    (b"PK\x05\x06" + bytes(18), "a zip archive"),
    (b"\x89PNG\r\n\x1a\n" + bytes(20), "a PNG image"),
    (b"data,labels\n1,2\n", "a text file"),
    (b"", "an empty file"),
])
def test_a_file_that_is_not_a_pickle_is_named_as_what_it_is(tmp_path, content, kind):
    (tmp_path / PICKLE_NAMES["test"]).write_bytes(content)
    with pytest.raises(DMFExportError, match=rf"{PICKLE_NAMES['test']} is {kind}, not a pickle"):
        data.open_split(tmp_path, "test")


def test_a_truncated_pickle_is_one_line(tmp_path):
    whole = pickle.dumps({"data": np.zeros((4, 2, 2, 3), np.uint8), "labels": [1, 2, 1, 2]}, protocol=2)
    (tmp_path / PICKLE_NAMES["test"]).write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DMFExportError, match="truncated or not"):
        data.open_split(tmp_path, "test")


# -- folder trees: loops and unreadable entries skipped and counted --------------------------

def test_symlink_loops_are_skipped_and_counted(tmp_path):
    root = write_folders(tmp_path, classes=3, images=2, size=16)
    first = sorted((root / "test").iterdir())[0]
    os.symlink("loop.jpg", first / "loop.jpg")           # a file-level loop
    os.symlink("class_loop", root / "test" / "class_loop")  # a class-level loop
    os.symlink("missing.jpg", first / "dangling.jpg")
    split = data.open_split(root, "test")
    assert len(split.class_ids) == 3 and len(split) == 6
    line = data.describe_skipped(split.skipped)
    assert line.startswith("skipped 3 entries that cannot be read (a dangling link, a symlink loop)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode")
def test_an_unreadable_class_folder_is_skipped_and_counted(tmp_path):
    root = write_folders(tmp_path, classes=3, images=2, size=16)
    locked = sorted((root / "test").iterdir())[1]
    locked.chmod(0)
    try:
        split = data.open_split(root, "test")
        assert len(split.class_ids) == 2
        assert "permission denied" in data.describe_skipped(split.skipped)
    finally:
        locked.chmod(0o755)


def test_query_folders_skip_loops(tmp_path):
    folder = tmp_path / "q"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "b.jpg")
    Image.new("RGB", (8, 8)).save(folder / "sub" / "a.jpg")
    os.symlink("..", folder / "sub" / "up")      # a directory loop: not followed
    os.symlink("x.jpg", folder / "x.jpg")        # a file loop
    skipped = []
    assert data.query_files([folder], skipped) == [folder / "b.jpg", folder / "sub" / "a.jpg"]
    assert [why for _, why in skipped] == ["a symlink loop"]


# -- image modes: 16-bit scaled, warnings of our own ----------------------------------------

def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
    pixels = data.read_image(tmp_path / "deep.png", data.preprocessing_for(cifar=True))
    # v·255/65535 rounded: 0, 1, 127.5→128, 255; the same in R, G and B
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (pixels == pixels[..., :1]).all()


def test_a_decompression_bomb_is_refused_in_our_words(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: Pillow warns (over 2000: raises)
    with pytest.raises(DMFExportError, match=r"big\.png: too many pixels to decode safely"):
        data.read_images([tmp_path / "big.png"], data.preprocessing_for(cifar=True))  # no crop, no resize


def test_a_palette_with_transparency_decodes_without_pillows_warning(tmp_path, recwarn):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    # two entries not opaque: Pillow keeps the transparency as bytes, and warns on RGB
    image.save(tmp_path / "p.png", transparency=bytes([0, 128] + [255] * 254))
    with Image.open(tmp_path / "p.png") as saved:
        assert isinstance(saved.info["transparency"], bytes)
    pixels = data.read_image(tmp_path / "p.png", data.preprocessing_for(cifar=True))
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert not [w for w in recwarn if "Palette" in str(w.message)]


# -- memory: bounded whatever --episodes and --workers say --------------------------------

_READER = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[2])
from dmf_export import data

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

split = data.open_split(sys.argv[1], "test")
episodes = data.draw_episodes(split, 10 ** 8, 5, 1, 15)
base, peak, threads = rss_mb(), 0.0, 0
stream = data.iterate_episodes(split, episodes, data.preprocessing_for(), workers=1000)
first = next(stream)
end = time.monotonic() + 3.0
while time.monotonic() < end:  # a consumer that stalls half the time: the pool fills up
    peak, threads = max(peak, rss_mb()), max(threads, threading.active_count())
    if int(time.monotonic() * 4) % 2:
        next(stream)
    else:
        time.sleep(0.05)
print(json.dumps({"base": base, "peak": peak, "threads": threads}))
stream.close()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_reader_memory_is_bounded_at_1e8_episodes_and_1000_workers(tmp_path):
    # 84×84 episodes of 80 images: 80·3·84·84·4 B = 6.8 MB of float32 each. Bound, above
    # the RSS with the split open: 8 decoded ahead (55 MB), 8 in the making with their
    # uint8 and float copies (8 · 10.2 = 82 MB), one in the consumer's hands (7 MB), and
    # 150 MB the allocator may keep in its per-thread arenas: 300 MB. Drawing all 10^8
    # episodes first (as before) never reaches the first episode; 2000 decoded ahead for
    # 1000 workers (as before) passes the bound within the first second.
    root = write_pickle(tmp_path, classes=12, images=25, size=84)
    script = tmp_path / "reader.py"
    script.write_text(_READER)
    done = subprocess.run([sys.executable, str(script), str(root), str(Path(__file__).parent.parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["peak"] - figures["base"] < 300, figures
    assert figures["threads"] <= 8 + 1, figures  # the pool's cap, and the main thread
