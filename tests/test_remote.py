"""``--server``: Triton servers the user runs, spoken to by ``triton.remote.open_server``.

The servers are real (the nvidia-pytriton wheel's tritonserver, started here on free
loopback ports, apart from the runner that talks to them); the reference is the eager
model of the checkpoint the repository was exported from. The repository is the session's
split Triton repository (``triton_split_repository`` in conftest), so the encoder and head
models are served too. Skips as tests/test_triton.py does where the wheel cannot run.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from cli_helpers import one_error_line, run_cli
from fewshot_data import write_folders, write_pickle

from dmf_export.contract import EpisodeSize, make_episode
from dmf_export.errors import DMFExportError
from dmf_export.formats import open_artifact
from dmf_export.triton import EPISODE_MODEL, TritonServer, find_distribution, free_ports, glibc_version
from dmf_export.triton.remote import open_server

http = pytest.importorskip("tritonclient.http", reason="tritonclient not installed (pip install 'dmf-export[serve]')")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")

IMAGE = 32  # conftest's EXPORT_IMAGE: 4×4 features, cheap for the python backend on 2 cores
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server_env():
    glibc = glibc_version()
    if glibc is None or glibc < (2, 35):
        pytest.skip(f"the nvidia-pytriton server needs glibc ≥ 2.35 (this machine: {glibc})")
    try:
        find_distribution()  # $DMF_TRITON_ENV (conftest sets it to .venv-triton where CI made one)
    except DMFExportError as err:
        if os.environ.get("CI"):
            raise  # CI installs the server environment: missing it is a failure, not a skip
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def split_repo(triton_split_repository):
    return triton_split_repository


@pytest.fixture(scope="module")
def reference(split_repo, eager):
    model = eager(split_repo[0])

    def scores(*episode):
        with torch.inference_mode():
            return model(*episode)

    return scores


@pytest.fixture(scope="module")
def server(split_repo, server_env):
    with TritonServer(split_repo[1]) as running:
        yield running


@pytest.fixture(scope="module")
def second_server(split_repo, server_env):
    """The fleet's second member; the module's last test kills it (a server start saved)."""
    with TritonServer(split_repo[1], exit_timeout=2) as running:
        yield running


@pytest.fixture(scope="module")
def pickle_root(tmp_path_factory):
    """A split at the repository's image size: 12 classes × 5 images."""
    return write_pickle(tmp_path_factory.mktemp("pickle"), classes=12, images=5, size=IMAGE)


def evaluate_cli(*args, episodes=4):
    """(exit code, output) of ``evaluate ARGS --json`` on tiny 5-way 1-shot 2-query episodes."""
    return run_cli("evaluate", *args, "--json", "--episodes", episodes, "--queries-per-class", 2,
                   "--threads", 2, "--no-progress")


def reported(code, output):
    assert code == 0, output
    return json.loads(output)


def figures(report):
    (model,) = report["models"]
    return (f"{model['accuracy']:.2%} {model['ci95']:.2%}",
            [next(iter(e["predicted"].values())) for e in report["per_episode"]])


def episodes(count: int, size=EpisodeSize(5, 1, 3)):
    return [make_episode(size, IMAGE, seed=40 + i) for i in range(count)]


def assert_matches(scores, expected):
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(scores.argmax(1), expected.argmax(1))


def _served_count(server, model=EPISODE_MODEL) -> int:
    """The server's own count of successful requests for ``model``."""
    client = http.InferenceServerClient(server.url("http"))
    try:
        return client.get_inference_statistics(model)["model_stats"][0]["inference_stats"]["success"]["count"]
    finally:
        client.close()


def test_two_clients_from_two_threads_get_the_eager_models_scores(server, reference):
    # over HTTP; gRPC's answers are checked by verify end to end below
    runner = open_server([server.url("http")], timeout=TIMEOUT)
    try:
        assert runner.info.image_size == IMAGE and runner.info.precision == "fp32"
        assert runner.splittable  # the split repository's encoder and head are served too
        work = episodes(4)
        answers = [None] * len(work)

        def client(index):
            for k in range(index, len(work), 2):
                answers[k] = runner(*work[k])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        for episode, scores in zip(work, answers):
            assert scores is not None
            assert_matches(scores, reference(*episode))
        support, labels, query = work[0]
        features = runner.encode(torch.cat([support, query]))
        assert features.shape == (support.shape[0] + query.shape[0], 640, 4, 4)
        assert_matches(runner.head(features[:len(support)], labels, features[len(support):]),
                       reference(*work[0]))
    finally:
        runner.close()


def test_evaluate_against_a_server_cached_and_not_gives_the_eager_models_digits(server, split_repo, pickle_root):
    url = server.url("http")
    cached = reported(*evaluate_cli("--server", url, "--clients", 2, "--data", pickle_root))
    uncached = reported(*evaluate_cli("--server", url, "--clients", 2, "--data", pickle_root,
                                      "--no-feature-cache"))
    eager = reported(*evaluate_cli(split_repo[0], "--image-size", IMAGE, "--data", pickle_root,
                                   "--no-feature-cache"))
    # the split repository: encoder and head through the server, each image encoded once
    assert cached["models"][0]["feature_cache"]["used"] is True
    assert cached["models"][0]["feature_cache"]["hits"] > 0
    assert uncached["models"][0]["feature_cache"] == {"used": False, "reason": "--no-feature-cache"}
    assert figures(cached) == figures(uncached) == figures(eager)
    assert cached["episodes_completed"] == 4 and cached["error"] is None


def test_predict_against_a_server_scores_as_the_eager_model(server, split_repo, tmp_path):
    support = write_folders(tmp_path / "support", classes=3, images=2, size=IMAGE) / "test"
    queries = write_folders(tmp_path / "queries", classes=2, images=2, size=IMAGE) / "test"

    def predict(*args):
        return reported(*run_cli("predict", *args, queries, "--support", support, "--cifar", "--json"))

    served = predict("--server", server.url("grpc"), "--protocol", "grpc")
    eager = predict(split_repo[0], "--no-feature-cache")
    assert served["feature_cache"] is True
    assert [p["class"] for p in served["predictions"]] == [p["class"] for p in eager["predictions"]]
    classes = list(eager["predictions"][0]["scores"])
    as_tensor = lambda report: torch.tensor([[p["scores"][c] for c in classes]  # noqa: E731
                                             for p in report["predictions"]])
    torch.testing.assert_close(as_tensor(served), as_tensor(eager), rtol=1e-4, atol=1e-4)


def test_two_servers_as_a_fleet_share_the_requests_and_answer_alike(server, second_server, reference):
    before = [_served_count(s) for s in (server, second_server)]
    runner = open_server([server.url("http"), second_server.url("http")], timeout=TIMEOUT)
    try:
        work = episodes(4)
        for episode in work:
            assert_matches(runner(*episode), reference(*episode))
    finally:
        runner.close()
    # round robin per request: two each
    assert [_served_count(s) - b for s, b in zip((server, second_server), before)] == [2, 2]


def test_a_fleet_whose_servers_serve_different_models_is_refused_in_one_line(server, second_server, pickle_root):
    control = http.InferenceServerClient(second_server.url("http"))
    control.unload_model("dmf_encoder_python")
    try:
        with pytest.raises(DMFExportError, match=r"must serve the same repository") as error:
            open_server([server.url("http"), second_server.url("http")], timeout=TIMEOUT)
        assert "\n" not in str(error.value)
        # and a server without the episode model is not ours to ask
        control.unload_model(EPISODE_MODEL)
        code, output = run_cli("verify", "-c", "unused.pth.tar", "--server", second_server.url("http"))
        line = one_error_line(output)
        assert code == 2 and "serves no model 'dmf' (it serves: dmf_head_python)" in line, line
        code, output = evaluate_cli("--server", second_server.url("http"), "--data", pickle_root)
        line = one_error_line(output)
        assert code == 2 and "serves no model 'dmf' (it serves: dmf_head_python)" in line, line
    finally:
        control.load_model(EPISODE_MODEL)
        control.load_model("dmf_encoder_python")
        control.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_unreachable_port_is_one_line(protocol, pickle_root):
    (port,) = free_ports(1)
    with pytest.raises(DMFExportError, match=rf"^{protocol}://127.0.0.1:{port}: connection refused"):
        open_server([f"127.0.0.1:{port}"], protocol=protocol, timeout=5)
    code, output = run_cli("bench", "-c", "unused.pth.tar", "--server", f"127.0.0.1:{port}",
                           "--protocol", protocol, "--no-eager", "--no-backbone")
    assert code == 2 and "connection refused" in one_error_line(output)
    code, output = evaluate_cli("--server", f"127.0.0.1:{port}", "--protocol", protocol, "--data", pickle_root)
    assert code == 2 and one_error_line(output) == (f"Error: {protocol}://127.0.0.1:{port}: connection "
                                                    "refused (is a Triton server running there?)")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_past_the_timeout_is_one_line(server, protocol):
    # a millisecond: the checks when it opens or the episode itself run past it
    with pytest.raises(DMFExportError, match=rf"^{protocol}://{server.url(protocol)}: no answer within 0.001 s "
                                             r"\(--timeout\)$"):
        runner = open_server([server.url(protocol)], protocol=protocol, timeout=0.001)
        try:
            runner(*make_episode(EpisodeSize(5, 5, 20), IMAGE, seed=1))
        finally:
            runner.close()


@pytest.mark.parametrize("url", ["localhost", "localhost:http", "127.0.0.1:70000", ":8000"])
def test_a_server_address_must_be_host_and_port(url):
    with pytest.raises(DMFExportError, match="expected HOST:PORT"):
        open_server([url])


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_how_to_talk_to_a_server_is_refused_without_one(command, tmp_path):
    code, output = run_cli(command, tmp_path / "x.onnx", "-c", tmp_path / "x.pth.tar", "--clients", "2")
    assert code == 2 and "--clients applies to --server HOST:PORT" in one_error_line(output)


def test_verify_against_a_running_server_end_to_end(server, split_repo):
    code, output = run_cli("verify", "-c", split_repo[0], "--server", server.url("grpc"), "--protocol", "grpc",
                           "--clients", "2", "--sizes", "3w1s2q,2w2s1q")
    assert code == 0 and "PASS: triton fp32, 2 episode sizes" in output, output


def test_a_local_split_repository_runs_its_encoder_and_head(split_repo, server_env, reference):
    runner = open_artifact(split_repo[1])
    try:
        assert runner.splittable
        support, labels, query = episodes(1)[0]
        features = runner.encode(torch.cat([support, query]))
        assert_matches(runner.head(features[:len(support)], labels, features[len(support):]),
                       reference(support, labels, query))
        assert_matches(runner(support, labels, query), reference(support, labels, query))
    finally:
        runner.close()


# last: it kills second_server
def test_a_server_killed_mid_run_ends_evaluate_in_one_line_with_the_episodes_so_far(second_server,
                                                                                   pickle_root):
    """evaluate --server with 2 clients; the server is killed once it has answered 3 heads
    (watched through its own statistics); --json still reports the episodes completed."""
    url = second_server.url("http")
    stop = threading.Event()

    def kill_after_three_heads():
        while not stop.is_set():
            if _served_count(second_server, "dmf_head_python") >= 3:
                os.killpg(second_server.process.pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_three_heads)
    killer.start()
    try:
        code, output = evaluate_cli("--server", url, "--clients", 2, "--data", pickle_root, episodes=2000)
    finally:
        stop.set()
        killer.join(TIMEOUT)
    line = one_error_line(output)
    assert code == 2 and line.startswith(f"Error: http://{url}: ") and "mid-run" in line, line
    report = json.loads(output[:output.rindex("Error: ")])
    completed = report["episodes_completed"]
    assert 1 <= completed < 2000 and line.endswith(f"(after {completed} of 2000 episodes)"), line
    assert report["error"] and report["error"] in line
    assert len(report["per_episode"]) == completed
    # the figures are those of the completed episodes
    (model,) = report["models"]
    correct = sum(next(iter(e["correct"].values())) for e in report["per_episode"])
    assert model["accuracy"] == correct / (completed * 10)
