"""``dmf-export evaluate`` and ``predict`` on small datasets written by the tests.

The reference for evaluate's figures is the original's pipeline re-rendered in the test
(its index, sampler, transform and test.py's formulas) feeding the eager model; eager,
ONNX and TorchScript must then agree. Models are the seeded random checkpoint (its
accuracy is near chance; what matters is that every path gives the same answers).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import click
from click.testing import CliRunner

import dmf_export
from cli_helpers import one_error_line, run_cli
from conftest import EXPORT_IMAGE
from dmf_export.synthetic import write_random_checkpoint
from dmf_export import evaluate as evaluate_module
from dmf_export.cli import main as cli
from dmf_export.evaluate import open_model
from fewshot_data import (PICKLE_NAMES, draw, original_episodes, original_figures, original_file_transform,
                          original_folder_index, original_pickle_index, original_transform,
                          write_folders, write_pickle)

SMALL = EXPORT_IMAGE  # artifacts exported at 32×32 keep episodes quick; the pickles are stored at it
EPISODES, QUERIES = 3, 2  # 5-way 1-shot, 2 queries per class: 15 images an episode

pytestmark = pytest.mark.usefixtures("two_threads")  # episodes at the speed CI sees


@pytest.fixture(scope="module")
def models(exported):
    """A checkpoint and its ONNX and TorchScript exports at 32×32 (the session's)."""
    checkpoint, (onnx_path,) = exported(64, 1, "onnx")
    _, (torchscript_path,) = exported(64, 1, "torchscript")
    return {"eager": checkpoint, "onnx": onnx_path, "torchscript": torchscript_path}


@pytest.fixture(scope="module")
def pickle_root(tmp_path_factory):
    return write_pickle(tmp_path_factory.mktemp("pickle"), classes=12, images=25, size=SMALL)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("folders"), classes=12, images=25, size=60)


def _json(*args):
    code, output = run_cli("evaluate", *args, "--json", "--threads", 2)
    assert code == 0, output
    return json.loads(output)


@pytest.fixture(scope="module")
def three_models(models, pickle_root):
    """One evaluation of eager, ONNX and TorchScript on the same pickled episodes."""
    return _json(models["eager"], models["onnx"], models["torchscript"], "--data", pickle_root,
                 "--episodes", EPISODES, "--queries-per-class", QUERIES, "--image-size", SMALL)


def _reference_correct(model, episodes, image_of):
    """Per-episode correct counts of ``model`` on the original's episodes."""
    correct = []
    for classes, query, support in episodes:
        tensor = lambda pairs: torch.tensor(np.stack([image_of(i) for i, _ in pairs]),  # noqa: E731
                                            dtype=torch.float32)
        labels = torch.nn.functional.one_hot(torch.tensor([k for _, k in support]), len(classes)).float()
        with torch.inference_mode():
            scores = model(tensor(support), labels, tensor(query))
        correct.append(int((scores.argmax(1) == torch.tensor([k for _, k in query])).sum()))
    return correct


def test_evaluate_gives_the_originals_figures_on_pickles(models, pickle_root, three_models):
    content = pickle.load(open(pickle_root / PICKLE_NAMES["test"], "rb"))
    labels2inds, label_ids = original_pickle_index(content["labels"])
    episodes = original_episodes(labels2inds, label_ids, 5, 1, 5 * QUERIES, EPISODES)
    model = dmf_export.load_checkpoint(models["eager"])
    correct = _reference_correct(model, episodes,
                                 lambda i: original_transform(Image.fromarray(content["data"][i])))
    eager = str(models["eager"])
    assert [e["correct"][eager] for e in three_models["per_episode"]] == correct
    accuracy, ci95 = original_figures(correct, 5 * QUERIES)
    figures = three_models["models"][0]
    # test.py averages float32 episode accuracies: the same to ~1e-8, and to the printed digit
    assert figures["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert figures["ci95"] == pytest.approx(ci95, abs=1e-6)
    assert f"{figures['accuracy']:.2%} {figures['ci95']:.2%}" == f"{accuracy:.2%} {ci95:.2%}"
    assert three_models["per_episode"][0]["classes"] == [f"n{c:08d}" for c in episodes[0][0]]


def test_eager_onnx_and_torchscript_agree_on_every_query(three_models):
    backends = [m["backend"] for m in three_models["models"]]
    assert backends == ["eager", "onnxruntime", "torchscript"]
    assert len({m["accuracy"] for m in three_models["models"]}) == 1
    for agreement in three_models["agreement"]:
        assert agreement["episodes_identical"] == EPISODES
        assert agreement["queries_identical"] == agreement["queries"] == EPISODES * 5 * QUERIES
        assert agreement["largest_episode_difference"] == 0.0


def test_evaluate_gives_the_originals_figures_on_image_folders(models, folder_root):
    report = _json(models["eager"], "--data", folder_root, "--episodes", 1, "--queries-per-class", 1)
    dataset, labels2inds, label_ids, _ = original_folder_index(folder_root / "test")
    episodes = original_episodes(labels2inds, label_ids, 5, 1, 5, 1)
    model = dmf_export.load_checkpoint(models["eager"])
    correct = _reference_correct(model, episodes, lambda i: original_file_transform(dataset[i][0]))
    assert [e["correct"][str(models["eager"])] for e in report["per_episode"]] == correct
    assert report["layout"] == "folders"


def test_evaluate_prints_the_originals_line_and_the_agreement(models, pickle_root):
    code, output = run_cli("evaluate", models["onnx"], models["torchscript"], "--data", pickle_root,
                           "--episodes", 2, "--queries-per-class", QUERIES, "--threads", 2)
    assert code == 0, output
    report = _json(models["onnx"], "--data", pickle_root, "--episodes", 2, "--queries-per-class", QUERIES)
    figures = report["models"][0]
    line = f"Accuracy: {figures['accuracy']:.2%}, ci95: {figures['ci95']:.2%}"
    lines = output.splitlines()
    assert sum(line in text for text in lines) == 2
    assert any("predictions identical in 2/2 episodes (20/20 queries)" in text for text in lines)


# -- predict ---------------------------------------------------------------------------

@pytest.fixture
def support_and_queries(tmp_path):
    """Support classes with 3, 1 and 2 images (PNG, 32×32), four query images."""
    shots = {"circle_red": (0, 3), "square_green": (7, 1), "cross_blue": (8, 2)}
    for name, (class_index, count) in shots.items():
        (tmp_path / "support" / name).mkdir(parents=True)
        for i in range(count):
            draw(class_index, i, SMALL).save(tmp_path / "support" / name / f"{i}.png")
    (tmp_path / "queries").mkdir()
    for n, class_index in enumerate((7, 0, 8)):
        draw(class_index, 50 + n, SMALL).save(tmp_path / "queries" / f"q{n}.png")
    draw(0, 60, SMALL).save(tmp_path / "single.png")
    return tmp_path / "support", [tmp_path / "queries", tmp_path / "single.png"]


def _reference_scores(checkpoint, support_dir, query_paths):
    classes = sorted(p.name for p in support_dir.iterdir())
    support = [(k, p) for k, c in enumerate(classes) for p in sorted((support_dir / c).iterdir())]
    as_tensor = lambda paths: torch.tensor(np.stack([original_file_transform(p, cifar=True) for p in paths]),  # noqa: E731
                                           dtype=torch.float32)
    labels = torch.nn.functional.one_hot(torch.tensor([k for k, _ in support]), len(classes)).float()
    with torch.inference_mode():
        scores = dmf_export.load_checkpoint(checkpoint)(as_tensor([p for _, p in support]), labels,
                                                        as_tensor(query_paths))
    return classes, scores


def test_predict_with_unequal_shots_scores_as_the_eager_model(models, support_and_queries):
    support_dir, queries = support_and_queries
    code, output = run_cli("predict", models["onnx"], *queries, "--support", support_dir, "--cifar", "--json")
    assert code == 0, output
    report = json.loads(output)
    query_paths = sorted(queries[0].iterdir()) + [queries[1]]
    classes, expected = _reference_scores(models["eager"], support_dir, query_paths)
    assert [c["images"] for c in report["support"]["classes"]] == [3, 2, 1]  # circle, cross, square (sorted)
    assert [p["query"] for p in report["predictions"]] == [str(p) for p in query_paths]
    scores = torch.tensor([[p["scores"][c] for c in classes] for p in report["predictions"]])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert [p["class"] for p in report["predictions"]] == [classes[k] for k in expected.argmax(1)]


def test_predict_csv_has_a_row_per_query(models, support_and_queries):
    support_dir, queries = support_and_queries
    code, output = run_cli("predict", models["torchscript"], *queries, "--support", support_dir,
                           "--cifar", "--csv")
    assert code == 0, output
    rows = [line.split(",") for line in output.splitlines()]
    assert rows[0] == ["query", "class", "score_circle_red", "score_cross_blue", "score_square_green"]
    assert len(rows) == 5 and all(row[1] in ("circle_red", "cross_blue", "square_green") for row in rows[1:])


def test_predict_text_names_each_query_and_its_class(models, support_and_queries):
    support_dir, queries = support_and_queries
    _, json_output = run_cli("predict", models["onnx"], *queries, "--support", support_dir, "--cifar", "--json")
    code, output = run_cli("predict", models["onnx"], *queries, "--support", support_dir, "--cifar")
    assert code == 0, output
    lines = output.splitlines()[1:]
    expected = [(p["query"], p["class"]) for p in json.loads(json_output)["predictions"]]
    assert [tuple(line.split()[:2]) for line in lines] == expected


# -- which paths are what ---------------------------------------------------------------

def test_a_pt_file_is_a_checkpoint_or_torchscript_by_its_content(models, tmp_path):
    shutil.copy(models["torchscript"], tmp_path / "graph.pt")
    write_random_checkpoint(tmp_path / "weights.pt", legacy=False)
    assert open_model(tmp_path / "graph.pt").backend == "torchscript"
    assert open_model(tmp_path / "weights.pt").backend == "eager"


# -- bad data: one line naming it, exit 2, nothing run ----------------------------------

def _error(*args):
    code, output = run_cli(*args)
    assert code == 2, output
    return one_error_line(output)


def test_evaluate_missing_split(models, pickle_root):
    line = _error("evaluate", models["onnx"], "--data", pickle_root, "--split", "val")
    assert "has no val split" in line


def test_evaluate_refuses_a_pickle_that_would_create_a_file(models, tmp_path):
    target = tmp_path / "created"

    class Payload:
        def __reduce__(self):
            return (open, (str(target), "w"))

    (tmp_path / PICKLE_NAMES["test"]).write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}))
    line = _error("evaluate", models["onnx"], "--data", tmp_path)
    assert "refusing to load" in line and PICKLE_NAMES["test"] in line
    assert not target.exists()


def test_evaluate_image_that_does_not_decode(models, tmp_path):
    root = write_folders(tmp_path, classes=5, images=2, size=SMALL)
    broken = sorted((root / "test").iterdir())[1] / "img_001.jpg"
    broken.write_bytes(b"GIF89a garbage")
    line = _error("evaluate", models["onnx"], "--data", root, "--queries-per-class", 1, "--cifar")
    assert f"{broken}: cannot decode it as an image" in line


def test_evaluate_class_with_too_few_images(models, pickle_root):
    line = _error("evaluate", models["onnx"], "--data", pickle_root, "--shot", 5, "--queries-per-class", 21)
    assert "has 25 images; 5-shot episodes with 21 queries per class need 26" in line


def test_evaluate_way_larger_than_the_split(models, pickle_root):
    line = _error("evaluate", models["onnx"], "--data", pickle_root, "--way", 20)
    assert "has 12 classes; 20-way episodes need at least 20" in line


def test_evaluate_artifact_for_another_image_size(models, folder_root):
    line = _error("evaluate", models["onnx"], "--data", folder_root, "--episodes", 1)
    assert "takes 32×32 images; these are 84×84" in line


def test_predict_support_folder_problems(models, tmp_path):
    assert "no such folder" in _error("predict", models["onnx"], tmp_path, "--support", tmp_path / "nope")
    (tmp_path / "support" / "empty_class").mkdir(parents=True)
    line = _error("predict", models["onnx"], tmp_path, "--support", tmp_path / "support")
    assert "empty_class: no images in this class folder" in line


def test_predict_missing_query(models, support_and_queries):
    support_dir, queries = support_and_queries
    line = _error("predict", models["onnx"], queries[1].parent / "absent.jpg", "--support", support_dir)
    assert "absent.jpg: no such file or folder" in line


# -- one size policy for every format ---------------------------------------------------

def test_a_checkpoint_refuses_images_not_of_its_size_as_an_artifact_does(models, pickle_root):
    # the same 32×32 pickle: the artifact exported at 32 runs it; the checkpoint runs at
    # 84 unless told, and refuses it as the 32×32 artifact refuses 84×84 folders
    line = _error("evaluate", models["eager"], "--data", pickle_root, "--episodes", 1)
    assert "(a checkpoint) runs at 84×84 images here; these are 32×32" in line
    assert "--image-size 32" in line


@pytest.mark.parametrize("size", [1, 8])
def test_tiny_images_are_refused_by_the_checkpoint_and_the_artifact_alike(models, tmp_path, size):
    root = write_pickle(tmp_path, classes=6, images=2, size=size)  # 5·c mod 6: six labels
    for model in (models["eager"], models["onnx"]):
        line = _error("evaluate", model, "--data", root, "--episodes", 1, "--queries-per-class", 1)
        assert f"these are {size}×{size}" in line


def test_a_checkpoint_given_an_image_size_gives_the_artifacts_answer(models, pickle_root):
    eager = _json(models["eager"], "--data", pickle_root, "--episodes", 1, "--queries-per-class", 1,
                  "--image-size", SMALL)
    onnx = _json(models["onnx"], "--data", pickle_root, "--episodes", 1, "--queries-per-class", 1)
    assert eager["per_episode"][0]["correct"][str(models["eager"])] == \
        onnx["per_episode"][0]["correct"][str(models["onnx"])]


# -- data in the wild, through the command line ---------------------------------------------

def _pickle_root(tmp_path, labels=None, **extra):
    root = write_pickle(tmp_path, classes=6, images=2, size=SMALL)  # 5·c mod 6: six labels
    path = root / PICKLE_NAMES["test"]
    content = pickle.load(open(path, "rb"))
    if labels is not None:
        content["labels"] = labels(content["labels"])
    content.update(extra)
    path.write_bytes(pickle.dumps(content, protocol=2))
    return root


def test_evaluate_reads_labels_stored_as_a_column(models, tmp_path):
    column = _pickle_root(tmp_path / "column", lambda labels: np.asarray(labels)[:, None])
    flat = _pickle_root(tmp_path / "flat")
    args = ("--episodes", 2, "--queries-per-class", 1)
    assert _json(models["onnx"], "--data", column, *args)["per_episode"] == \
        _json(models["onnx"], "--data", flat, *args)["per_episode"]


def test_evaluate_class_names_that_are_not_labels(models, tmp_path):
    root = _pickle_root(tmp_path, catname2label={"n01": [64]})
    assert "'catname2label' must map class names" in _error("evaluate", models["onnx"], "--data", root)


def test_evaluate_a_gzipped_pickle(models, tmp_path):
    import gzip
    root = write_pickle(tmp_path, classes=5, images=2, size=SMALL)
    path = root / PICKLE_NAMES["test"]
    path.write_bytes(gzip.compress(path.read_bytes()))
    line = _error("evaluate", models["onnx"], "--data", root)
    assert f"{PICKLE_NAMES['test']} is a gzip file, not a pickle" in line


def test_evaluate_a_pickle_of_no_images(models, tmp_path):
    (tmp_path / PICKLE_NAMES["test"]).write_bytes(pickle.dumps(
        {"data": np.zeros((0, SMALL, SMALL, 3), np.uint8), "labels": []}, protocol=2))
    assert "holds no images" in _error("evaluate", models["onnx"], "--data", tmp_path)


def test_evaluate_skips_symlink_loops_with_one_counted_warning(models, tmp_path):
    root = write_folders(tmp_path, classes=5, images=2, size=SMALL)
    classes = sorted((root / "test").iterdir())
    os.symlink("loop.jpg", classes[0] / "loop.jpg")
    os.symlink("loop", root / "test" / "loop")
    code, output = run_cli("evaluate", models["onnx"], "--data", root, "--episodes", 1,
                           "--queries-per-class", 1, "--cifar", "--threads", 2)
    assert code == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("Warning")]
    assert len(warnings) == 1 and "skipped 2 entries that cannot be read (a symlink loop)" in warnings[0]
    assert "Accuracy:" in output


def test_predict_skips_symlink_loops_in_the_support(models, support_and_queries):
    support_dir, queries = support_and_queries
    os.symlink("loop.png", support_dir / "circle_red" / "loop.png")
    os.symlink("loop", support_dir / "loop")
    result = CliRunner().invoke(cli, [str(a) for a in ("predict", models["onnx"], *queries, "--support",
                                                       support_dir, "--cifar", "--json")])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["predictions"]) == 4
    assert "Warning: skipped 2 entries that cannot be read (a symlink loop)" in result.stderr


def test_predict_warns_on_a_one_class_support(models, tmp_path):
    (tmp_path / "support" / "only").mkdir(parents=True)
    draw(0, 0, SMALL).save(tmp_path / "support" / "only" / "a.png")
    draw(1, 0, SMALL).save(tmp_path / "q.png")
    result = CliRunner().invoke(cli, ["predict", str(models["onnx"]), str(tmp_path / "q.png"),
                                      "--support", str(tmp_path / "support"), "--cifar"])
    assert result.exit_code == 0, result.output
    assert "has one class (only): every query gets it" in result.stderr


def test_predict_table_escapes_control_characters_in_names(models, tmp_path):
    for name in ("red\x1b[31m", "two\nlines"):
        (tmp_path / "support" / name).mkdir(parents=True)
        draw(len(name), 0, SMALL).save(tmp_path / "support" / name / "a.png")
    draw(0, 1, SMALL).save(tmp_path / "q.png")
    result = CliRunner().invoke(cli, ["predict", str(models["onnx"]), str(tmp_path / "q.png"),
                                      "--support", str(tmp_path / "support"), "--cifar"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and len(result.stdout.splitlines()) == 2
    assert "score_red\\x1b[31m" in result.stdout and "score_two\\nlines" in result.stdout


# -- what a file is -------------------------------------------------------------------------

def test_inspect_describes_an_onnx_artifact(models):
    result = CliRunner().invoke(cli, ["inspect", str(models["onnx"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["kind"], info["format"], info["graph"], info["image_size"]) == ("artifact", "onnx", "episode", SMALL)
    assert info["precision"] == "fp32" and info["opset"]["ai.onnx"] >= 17
    assert set(info["inputs"]) == {"support", "support_labels", "query"}


def test_inspect_describes_a_torchscript_artifact_without_a_warning(models):
    result = CliRunner().invoke(cli, ["inspect", str(models["torchscript"])])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert lines["format"] == ["torchscript"] and lines["image_size"] == [str(SMALL)]
    assert "Warning" not in result.stderr and "site-packages" not in result.output


def test_a_torchscript_file_named_onnx_says_what_it_is(models, tmp_path):
    shutil.copy(models["torchscript"], tmp_path / "renamed.onnx")
    line = _error("inspect", tmp_path / "renamed.onnx")
    assert "renamed.onnx is a TorchScript archive, not an ONNX artifact" in line


@pytest.mark.parametrize("command", ["export", "verify"])
def test_an_artifact_given_as_the_checkpoint_says_which_commands_read_it(models, tmp_path, command):
    args = (["export", models["onnx"], "-f", "onnx", "-o", tmp_path / "x.onnx"] if command == "export"
            else ["verify", models["onnx"], "--checkpoint", models["onnx"]])
    line = _error(*args)
    assert "is an ONNX model (an exported artifact), not a checkpoint" in line
    assert "`dmf-export inspect`, `evaluate`, `verify`" in line


# -- help and progress ------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "predict", "inspect"])
def test_every_option_has_help(command):
    undocumented = [p.name for p in cli.commands[command].params
                    if isinstance(p, click.Option) and not p.help]
    assert undocumented == []


def test_workers_help_states_the_memory_cost():
    text = CliRunner().invoke(cli, ["evaluate", "--help"]).output
    assert "Memory does not grow with it" in " ".join(text.split())


def test_progress_lines_off_a_terminal(models, pickle_root, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_module, "PROGRESS_SECONDS", 0.0)  # a line every episode
    evaluate_module.evaluate([models["onnx"]], pickle_root, episodes=3, queries_per_class=1, threads=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("episode")]
    assert [line.split(",")[0] for line in lines] == ["episode 1/3 (33.3%)", "episode 2/3 (66.7%)"]
    assert all("episodes/s, ETA" in line for line in lines)
