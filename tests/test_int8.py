"""int8 ONNX exports: the calibration images, the artifacts against the eager fp32
original, and the refusals.

References: the original's sampler and transform as its source writes them
(``fewshot_data``), ``data.load_episode`` (what evaluate feeds), and the eager model.
"""
from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import one_error_line, run_cli
from conftest import EXPORT_IMAGE
from fewshot_data import (original_episodes, original_file_transform, original_folder_index,
                          original_pickle_index, original_transform, write_folders, write_pickle)
from PIL import Image

from dmf_export.contract import TOLERANCES, EpisodeSize, make_episode
from dmf_export.data import calibration_images, draw_episodes, load_episode, open_split, preprocessing_for
from dmf_export.errors import DMFExportError
from dmf_export.export import ExportOptions
from dmf_export.formats import open_artifact, read_info
from dmf_export.verify import compare

EPISODES = 2


def _ordered(ids):
    return list(dict.fromkeys(ids))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("folders"), classes=6, images=17, size=60)


def test_calibration_images_are_the_originals_first_episodes_preprocessed_as_it_does(folders):
    found = calibration_images(folders, "test", EPISODES)
    dataset, labels2inds, label_ids, _ = original_folder_index(folders / "test")
    ids = _ordered(i for _, query, support in original_episodes(labels2inds, label_ids, 5, 1, 75, EPISODES)
                   for i, _ in support + query)
    expected = np.stack([original_file_transform(dataset[i][0]) for i in ids])
    assert found.images.shape == (len(ids), 3, 84, 84) and found.layout == "folders"
    np.testing.assert_allclose(found.images.numpy(), expected, rtol=0, atol=1e-5)


def test_calibration_images_are_the_tensors_evaluate_feeds(folders, tmp_path):
    pickled = write_pickle(tmp_path, classes=6, images=17, size=84)
    for root in (folders, pickled):
        split = open_split(root, "test")
        fed = {}
        for episode in draw_episodes(split, EPISODES):
            tensors = load_episode(split, episode, preprocessing_for(False))
            images = torch.cat([tensors.support, tensors.query])
            for (index, _), image in zip(episode.support + episode.query, images):
                fed.setdefault(index, image)
        found = calibration_images(root, "test", EPISODES)
        assert torch.equal(found.images, torch.stack(list(fed.values()))), root


def test_pickled_calibration_images_are_used_as_stored(tmp_path):
    root = write_pickle(tmp_path, classes=6, images=17, size=84)
    with open(next(root.glob("*test.pickle")), "rb") as handle:
        content = pickle.load(handle)
    label2inds, label_ids = original_pickle_index(content["labels"])
    ids = _ordered(i for _, query, support in original_episodes(label2inds, label_ids, 5, 1, 75, 1)
                   for i, _ in support + query)
    expected = np.stack([original_transform(Image.fromarray(content["data"][i])) for i in ids])
    np.testing.assert_allclose(calibration_images(root, "test", 1).images.numpy(), expected, atol=1e-5)


def test_calibration_images_are_capped(folders):
    assert len(calibration_images(folders, "test", 3, limit=50).images) == 50


# -- the artifacts against the eager original ----------------------------------------------

def _int8(exported, calibration_split, graph):
    return exported(64, 1, "onnx", precision="int8", calibrate=str(calibration_split), calib_episodes=1,
                    calib_transform="cifar-fs", graph=graph)


@pytest.mark.parametrize("graph", ["episode", "split"])
def test_int8_onnx_is_within_the_int8_tolerance_of_the_eager_original(
        exported, calibration_split, eager, graph):
    checkpoint, paths = _int8(exported, calibration_split, graph)
    runner = open_artifact(paths[0])
    model = eager(checkpoint)
    tolerance = TOLERANCES["int8"]
    for seed, size in enumerate([EpisodeSize(5, 1, 6), EpisodeSize(3, 2, 4), EpisodeSize(2, 1, 1)]):
        episode = make_episode(size, EXPORT_IMAGE, seed=seed)
        with torch.inference_mode():
            expected = model(*episode)
        scores = runner(*episode)
        result = compare(scores, expected, tolerance, str(size))
        assert result.passed, result
        assert not torch.equal(scores, expected.float())  # it is quantized: not the fp32 scores
    info = read_info(paths[0])
    assert info.precision == "int8" and info.calibration["images"] == 80
    assert info.calibration["method"] == "minmax" and info.calibration["split"] == "test"


@pytest.mark.parametrize("graph", ["episode", "split"])
def test_only_the_backbone_is_int8_and_the_head_stays_fp32(exported, calibration_split, graph):
    _, paths = _int8(exported, calibration_split, graph)
    model = onnx.load(str(paths[0]))
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8_convs = [n for n in convs if n.input[1] in {o for d in model.graph.node if d.op_type == "DequantizeLinear"
                                                     for o in d.output}]
    assert len(int8_convs) == 16 and quantized
    assert len(convs) == (16 if graph == "split" else 19)  # the head's offset and tap convs stay fp32
    if graph == "split":
        head = onnx.load(str(paths[1]))
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in head.graph.node)
        assert any(n.op_type == "DeformConv" for n in head.graph.node)


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("options, needle", [
    ({"precision": "int8"}, "--precision int8 needs --calibrate DATA"),
    ({"calibrate": "x"}, "--calibrate applies to --precision int8"),
    ({"calib_method": "entropy"}, "--calib-method applies to --precision int8"),
    ({"precision": "int8", "calibrate": "x", "onnx_flavor": "plugin"}, "not the plugin flavour"),
    ({"precision": "int8", "format": "tensorrt"}, "TensorRT artifacts come in fp32, fp16, not int8"),
    ({"precision": "int8", "format": "torchscript"}, "TorchScript artifacts come in"),
    ({"precision": "int8", "calibrate": "x", "format": "aoti"}, "--calibrate applies to --format onnx or triton"),
    ({"precision": "int8", "calibrate": "x", "format": "triton", "variants": ("onnx", "torchscript")},
     "use --variants onnx"),
    ({"precision": "int8", "calibrate": "x", "calib_episodes": 101}, "--calib-episodes must be ≤ 100"),
])
def test_int8_options_that_do_not_go_together_are_refused_in_one_line(options, needle):
    options = {"format": "onnx", **options}
    with pytest.raises(DMFExportError, match=needle.replace("(", r"\(")):
        ExportOptions(**options).check()


def _empty_split(root):
    (root / "test" / "a_class").mkdir(parents=True)
    return root


@pytest.mark.parametrize("data, extra, needle", [
    (lambda tmp, split: tmp / "nowhere", [], "no such folder"),
    (lambda tmp, split: _empty_split(tmp / "empty"), [], "holds no images"),
    (lambda tmp, split: split, [], "after preprocessing, but the export is for 32×32"),
])
def test_bad_calibration_data_is_one_line_and_nothing_is_written(
        tmp_path, calibration_split, data, extra, needle, exported):
    checkpoint, _ = exported(64, 1, "onnx")
    output = tmp_path / "out.onnx"
    code, text = run_cli("export", checkpoint, "-f", "onnx", "--precision", "int8", "--calibrate",
                         data(tmp_path, calibration_split), "--image-size", EXPORT_IMAGE, "-o", output, *extra)
    assert code == 2 and needle in one_error_line(text), text
    assert {p.name for p in tmp_path.iterdir()} <= {"empty"}  # no output, no staged file
