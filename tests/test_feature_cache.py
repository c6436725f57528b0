"""The feature cache of ``evaluate``: each distinct image encoded once, the same digits.

The reference for the cached path is the uncached one (``--no-feature-cache``), which
tests/test_evaluate.py holds to the original's pipeline; the cache's plan is checked
against decisions derived by hand, and its encode count against the images of the
episodes as the original's sampler (tests/fewshot_data.py) draws them.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from cli_helpers import one_error_line, run_cli
from conftest import EXPORT_IMAGE
from dmf_export.data import Episode
from dmf_export.feature_cache import ENCODE_BATCH, encode_fixed, plan
from fewshot_data import PICKLE_NAMES, original_episodes, original_pickle_index, write_folders, write_pickle

EPISODES, QUERIES = 6, 2  # 5-way 1-shot, 2 queries per class: 15 images an episode, of 60

pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def split_models(exported):
    """The checkpoint, its split ONNX and TorchScript exports (encoders' paths) at 32×32."""
    checkpoint, (onnx_encoder, _) = exported(64, 1, "onnx", graph="split")
    _, (torchscript_encoder, _) = exported(64, 1, "torchscript", graph="split")
    return {"eager": checkpoint, "onnx": onnx_encoder, "torchscript": torchscript_encoder}


@pytest.fixture(scope="module")
def pickle_root(tmp_path_factory):
    # 12 classes × 5 images: each image drawn about 1.5 times in 6 episodes
    return write_pickle(tmp_path_factory.mktemp("pickle"), classes=12, images=5, size=EXPORT_IMAGE)


def _evaluate(*args):
    code, output = run_cli("evaluate", *args, "--json", "--threads", 2, "--image-size", EXPORT_IMAGE,
                           "--episodes", EPISODES, "--queries-per-class", QUERIES, "--no-progress")
    assert code == 0, output
    return json.loads(output)


def _distinct_images(root):
    """Distinct images of the episodes, drawn by the original's sampler (not dmf_export's)."""
    content = pickle.load(open(root / PICKLE_NAMES["test"], "rb"))
    labels2inds, label_ids = original_pickle_index(content["labels"])
    episodes = original_episodes(labels2inds, label_ids, 5, 1, 5 * QUERIES, EPISODES)
    return len({i for _, query, support in episodes for i, _ in query + support})


def _figures(report, path):
    model = next(m for m in report["models"] if m["path"] == str(path))
    return (f"{model['accuracy']:.2%} {model['ci95']:.2%}",
            [e["predicted"][str(path)] for e in report["per_episode"]], model)


@pytest.fixture(scope="module")
def both_paths(split_models, pickle_root):
    """One cached and one uncached evaluation of the three split models."""
    paths = list(split_models.values())
    return (_evaluate(*paths, "--data", pickle_root),
            _evaluate(*paths, "--data", pickle_root, "--no-feature-cache"))


@pytest.mark.parametrize("name", ["eager", "onnx", "torchscript"])
def test_cached_and_uncached_give_the_same_digits_and_predictions(split_models, pickle_root,
                                                                  both_paths, name):
    cached, uncached = both_paths
    digits, predictions, model = _figures(cached, split_models[name])
    assert (digits, predictions) == _figures(uncached, split_models[name])[:2]
    # and the scores to the bit: the hardest queries' margins (float32 from the scores)
    margins = [(h["episode"], h["query"], h["margin"][str(split_models[name])]) for h in cached["hardest"]]
    assert margins == [(h["episode"], h["query"], h["margin"][str(split_models[name])])
                       for h in uncached["hardest"]]
    figures = model["feature_cache"]
    assert figures["used"] is True
    # every image encoded exactly once; every later use a hit
    distinct = _distinct_images(pickle_root)
    assert figures["encodes"] == distinct < EPISODES * 5 * (1 + QUERIES)
    assert figures["hits"] == EPISODES * 5 * (1 + QUERIES) - distinct
    assert _figures(uncached, split_models[name])[2]["feature_cache"] == {
        "used": False, "reason": "--no-feature-cache"}


@pytest.mark.parametrize("overflow", ["spill", "recompute"])
def test_a_cap_smaller_than_the_split_gives_the_same_digits(split_models, pickle_root, both_paths,
                                                            overflow):
    # 32×32 images: 640×4×4 float32 features, 40,960 bytes; 0.2 MB holds 4 of 60 images
    report = _evaluate(split_models["onnx"], "--data", pickle_root, "--cache-mb", 0.2,
                       "--cache-overflow", overflow)
    digits, predictions, model = _figures(report, split_models["onnx"])
    assert (digits, predictions) == _figures(both_paths[1], split_models["onnx"])[:2]
    onnx = str(split_models["onnx"])
    assert ([(h["episode"], h["query"], h["margin"][onnx]) for h in report["hardest"]] ==
            [(h["episode"], h["query"], h["margin"][onnx]) for h in both_paths[1]["hardest"]])
    figures = model["feature_cache"]
    distinct = _distinct_images(pickle_root)
    assert figures["capacity_images"] == 4
    assert figures["peak_mb"] <= 0.2
    if overflow == "spill":
        assert figures["encodes"] == distinct and figures["spill_writes"] > 0
        assert figures["spill_reads"] >= figures["spill_writes"]
    else:
        assert figures["encodes"] > distinct and figures["spill_writes"] == 0


def test_image_folders_cached_and_uncached_agree(split_models, tmp_path):
    # --cifar: image files used at their stored size (no resize or crop), 32×32 as exported
    root = write_folders(tmp_path, classes=6, images=3, size=EXPORT_IMAGE)

    def evaluate(*extra):
        code, output = run_cli("evaluate", split_models["onnx"], "--data", root, "--cifar",
                               "--episodes", 3, "--queries-per-class", 1, "--threads", 2, "--json",
                               "--no-progress", *extra)
        assert code == 0, output
        return json.loads(output)

    cached, uncached = evaluate(), evaluate("--no-feature-cache")
    assert _figures(cached, split_models["onnx"])[:2] == _figures(uncached, split_models["onnx"])[:2]
    assert cached["layout"] == "folders"
    assert cached["models"][0]["feature_cache"]["used"] is True


def test_a_whole_episode_artifact_says_once_that_it_runs_uncached(exported, pickle_root):
    _, (episode_onnx,) = exported(64, 1, "onnx")
    code, output = run_cli("evaluate", episode_onnx, "--data", pickle_root, "--episodes", 3,
                           "--queries-per-class", QUERIES, "--threads", 2, "--no-progress")
    assert code == 0, output
    notices = [line for line in output.splitlines() if "uncached" in line]
    assert len(notices) == 1 and "whole-episode graph" in notices[0], output


def test_server_and_model_paths_do_not_mix(split_models, pickle_root):
    code, output = run_cli("evaluate", split_models["onnx"], "--server", "localhost:1",
                           "--data", pickle_root)
    assert code == 2
    assert "give no model paths" in one_error_line(output)


# -- the plan, against decisions derived by hand ---------------------------------------

def _episodes(*image_sets):
    """Episodes of one support image and the rest queries (labels do not matter here)."""
    return [Episode((0,), ((images[0], 0),), tuple((i, 0) for i in images[1:]))
            for images in image_sets]


def test_the_plan_evicts_the_image_used_furthest_ahead_and_spills_what_is_used_again():
    # uses: 1 → episodes 0, 2; 2 → 0, 1, 3; 3 → 1, 2. One slot.
    steps = plan(_episodes([1, 2], [3, 2], [1, 3], [2]), capacity=1, overflow="spill").steps
    # e0: 1 kept, then 2 (next use 1) displaces 1 (next use 2), which is spilled
    assert (steps[0].encode, steps[0].read) == ([1, 2], [])
    assert steps[0].after == [("keep", 1), ("spill", 1), ("drop", 1), ("keep", 2)]
    # e1: 2 is a hit, next used in 3; 3 (next used in 2) displaces it
    assert (steps[1].encode, steps[1].read) == ([3], [])
    assert steps[1].after == [("spill", 2), ("drop", 2), ("keep", 3)]
    # e2: 1 back from the file, 3's last use drops it; e3: 2 from the file
    assert (steps[2].encode, steps[2].read, steps[2].after) == ([], [1], [("drop", 3)])
    assert (steps[3].encode, steps[3].read, steps[3].after) == ([], [2], [])


def test_the_recompute_plan_encodes_again_what_it_could_not_keep():
    steps = plan(_episodes([1, 2], [3, 2], [1, 3], [2]), capacity=1, overflow="recompute").steps
    assert [s.encode for s in steps] == [[1, 2], [3], [1], [2]]
    assert [s.read for s in steps] == [[], [], [], []]
    assert steps[1].after == [("drop", 2), ("keep", 3)]


def test_encoder_calls_all_take_the_same_number_of_images():
    shapes = []

    def encoder(images):
        shapes.append(images.shape[0])
        return images[:, :1] * 2  # a per-image function: the padding's outputs must be dropped

    images = torch.arange(2 * ENCODE_BATCH + 3, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    features = encode_fixed(encoder, images)
    assert shapes == [ENCODE_BATCH] * 3
    assert torch.equal(features, images[:, :1] * 2)


# -- predict ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predict_folders(tmp_path_factory):
    """A support folder of 3 classes × 2 images and 80 queries in 4 folders: two chunks of
    queries (75 + 5), 32×32 as exported (--cifar: used at their stored size)."""
    root = tmp_path_factory.mktemp("predict")
    support = write_folders(root / "support", classes=3, images=2, size=EXPORT_IMAGE) / "test"
    queries = write_folders(root / "queries", classes=4, images=20, size=EXPORT_IMAGE) / "test"
    return support, sorted(queries.iterdir())


@pytest.mark.parametrize("name", ["eager", "onnx"])
def test_predict_encodes_once_and_gives_the_same_scores_to_the_bit(split_models, predict_folders, name):
    support, queries = predict_folders

    def predict(*extra):
        code, output = run_cli("predict", split_models[name], *queries, "--support", support, "--cifar",
                               "--threads", 2, "--json", *extra)
        assert code == 0, output
        return json.loads(output)

    cached, uncached = predict(), predict("--no-feature-cache")
    assert (cached["feature_cache"], uncached["feature_cache"]) == (True, False)
    assert len(cached["predictions"]) == 80  # past a chunk's 75
    # JSON floats round-trip exactly: the same scores to the bit, chunk boundary included
    assert cached["predictions"] == uncached["predictions"]
