"""Triton repositories served for real: the tritonserver of the nvidia-pytriton wheel on free
loopback ports, spoken to with tritonclient over HTTP and gRPC.

The reference is the eager model (``load_checkpoint``); the configuration's reference is
Triton's own ModelConfig protobuf schema and the ONNX graph's declared inputs. The wheel
has only the python backend, so the python-backend models are what is served; the
onnxruntime-backend ones are parsed and checked, not served.

The server's Python environment (numpy < 2, onnxruntime, nvidia-pytriton) is
``$DMF_TRITON_ENV``, else ``.venv-triton`` in the checkout (what ``.ci/run`` makes), else
this interpreter's. The tests skip only where the wheel cannot run (glibc < 2.35), or,
outside CI, where no such environment is installed.
"""
from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_helpers import one_error_line, run_cli

from dmf_export import load_checkpoint
from dmf_export.contract import EPISODE_INPUTS, ArtifactInfo, EpisodeSize, make_episode
from dmf_export.deploy import EpisodeGraph
from dmf_export.errors import DMFExportError
from dmf_export.export import ExportOptions, export_checkpoint
from dmf_export.synthetic import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
IMAGE = 32  # 4×4 features: the whole graph, cheaply (the python backend runs it on 2 cores)
SIZES = [EpisodeSize(5, 1, 4), EpisodeSize(5, 5, 3), EpisodeSize(3, 2, 2), EpisodeSize(10, 1, 2),
         EpisodeSize(2, 1, 1)]
TIMEOUT = 60.0  # seconds any one request may take before a test calls it hung

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed "
                                   "(pip install 'dmf-export[serve]')")
http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as schema  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from triton_faults import SOAK_FAULTS, good_arrays, reference_scores, scores_match, send_fault  # noqa: E402

from dmf_export.triton import (DEFAULT_BOUNDS, EPISODE_MODEL, TritonRunner, TritonServer,  # noqa: E402
                               config_text, find_distribution, free_ports, glibc_version,
                               group_members, model_path, repository_models,
                               write_perf_analyzer_data)


def _server_env() -> str | None:
    if os.environ.get("DMF_TRITON_ENV"):
        return os.environ["DMF_TRITON_ENV"]
    local = ROOT / ".venv-triton"
    return str(local) if local.is_dir() else None


@pytest.fixture(scope="module")
def server_env():
    glibc = glibc_version()
    if glibc is None or glibc < (2, 35):
        pytest.skip(f"the nvidia-pytriton server needs glibc ≥ 2.35 (this machine: {glibc})")
    env = _server_env()
    try:
        find_distribution(env)
    except DMFExportError as err:
        if os.environ.get("CI"):
            raise  # CI installs the server environment: missing it is a failure, not a skip
        pytest.skip(str(err))
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("triton") / "dmf.pth.tar",
                                   groups=64, kernel=1, seed=3)


@pytest.fixture(scope="module")
def repo(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("repository") / "repo"
    # two threads, not the default one: the written config must carry what export is told
    export_checkpoint(str(checkpoint), ExportOptions(format="triton", output=str(path), image_size=IMAGE,
                                                     way=5, shot=1, queries=4, threads=2))
    return path


@pytest.fixture(scope="module")
def eager(checkpoint):
    model = load_checkpoint(checkpoint)
    with torch.no_grad():
        yield lambda *episode: model(*episode)


@pytest.fixture(scope="module")
def server(repo, server_env):
    with TritonServer(repo, server_env=server_env) as running:
        yield running


def episode(size: EpisodeSize, seed: int = 0):
    return make_episode(size, IMAGE, seed=seed)


def assert_matches(scores, reference):
    assert scores.shape == reference.shape
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(scores.argmax(1), reference.argmax(1))


def arrays(support, labels, query) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(EPISODE_INPUTS, (support, labels, query))}


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stubs_under(pid: int) -> list[int]:
    """The python backend stubs of the tritonserver that process ``pid`` started."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [member for child in children for member, name in group_members(int(child))
            if name == "triton_python_backend_stub"]


# ---------------------------------------------------------------- the repository itself

def _onnx_dims(path: Path) -> dict[str, list[int]]:
    """Each graph input/output's dims as the ONNX file declares them (symbolic → -1)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {value.name: [d.dim_value if d.HasField("dim_value") else -1
                         for d in value.type.tensor_type.shape.dim]
            for value in list(graph.input) + list(graph.output)}


@pytest.mark.parametrize("model, platform, backend", [("dmf", "onnxruntime_onnx", ""),
                                                      ("dmf_python", "", "python")])
def test_config_parses_against_tritons_model_config_schema(repo, model, platform, backend):
    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), schema.ModelConfig())
    assert (config.name, config.platform, config.backend) == (model, platform, backend)
    assert config.max_batch_size == 0
    declared = _onnx_dims(repo / model / "1" / "model.onnx")
    assert [t.name for t in config.input] == list(EPISODE_INPUTS)
    assert [t.name for t in config.output] == ["scores"]
    for tensor in list(config.input) + list(config.output):
        assert tensor.data_type == schema.TYPE_FP32
        assert list(tensor.dims) == declared[tensor.name], tensor.name
    assert [(g.kind, g.count) for g in config.instance_group] == [(schema.ModelInstanceGroup.KIND_CPU, 1)]
    if backend == "python":
        assert (repo / model / "1" / "model.py").is_file()
        assert config.parameters["image_size"].string_value == str(IMAGE)


@pytest.mark.parametrize("backend, platform, precision", [("pytorch", "pytorch_libtorch", "fp32"),
                                                         ("tensorrt", "tensorrt_plan", "fp16")])
def test_torchscript_and_tensorrt_configs_parse_and_name_the_graphs_tensors(backend, platform, precision):
    info = ArtifactInfo(format="torchscript" if backend == "pytorch" else "tensorrt", precision=precision)
    text = config_text("dmf_x", "episode", info, backend=backend, threads=2)
    config = text_format.Parse(text, schema.ModelConfig())
    assert (config.platform, config.max_batch_size) == (platform, 0)
    # Triton's PyTorch backend binds inputs by the forward's argument names
    arguments = list(inspect.signature(EpisodeGraph.forward).parameters)[1:]
    assert [t.name for t in config.input] == arguments == ["support", "support_labels", "query"]
    assert [list(t.dims) for t in config.input] == [[-1, 3, 84, 84], [-1, -1], [-1, 3, 84, 84]]
    assert [(t.name, list(t.dims)) for t in config.output] == [("scores", [-1, -1])]
    wanted_type = schema.TYPE_FP16 if precision == "fp16" else schema.TYPE_FP32
    assert {t.data_type for t in list(config.input) + list(config.output)} == {wanted_type}
    kind = schema.ModelInstanceGroup.KIND_GPU if backend == "tensorrt" else schema.ModelInstanceGroup.KIND_CPU
    assert [g.kind for g in config.instance_group] == [kind]


def _shipped_model(path: Path, monkeypatch) -> types.ModuleType:
    """The python-backend model file, imported as the server's stub imports it (with a
    stand-in for the backend's own utilities, which only the stub has)."""
    utils = types.ModuleType("triton_python_backend_utils")
    utils.TritonModelException = RuntimeError
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    spec = importlib.util.spec_from_file_location("shipped_python_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_writer_writes_exactly_the_parameters_the_shipped_model_reads(repo, monkeypatch):
    """The python-backend model runs where dmf_export is not installed, so the two sides
    cannot share a module: the config the writer writes, as Triton hands it over (its
    ModelConfig schema, as JSON), must set every parameter the model reads, each read."""
    model_py = repo / EPISODE_MODEL / "1" / "model.py"
    module = _shipped_model(model_py, monkeypatch)
    assert module.EPISODE_INPUTS == EPISODE_INPUTS
    bounds = {"way": 7, "shot": 6, "queries": 5}
    text = config_text(EPISODE_MODEL, "episode", ArtifactInfo(format="onnx", image_size=IMAGE),
                       backend="python", threads=3, bounds=bounds)
    config = json_format.MessageToDict(text_format.Parse(text, schema.ModelConfig()),
                                       preserving_proto_field_name=True)
    assert set(config["parameters"]) == set(module.PARAMETERS)
    # the model refuses numpy 2 (the wheel's stub hands it wrong strides); how it reads its
    # config does not depend on numpy's version
    monkeypatch.setattr(np, "__version__", "1.26.4")
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(model_py.parent.parent),
                      "model_version": "1"})
    assert model.image_size == IMAGE
    assert model.bounds == bounds
    assert model.session.get_session_options().intra_op_num_threads == 3
    # and the repository's own config: the default bounds, no thread count
    written = json_format.MessageToDict(
        text_format.Parse((repo / EPISODE_MODEL / "config.pbtxt").read_text(), schema.ModelConfig()),
        preserving_proto_field_name=True)
    assert {k: v["string_value"] for k, v in written["parameters"].items()} == {
        "image_size": str(IMAGE), "max_way": "20", "max_shot": "20", "max_queries": "300",
        "intra_op_threads": "2"}
    assert DEFAULT_BOUNDS == {"way": 20, "shot": 20, "queries": 300}


def test_instances_and_threads_are_written_for_each_backend():
    info = ArtifactInfo(format="onnx", image_size=IMAGE)
    for backend, key in (("python", "intra_op_threads"), ("onnxruntime", "intra_op_thread_count")):
        config = text_format.Parse(config_text("m", "episode", info, backend=backend, instances=3, threads=4),
                                   schema.ModelConfig())
        assert [g.count for g in config.instance_group] == [3]
        assert config.parameters[key].string_value == "4"


@pytest.mark.parametrize("args, needle", [
    (["-f", "triton", "--instances", "0"], "Invalid value for '--instances'"),
    (["-f", "triton", "--threads", "-1"], "Invalid value for '--threads'"),
    (["-f", "triton", "--instances", "65"], "Invalid value for '--instances'"),
    (["-f", "triton", "--threads", str(10**9)], "Invalid value for '--threads'"),
    (["-f", "onnx", "--threads", "2"], "--threads applies to --format triton, not onnx"),
    (["-f", "onnx", "--instances", "2"], "--instances applies to --format triton, not onnx")])
def test_export_takes_instances_and_threads_for_triton_only(checkpoint, tmp_path, args, needle):
    code, output = run_cli("export", checkpoint, "-o", tmp_path / "out", *args)
    assert code == 2 and needle in output, output
    assert not (tmp_path / "out").exists()


def test_export_options_refuse_past_their_maximum_from_python_too():
    # 64 instances is the most a repository may ask for: each is a process with its own model
    with pytest.raises(DMFExportError, match=r"--instances must be ≤ 64 \(got 65\)"):
        ExportOptions(format="triton", instances=65).check()


def test_the_writer_refuses_a_bound_the_shipped_model_does_not_read():
    with pytest.raises(DMFExportError, match="reads no parameter max_ways"):
        config_text(EPISODE_MODEL, "episode", ArtifactInfo(format="onnx"), backend="python",
                    bounds={"ways": 3})


@pytest.mark.parametrize("backend", ["onnxruntime", "python", "pytorch", "tensorrt"])
def test_the_server_reads_back_the_backend_each_written_config_needs(tmp_path, backend):
    """What a server must have to load a model is a folder under its backend directory
    named as Triton names its backends."""
    info = ArtifactInfo(format="onnx", precision="fp16" if backend == "tensorrt" else "fp32")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(config_text("m", "episode", info, backend=backend))
    assert repository_models(tmp_path) == {"m": backend}


def test_the_written_repository_names_each_models_backend(repo):
    assert repository_models(repo) == {"dmf": "onnxruntime", "dmf_python": "python"}


def test_export_refuses_an_existing_repository_and_leaves_it(repo, checkpoint):
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    with pytest.raises(DMFExportError, match="exists; pass --force"):
        export_checkpoint(str(checkpoint), ExportOptions(format="triton", output=str(repo), image_size=IMAGE))
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("what, needle", [("empty folder", "is not a Triton model repository"),
                                          ("not an artifact", "notes.onnx is a text file, not an ONNX artifact")])
def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path, what, needle):
    target = tmp_path / "empty"
    target.mkdir()
    if what == "not an artifact":
        target = tmp_path / "notes.onnx"
        target.write_text("not a graph")
    code, output = run_cli("serve", target)
    assert code == 2 and needle in one_error_line(output)


# ---------------------------------------------------------------- good requests

@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_served_scores_match_the_eager_model(server, eager, protocol, size):
    support, labels, query = episode(size, seed=sum(vars(size).values()))
    runner = TritonRunner(server, EPISODE_MODEL, protocol=protocol, timeout=TIMEOUT)
    try:
        assert_matches(runner(support, labels, query), eager(support, labels, query))
    finally:
        runner.close()


def _success_count(server, model=EPISODE_MODEL, at_least: int = 0) -> int:
    """The server's count of successful requests for ``model``; with ``at_least``, asked
    again (up to 10 s) while lower: the server counts a request after sending its answer."""
    client = http.InferenceServerClient(server.url("http"))
    deadline = time.monotonic() + 10
    try:
        while True:
            stats = client.get_inference_statistics(model)["model_stats"][0]["inference_stats"]
            count = stats["success"]["count"]
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.1)
    finally:
        client.close()


def test_eight_concurrent_clients_all_answered_and_counted_by_the_server(server, eager):
    clients, per_client = 8, 10
    size = EpisodeSize(2, 1, 1)
    episodes = [episode(size, seed=100 + i) for i in range(4)]
    references = [eager(*e) for e in episodes]
    before = _success_count(server)

    def client(index):
        runner = TritonRunner(server, EPISODE_MODEL, protocol=("http", "grpc")[index % 2],
                              timeout=TIMEOUT)
        try:
            return [(k, runner(*episodes[k])) for k in ((index + i) % 4 for i in range(per_client))]
        finally:
            runner.close()

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        results = [f.result(timeout=120) for f in futures]
    answered = [pair for result in results for pair in result]
    assert len(answered) == clients * per_client
    for k, scores in answered:
        assert_matches(scores, references[k])
    assert _success_count(server, at_least=before + clients * per_client) - before == clients * per_client


# ---------------------------------------------------------------- bad requests

def _labels_for_ten_classes(support, labels, query):
    return support, torch.nn.functional.one_hot(torch.arange(5), 10).float(), query


FAULTS = {
    # name: (turn a good 5-way episode's arrays into the bad request, what the error says)
    "missing input": (lambda a: {k: v for k, v in a.items() if k != "support_labels"},
                      r"support_labels|expected 3 inputs"),
    "labels for 10 classes, 5-way support": (
        lambda a: arrays(*_labels_for_ten_classes(*(torch.from_numpy(a[n]) for n in EPISODE_INPUTS))),
        r"10 classes but only 5"),
    "oversized": (lambda a: {**a, "query": np.zeros((301, 3, IMAGE, IMAGE), np.float32)},
                  r"query: queries = 301 is over .*max_queries = 300"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_request_gets_an_error_and_the_next_good_one_an_answer(server, eager, protocol, fault):
    spoil, message = FAULTS[fault]
    good = episode(EpisodeSize(5, 1, 2), seed=7)
    runner = TritonRunner(server, EPISODE_MODEL, protocol=protocol, timeout=TIMEOUT)
    try:
        with pytest.raises(InferenceServerException) as error:
            runner.infer(spoil(arrays(*good)))
        assert re.search(message, error.value.message(), re.I), error.value.message()
        assert_matches(runner(*good), eager(*good))
    finally:
        runner.close()


# ---------------------------------------------------------------- the soak's short form

@pytest.fixture(scope="module")
def in_process(repo):
    """onnxruntime in this process on the repository's model.onnx: the served model's
    answers are checked against an independent run of the same file."""
    return ort.InferenceSession(str(model_path(repo)), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def first_stubs(server):
    return sorted(server.stub_pids())


@pytest.mark.parametrize("fault, protocol", [(f, p) for f in SOAK_FAULTS for p in f.protocols],
                         ids=lambda x: x if isinstance(x, str) else x.name.replace(" ", "-"))
def test_each_bad_request_kind_is_refused_and_the_next_good_one_answered_right(
        server, in_process, first_stubs, fault, protocol):
    good = good_arrays(IMAGE, seed=5)
    runner = TritonRunner(server, EPISODE_MODEL, protocol=protocol, timeout=TIMEOUT)
    try:
        as_expected, outcome = send_fault(fault, protocol, runner, server.url(protocol), good, IMAGE, TIMEOUT)
        assert as_expected, f"{fault.name} over {protocol}: {outcome}"
        assert scores_match(runner.infer(good)[0], reference_scores(in_process, good))
    finally:
        runner.close()
    # the same server and stubs: no fault restarted anything
    assert server.process.poll() is None and sorted(server.stub_pids()) == first_stubs


def _perf_analyzer_arrays(entry) -> dict[str, np.ndarray]:
    """What one ``data`` entry of perf_analyzer's input-data JSON describes, read as
    perf_analyzer's documentation says: base64 bytes, row-major little-endian, ``shape``."""
    return {name: np.frombuffer(base64.b64decode(tensor["content"]["b64"]), "<f4").reshape(tensor["shape"])
            for name, tensor in entry.items()}


def test_the_perf_analyzer_input_data_is_the_episode_and_the_server_accepts_it(server, in_process, tmp_path):
    size = EpisodeSize(2, 1, 2)
    data = json.loads(write_perf_analyzer_data(tmp_path / "input.json", size, IMAGE, seeds=(4, 9))
                      .read_text())["data"]
    assert len(data) == 2
    for seed, entry in zip((4, 9), data):
        arrays = _perf_analyzer_arrays(entry)
        assert list(arrays) == list(EPISODE_INPUTS)
        for name, tensor in zip(EPISODE_INPUTS, episode(size, seed=seed)):
            np.testing.assert_array_equal(arrays[name], tensor.numpy())
        for protocol in ("http", "grpc"):
            runner = TritonRunner(server, EPISODE_MODEL, protocol=protocol, timeout=TIMEOUT)
            try:
                assert scores_match(runner.infer(arrays)[0], reference_scores(in_process, arrays))
            finally:
                runner.close()


def _perf_analyzer() -> tuple[str, dict[str, str]] | None:
    """perf_analyzer and its environment, as benchmarks/perf_analyzer.sh installs it."""
    binary = ROOT / "benchmarks" / ".venv-perf" / "bin" / "perf_analyzer"
    if not binary.exists():
        found = shutil.which("perf_analyzer")
        binary = Path(found) if found else None
    if binary is None:
        return None
    libraries = [str(p) for p in binary.parent.parent.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib")]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(libraries + [os.environ.get("LD_LIBRARY_PATH", "")])}
    return str(binary), env


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_our_input_data_against_the_server(server, tmp_path, protocol):
    found = _perf_analyzer()
    if found is None:
        pytest.skip("perf_analyzer is not installed (benchmarks/perf_analyzer.sh installs it)")
    binary, env = found
    data = write_perf_analyzer_data(tmp_path / "input.json", EpisodeSize(2, 1, 2), IMAGE)
    result = subprocess.run([binary, "-m", EPISODE_MODEL, "-u", server.url(protocol), "-i", protocol,
                             "--input-data", str(data), "--concurrency-range", "1:1",
                             "--measurement-mode", "count_windows", "--measurement-request-count", "5",
                             "--max-trials", "3", "--stability-percentage", "999"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "Throughput" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------- the server's life

def test_a_killed_stub_is_reported_not_hung_on_a_reload_recovers_and_stop_frees_all(
        repo, server_env, eager):
    good = episode(EpisodeSize(2, 1, 1), seed=11)
    # a short exit timeout: the dead instance's unload holds the server's exit for that long
    with TritonServer(repo, server_env=server_env, exit_timeout=2) as server:
        ports = list(server.ports.values())
        assert not any(_port_is_free(p) for p in ports)
        runner = TritonRunner(server, EPISODE_MODEL, timeout=TIMEOUT)
        (stub,) = server.stub_pids()
        os.kill(stub, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(InferenceServerException, match="not healthy"):
            runner(*good)
        assert time.monotonic() - started < TIMEOUT
        # explicit model control: an unload and a load start a new stub
        control = http.InferenceServerClient(server.url("http"))
        control.unload_model(EPISODE_MODEL)
        deadline = time.monotonic() + TIMEOUT
        while control.is_model_ready(EPISODE_MODEL) and time.monotonic() < deadline:
            time.sleep(0.1)
        control.load_model(EPISODE_MODEL)
        control.close()
        assert_matches(runner(*good), eager(*good))
        runner.close()
        (new_stub,) = server.stub_pids()
    survivors = [Path(f"/proc/{pid}/stat").read_text() for pid in (stub, new_stub, server.process.pid)
                 if _alive(pid)]
    assert not survivors, survivors
    assert all(_port_is_free(p) for p in ports)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_command_answers_then_stops_cleanly_on_a_signal(repo, server_env, eager, signum):
    http_port, grpc_port, metrics_port = free_ports(3)
    command = [sys.executable, "-m", "dmf_export", "serve", str(repo), "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    if server_env:
        command += ["--server-env", server_env]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        assert f"127.0.0.1:{grpc_port}" in output and "skipped dmf " in output, output
        good = episode(EpisodeSize(2, 1, 1), seed=12)
        runner = TritonRunner(f"127.0.0.1:{grpc_port}", EPISODE_MODEL, protocol="grpc", timeout=TIMEOUT)
        assert_matches(runner(*good), eager(*good))
        runner.close()
        stubs = _stubs_under(process.pid)
        process.send_signal(signum)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert stubs and not any(_alive(pid) for pid in stubs)
    assert all(_port_is_free(p) for p in (http_port, grpc_port, metrics_port))


def test_verify_runs_a_repository_through_a_server_it_starts_and_stops(repo, checkpoint, server_env):
    def serving():  # processes serving this repository (the module's own server among them)
        found = subprocess.run(["pgrep", "-f", str(repo)], capture_output=True, text=True).stdout
        return set(found.split())

    before = serving()
    code, output = run_cli("verify", repo, "-c", checkpoint, "--sizes", "3w1s2q,1w1s1q")
    assert code == 0 and "PASS: triton fp32, 2 episode sizes" in output, output
    assert serving() <= before  # verify's own server and stub are gone



def test_an_int8_repository_serves_its_int8_graph_within_the_int8_tolerance(
        checkpoint, server_env, calibration_split, tmp_path):
    repo = tmp_path / "int8.triton"
    code, output = run_cli("export", checkpoint, "-f", "triton", "--precision", "int8", "--calibrate",
                           calibration_split, "--calib-transform", "cifar-fs", "--calib-episodes", 1,
                           "--image-size", IMAGE, "--queries", 4, "--no-verify", "-o", repo)
    assert code == 0, output
    served = onnx.load(str(model_path(repo)))
    assert sum(n.op_type == "QuantizeLinear" for n in served.graph.node) >= 16  # the int8 graph is served
    code, output = run_cli("verify", repo, "-c", checkpoint, "--sizes", "3w1s2q,2w1s1q")
    assert code == 0 and "PASS: triton int8, 2 episode sizes" in output, output
