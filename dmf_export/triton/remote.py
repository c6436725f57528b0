"""A Triton server the user runs (or several, as a fleet): ``open_server(urls)`` is a
``formats.base.Runner`` over the models our repository names (``dmf``; with a split
repository ``dmf_encoder`` and ``dmf_head`` too), checked against the server's model
metadata, safe to call from several threads at once.

Which models: a repository holds each graph once per backend (``dmf`` for Triton's
onnxruntime backend, ``dmf_python`` for its python backend, ``dmf_torchscript``,
``dmf_tensorrt``; see ``repository``). The first of those the server has ready, in
``BACKENDS``' order, is the one asked, and the encoder and head of the same backend with
it when the server has both.

Spreading: every request goes to the next server in turn (round robin per request, not
per thread), so N clients keep about N ÷ servers requests in flight on each. Each thread
talks to each server through its own tritonclient client (they are not meant to be
shared between threads), made on its first request and closed by ``close()``.
"""
from __future__ import annotations

import contextlib
import http.client
import itertools
import socket
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dmf_export.contract import (DEFAULT_IMAGE_SIZE, FEATURE_CHANNELS, GRAPH_IO, IMAGE_CHANNELS,
                                 ArtifactInfo, feature_size)
from dmf_export.errors import DMFExportError
from dmf_export.formats.base import Runner
from dmf_export.triton.client import TritonRunner
from dmf_export.triton.repository import BACKENDS, MODEL_NAMES, model_name

PROTOCOLS = ("http", "grpc")
DEFAULT_TIMEOUT = 60.0  # seconds a request may take before the run ends in one line
MAX_CLIENTS = 64        # concurrent requests: each holds an episode in flight
MAX_SERVERS = 64        # each is a client per thread: past a fleet's size only memory grows

_PRECISIONS = {"FP32": "fp32", "FP16": "fp16"}


# ------------------------------------------------------------------------- failures

def _grpc_status(err) -> str:
    status = err.status() if hasattr(err, "status") and callable(err.status) else None
    return str(status or "")


def failure(where: str, err: BaseException, timeout: float, answered: bool = False) -> DMFExportError:
    """One line naming the server (``where``: 'http://host:port') and what happened
    (``answered``: it had answered before, so a refused connection means it went away)."""
    refused = (f"{where}: the server stopped answering mid-run (connection refused)" if answered
               else f"{where}: connection refused (is a Triton server running there?)")
    from tritonclient.utils import InferenceServerException  # optional (dmf-export[client])

    if isinstance(err, InferenceServerException):
        status, message = _grpc_status(err), (err.message() or str(err) or "").strip()
        first = message.splitlines()[0] if message else status or type(err).__name__
        if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in message:
            return DMFExportError(f"{where}: no answer within {timeout:g} s (--timeout)")
        if "UNAVAILABLE" in status:
            if "refused" in message.lower() or "failed to connect" in message.lower():
                return DMFExportError(refused)
            return DMFExportError(f"{where}: the server went away mid-run ({first})")
        return DMFExportError(f"{where}: the server answered with an error: {first}")
    if isinstance(err, ConnectionRefusedError):
        return DMFExportError(refused)
    if isinstance(err, (socket.timeout, TimeoutError)) or type(err).__name__ == "Timeout":
        return DMFExportError(f"{where}: no answer within {timeout:g} s (--timeout)")
    if isinstance(err, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                        http.client.HTTPException, EOFError)) or "closed" in type(err).__name__.lower():
        return DMFExportError(f"{where}: the server went away mid-run (connection closed: "
                              f"{type(err).__name__})")
    if isinstance(err, socket.gaierror):
        return DMFExportError(f"{where}: unknown host ({err.strerror or err})")
    text = str(err).strip().splitlines()
    return DMFExportError(f"{where}: {type(err).__name__}: {text[0] if text else 'no detail'}")


def _shape(values) -> list[int]:
    return [int(v) for v in values]  # gRPC's JSON gives the dims as strings


# ------------------------------------------------------------------------- one server

class _Server:
    """One 'host:port': checked up front, then a tritonclient client per thread."""

    def __init__(self, url: str, protocol: str, timeout: float):
        self.url, self.protocol, self.timeout = url, protocol, timeout
        self.where = f"{protocol}://{url}"
        self._local = threading.local()
        self._clients: list[TritonRunner] = []
        self._lock = threading.Lock()
        self.closed = False

    def client(self, precision: str = "fp32") -> TritonRunner:
        if self.closed:
            raise DMFExportError(f"{self.where}: the runner is closed")
        runner = getattr(self._local, "runner", None)
        if runner is None:
            with self._lock:
                if self.closed:
                    raise DMFExportError(f"{self.where}: the runner is closed")
                runner = TritonRunner(self.url, protocol=self.protocol, timeout=self.timeout,
                                      precision=precision)
                self._clients.append(runner)
            self._local.runner = runner
        return runner

    def ask(self, what: str, *args):
        """A metadata call (``is_server_live``, ``get_model_metadata``…) as JSON, or one line."""
        client = self.client().client
        kwargs = {"as_json": True} if self.protocol == "grpc" and what.startswith("get_") else {}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        try:
            return getattr(client, what)(*args, **kwargs)
        except Exception as err:  # tritonclient's and the sockets' own: one line naming the server
            raise failure(self.where, err, self.timeout) from err

    def ready_models(self) -> list[str]:
        index = self.ask("get_model_repository_index")
        entries = index.get("models", []) if isinstance(index, dict) else index
        return sorted(entry["name"] for entry in entries if entry.get("state") == "READY")

    def close(self) -> None:
        with self._lock:
            self.closed = True
            clients, self._clients = self._clients, []
        for runner in clients:
            with contextlib.suppress(Exception):  # a server that died: nothing left to close
                runner.close()


def _check(server: _Server) -> tuple[dict[str, str], dict[str, dict]]:
    """({graph: model name}, {model name: its metadata}) of what ``server`` serves of ours."""
    if not server.ask("is_server_live"):
        raise DMFExportError(f"{server.where}: the server is not live")
    # not is_server_ready: with --strict-readiness any model of the server's that is not
    # ready (one of someone else's) makes it unready; ours are asked one by one below
    ready = server.ready_models()
    chosen = None
    for backend in BACKENDS:
        if model_name("episode", backend) in ready:
            chosen = backend
            break
    if chosen is None:
        raise DMFExportError(f"{server.where} serves no model {MODEL_NAMES['episode']!r} (it serves: "
                             f"{', '.join(ready) or 'nothing ready'}): is this a dmf-export repository?")
    graphs = {"episode": model_name("episode", chosen)}
    split = {g: model_name(g, chosen) for g in ("encoder", "head")}
    if all(name in ready for name in split.values()):
        graphs.update(split)
    metadata = {}
    for graph, name in graphs.items():
        found = server.ask("get_model_metadata", name)
        _check_io(server.where, name, graph, found)
        metadata[name] = {"inputs": [(t["name"], t["datatype"], _shape(t["shape"])) for t in found["inputs"]],
                          "outputs": [(t["name"], t["datatype"], _shape(t["shape"])) for t in found["outputs"]]}
    return graphs, metadata


def _check_io(where: str, name: str, graph: str, found: dict) -> None:
    """The model's inputs and outputs are the contract's (names, one float dtype)."""
    inputs, outputs = GRAPH_IO[graph]
    have_in = tuple(t["name"] for t in found.get("inputs", []))
    have_out = tuple(t["name"] for t in found.get("outputs", []))
    if sorted(have_in) != sorted(inputs) or sorted(have_out) != sorted(outputs):
        raise DMFExportError(f"{where}: model {name!r} takes {', '.join(have_in) or 'nothing'} and gives "
                             f"{', '.join(have_out) or 'nothing'}, not dmf-export's {graph} graph "
                             f"({', '.join(inputs)} → {', '.join(outputs)})")
    types = {t["datatype"] for t in found["inputs"] + found["outputs"]}
    if len(types) != 1 or next(iter(types)) not in _PRECISIONS:
        raise DMFExportError(f"{where}: model {name!r} uses {', '.join(sorted(types))}; dmf-export's "
                             f"graphs are all FP32 or all FP16")


def _info(graphs: dict[str, str], metadata: dict[str, dict]) -> ArtifactInfo:
    """What the served models say of themselves: the precision from their dtype, the image
    size from the episode model's input dims (the repository writes them fixed)."""
    episode = metadata[graphs["episode"]]
    dims = {name: shape for name, _, shape in episode["inputs"]}
    size = dims["support"][-1] if len(dims["support"]) == 4 else -1
    image_size = size if size > 0 else DEFAULT_IMAGE_SIZE
    if dims["support"][1:] not in ([IMAGE_CHANNELS, image_size, image_size], [IMAGE_CHANNELS, -1, -1]):
        raise DMFExportError(f"model {graphs['episode']!r}: support dims {dims['support']} are not "
                             f"[S, {IMAGE_CHANNELS}, H, H]")
    if "encoder" in graphs:
        features = {n: s for n, _, s in metadata[graphs["encoder"]]["outputs"]}["features"]
        h = feature_size(image_size)
        if features[1:] not in ([FEATURE_CHANNELS, h, h], [FEATURE_CHANNELS, -1, -1]):
            raise DMFExportError(f"model {graphs['encoder']!r}: features dims {features} are not "
                                 f"[N, {FEATURE_CHANNELS}, {h}, {h}] for {image_size}×{image_size} images")
    precision = _PRECISIONS[episode["inputs"][0][1]]
    return ArtifactInfo(format="triton", graph="episode", precision=precision, image_size=image_size,
                        groups=None, kernel=None, solver=None, steps=None)


# ------------------------------------------------------------------------- the fleet

class _Fleet:
    """The servers, checked alike; ``call(model, arrays, outputs)`` on the next in turn."""

    def __init__(self, urls: Sequence[str], protocol: str, timeout: float):
        if protocol not in PROTOCOLS:
            raise DMFExportError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if not urls:
            raise DMFExportError("no server given (--server HOST:PORT)")
        if len(urls) > MAX_SERVERS:
            raise DMFExportError(f"at most {MAX_SERVERS} servers (got {len(urls)})")
        urls = [_normalise(url) for url in urls]
        repeated = sorted({u for u in urls if urls.count(u) > 1})
        if repeated:
            raise DMFExportError(f"--server {repeated[0]} is given twice")
        self.servers = [_Server(url, protocol, timeout) for url in urls]
        self.timeout = timeout
        try:
            first = None
            for server in self.servers:
                found = _check(server)
                if first is None:
                    first = (server, found)
                elif found != first[1]:
                    raise DMFExportError(
                        f"{server.where} serves {_describe(found)} but {first[0].where} serves "
                        f"{_describe(first[1])}: every server of a fleet must serve the same repository")
            self.graphs, self.metadata = first[1]
            self.info = _info(self.graphs, self.metadata)
        except BaseException:
            self.close()
            raise
        self._turn = itertools.count()
        self._turn_lock = threading.Lock()
        self.np_dtype = np.float16 if self.info.precision == "fp16" else np.float32

    def call(self, model: str, arrays: dict[str, np.ndarray], outputs) -> list[np.ndarray]:
        with self._turn_lock:
            server = self.servers[next(self._turn) % len(self.servers)]
        runner = server.client(self.info.precision)
        try:
            return runner.infer(arrays, outputs, model=model)
        except DMFExportError:
            raise
        except Exception as err:  # tritonclient's and the sockets' own: one line naming the server
            # it answered the checks when the runner opened: a refusal now is a server gone
            raise failure(server.where, err, self.timeout, answered=True) from err

    def graph(self, graph: str):
        model = self.graphs[graph]
        inputs, outputs = GRAPH_IO[graph]

        def run(*tensors) -> torch.Tensor:
            arrays = {name: _array(t, self.np_dtype) for name, t in zip(inputs, tensors)}
            return torch.from_numpy(self.call(model, arrays, outputs)[0].copy())

        return run

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _array(tensor, dtype) -> np.ndarray:
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    return np.ascontiguousarray(array, dtype=dtype)


def _normalise(url: str) -> str:
    """'host:port' (a scheme given by habit is dropped; the protocol says how to talk)."""
    text = str(url).strip()
    for scheme in ("http://", "https://", "grpc://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DMFExportError(f"--server {url!r}: expected HOST:PORT (e.g. 127.0.0.1:8000)")
    return text


def _describe(found) -> str:
    graphs, metadata = found
    return ", ".join(f"{name} {metadata[name]['inputs'][0][1]}" for name in graphs.values())


def open_server(urls: Sequence[str], *, protocol: str = "http",
                timeout: float = DEFAULT_TIMEOUT) -> Runner:
    """A runner over the dmf-export models served at ``urls`` ('host:port', one or
    several: requests are spread over them). Its ``graphs`` hold ``episode`` and, when the
    server has them, ``encoder`` and ``head``; ``info`` is the served models' metadata
    (format ``triton``, the precision and image size the servers declare; the groups,
    kernel and solver of the export are not served, so they are None)."""
    if isinstance(urls, str):
        urls = [urls]
    fleet = _Fleet(list(urls), protocol, timeout)
    graphs = {graph: fleet.graph(graph) for graph in fleet.graphs}
    label = "triton@" + ",".join(server.url for server in fleet.servers)
    return Runner(Path(label), fleet.info, "triton", graphs, close=fleet.close)
