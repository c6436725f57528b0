"""Bad requests for a served episode model, each sent over HTTP or gRPC, with what the
server must answer: the suite's short soak (tests/test_triton_soak.py) and the long one
(benchmarks/soak.py) share them.

Requests are built by hand where a client library would refuse to send them (a body cut
short, bytes beyond the tensors, a Content-Length past the server's limit, a client that
vanishes or cancels): HTTP as raw KServe v2 requests with the binary-data extension on a
socket, gRPC as ``ModelInferRequest`` protobufs on a channel. The good requests go
through ``TritonRunner`` and are checked against an in-process onnxruntime session on the
same ONNX file (not the server's own output).
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from dmf_export.contract import EPISODE_INPUTS, EpisodeSize, make_episode

MODEL = "dmf_python"
GOOD_SIZE = EpisodeSize(3, 1, 2)


def good_arrays(image_size: int, seed: int, size: EpisodeSize = GOOD_SIZE) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(EPISODE_INPUTS, make_episode(size, image_size, seed=seed))}


def reference_scores(session, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The episode's scores from an onnxruntime session in this process."""
    return session.run(["scores"], arrays)[0]


def scores_match(scores: np.ndarray, reference: np.ndarray) -> bool:
    return (scores.shape == reference.shape and np.allclose(scores, reference, rtol=1e-4, atol=1e-4)
            and np.array_equal(scores.argmax(1), reference.argmax(1)))


# ---------------------------------------------------------------- requests built by hand

def _http_body(arrays: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """(body, JSON header length) of a KServe v2 binary-data request for ``arrays``."""
    header = {"inputs": [{"name": name, "shape": list(a.shape), "datatype": _DATATYPE[a.dtype.str],
                          "parameters": {"binary_data_size": a.nbytes}} for name, a in arrays.items()],
              "outputs": [{"name": "scores", "parameters": {"binary_data": False}}]}
    text = json.dumps(header).encode()
    return text + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values()), len(text)


_DATATYPE = {"<f4": "FP32", "<f8": "FP64"}


def http_raw(url: str, body: bytes, header_length: int, timeout: float) -> tuple[int, str]:
    """POST a hand-built body; (status, error text or '')."""
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", body,
                           {"Inference-Header-Content-Length": str(header_length),
                            "Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data).get("error", "")
        except ValueError:
            return response.status, data.decode(errors="replace")[:200]
    finally:
        connection.close()


def _socket(url: str, timeout: float) -> socket.socket:
    host, port = url.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def grpc_raw(url: str, arrays: dict[str, np.ndarray], timeout: float, raw: list[bytes] | None = None,
             cancel: bool = False) -> str:
    """A ModelInferRequest built here (``raw``: the contents sent instead of the arrays'
    bytes); the error's details, '' on success, 'cancelled' if cancelled before an answer."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name, a in arrays.items():
        request.inputs.add(name=name, datatype=_DATATYPE[a.dtype.str], shape=list(a.shape))
    request.outputs.add(name="scores")
    request.raw_input_contents.extend(raw if raw is not None else [a.tobytes() for a in arrays.values()])
    with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", -1),
                                             ("grpc.max_receive_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        if cancel:
            future = stub.ModelInfer.future(request, timeout=timeout)
            time.sleep(0.05)  # on the wire, then gone
            return "cancelled" if future.cancel() else "answered before the cancel"
        try:
            stub.ModelInfer(request, timeout=timeout)
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"
    return ""


# ---------------------------------------------------------------- the catalogue

@dataclass(frozen=True)
class Fault:
    """A bad request: ``send(url, arrays, timeout, image_size)`` sends it (``arrays``, a
    good episode to spoil) and returns what came back, which ``expected`` must match
    (a regex naming the input, or the outcome of a client that left)."""

    name: str
    protocols: tuple[str, ...]
    send: Callable[..., str]
    expected: str


def _through_runner(spoil):
    """A fault that tritonclient sends as is: the error message, '' if accepted."""
    def send(runner, arrays, image_size):
        try:
            runner.infer(spoil(arrays, image_size))
        except InferenceServerException as err:
            return err.message()
        return ""
    return send


def _nan_pixels(a, _):
    support = a["support"].copy()
    support[1, 0, 3, 3] = np.nan
    return {**a, "support": support}


def _not_one_hot(a, _):
    labels = a["support_labels"].copy()
    labels[0] = 0.5
    return {**a, "support_labels": labels}


def _way_beyond_bound(a, image_size):
    return good_arrays(image_size, seed=1, size=EpisodeSize(21, 1, 1))


RUNNER_FAULTS = [
    Fault("wrong shape", ("http", "grpc"), _through_runner(
        lambda a, s: {**a, "query": np.zeros((2, 3, s + 1, s + 1), np.float32)}), r"'?query'?.*shape|shape.*'?query"),
    Fault("wrong rank", ("http", "grpc"), _through_runner(lambda a, s: {**a, "query": a["query"][0]}),
          r"shape.*'?query|'?query'?.*shape"),
    Fault("wrong dtype", ("http", "grpc"), _through_runner(lambda a, s: {**a, "support": a["support"].astype(np.float64)}),
          r"'support'.*FP64"),
    Fault("NaN pixels", ("http", "grpc"), _through_runner(_nan_pixels), r"support image 1 holds a non-finite"),
    Fault("labels not one-hot", ("http", "grpc"), _through_runner(_not_one_hot), r"support_labels must be one-hot"),
    Fault("way beyond the bound", ("http", "grpc"), _through_runner(_way_beyond_bound),
          r"support_labels: way = 21 is over .*max_way = 20"),
]


def _http_truncated(url, arrays, timeout, _):
    body, length = _http_body(arrays)
    status, error = http_raw(url, body[:-1000], length, timeout)  # the query's last 250 pixels missing
    return f"{status} {error}"


def _http_extra_bytes(url, arrays, timeout, _):
    body, length = _http_body(arrays)
    status, error = http_raw(url, body + b"\0" * 4096, length, timeout)
    return f"{status} {error}"


def _http_over_the_limit(url, arrays, timeout, _):
    """A Content-Length of 4 GB, 64 kB of it sent, then gone. Triton 2.51 has no limit on
    an HTTP body (no --http-max-input-size yet): it holds the connection open for the
    rest, so after 2 s without an answer the client leaves (what the server does next,
    answer good requests with its memory back, is what the soak checks)."""
    with _socket(url, 2.0) as s:
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {4 << 30}\r\n"
                  f"Inference-Header-Content-Length: 10\r\n\r\n".encode() + b"{" * 65536)
        try:
            reply = s.recv(4096).decode(errors="replace")
        except socket.timeout:
            return "held open"
        except ConnectionError as err:
            return f"closed ({type(err).__name__})"
    return reply.splitlines()[0] if reply else "closed"


def _http_vanish(url, arrays, timeout, _):
    body, length = _http_body(arrays)
    with _socket(url, timeout) as s:  # half a request, then gone
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"Inference-Header-Content-Length: {length}\r\n\r\n".encode() + body[:len(body) // 2])
    return "left"


def _http_cancel(url, arrays, timeout, _):
    body, length = _http_body(arrays)
    with _socket(url, timeout) as s:  # the whole request, gone before the answer
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"Inference-Header-Content-Length: {length}\r\n\r\n".encode() + body)
    return "left"


def _grpc_truncated(url, arrays, timeout, _):
    raw = [a.tobytes() for a in arrays.values()]
    raw[-1] = raw[-1][:-1000]
    return grpc_raw(url, arrays, timeout, raw=raw)


def _grpc_extra_bytes(url, arrays, timeout, _):
    raw = [a.tobytes() for a in arrays.values()]
    raw[-1] += b"\0" * 4096
    return grpc_raw(url, arrays, timeout, raw=raw)


def _grpc_vanish(url, arrays, timeout, _):
    with _socket(url, timeout) as s:  # half of HTTP/2's preface, then gone
        s.sendall(b"PRI * HTTP/2.0\r\n\r\n")
    return "left"


def _grpc_cancel(url, arrays, timeout, _):
    return grpc_raw(url, arrays, timeout, cancel=True)


RAW_FAULTS = [
    Fault("body cut short", ("http",), _http_truncated, r"^400 .*'?query'?"),
    Fault("bytes beyond the tensors", ("http",), _http_extra_bytes, r"^400 .*"),
    Fault("Content-Length of 4 GB", ("http",), _http_over_the_limit, r"^(HTTP/1.1 4\d\d|closed|held open)"),
    Fault("client vanishes mid-request", ("http",), _http_vanish, r"^left$"),
    Fault("request cancelled mid-flight", ("http",), _http_cancel, r"^left$"),
    Fault("contents cut short", ("grpc",), _grpc_truncated, r"INVALID_ARGUMENT: .*'?query'?"),
    Fault("contents beyond the tensors", ("grpc",), _grpc_extra_bytes, r"INVALID_ARGUMENT: .*'?query'?"),
    Fault("client vanishes mid-request", ("grpc",), _grpc_vanish, r"^left$"),
    Fault("request cancelled mid-flight", ("grpc",), _grpc_cancel, r"^(cancelled|answered before the cancel)$"),
]

SOAK_FAULTS = RUNNER_FAULTS + RAW_FAULTS


def send_fault(fault: Fault, protocol: str, runner, url: str, arrays, image_size: int,
               timeout: float) -> tuple[bool, str]:
    """(whether the outcome is the expected one, what came back)."""
    if fault in RUNNER_FAULTS:
        outcome = fault.send(runner, arrays, image_size)
    else:
        outcome = fault.send(url, arrays, timeout, image_size)
    return bool(re.search(fault.expected, outcome, re.I | re.S)), outcome
