"""The client side of a Triton server: ``runner(support, support_labels, query)`` →
``scores``, through ``tritonclient`` (HTTP or gRPC) only."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch

from dmf_export.contract import DEFAULT_IMAGE_SIZE, EPISODE_INPUTS, EPISODE_OUTPUTS, EpisodeSize, make_episode
from dmf_export.errors import DMFExportError
from dmf_export.triton.repository import EPISODE_MODEL
from dmf_export.triton.server import TritonServer

_NUMPY_TYPE = {"fp32": np.float32, "fp16": np.float16}
_NUMPY_TYPE["int8"] = _NUMPY_TYPE["fp32"]  # an int8 graph takes and returns fp32


class TritonRunner:
    """``runner(support, support_labels, query)`` → ``scores`` from a Triton server.

    ``url_or_server``: 'host:port' (HTTP or gRPC as ``protocol`` says) or a
    ``TritonServer``. One runner per thread (tritonclient's clients are not meant to be
    shared across threads).
    """

    def __init__(self, url_or_server: str | TritonServer, model: str = EPISODE_MODEL,
                 protocol: str = "http", timeout: float = 60.0, precision: str = "fp32"):
        if protocol not in ("http", "grpc"):
            raise DMFExportError(f"unknown protocol {protocol!r}; choose from http, grpc")
        try:  # tritonclient is optional (dmf-export[client])
            if protocol == "http":
                import tritonclient.http as client
            else:
                import tritonclient.grpc as client
            from tritonclient.utils import np_to_triton_dtype
        except ImportError as err:
            raise DMFExportError("tritonclient is not installed (pip install 'dmf-export[serve]')") from err
        url = url_or_server if isinstance(url_or_server, str) else url_or_server.url(protocol)
        self.protocol, self.model, self.timeout = protocol, model, timeout
        self._client_module = client
        self._triton_dtype = np_to_triton_dtype
        self.np_dtype = _NUMPY_TYPE[precision]
        if protocol == "http":
            self.client = client.InferenceServerClient(url, connection_timeout=timeout,
                                                       network_timeout=timeout)
        else:
            self.client = client.InferenceServerClient(url)

    def infer(self, inputs: dict[str, np.ndarray], outputs=EPISODE_OUTPUTS,
              model: str | None = None) -> list[np.ndarray]:
        """Send named arrays as one request to ``model`` (default the runner's); the named
        outputs as arrays (raises tritonclient's InferenceServerException on an error
        response, the socket's errors on a broken connection)."""
        client = self._client_module
        requests = []
        for name, array in inputs.items():
            tensor = client.InferInput(name, list(array.shape), self._triton_dtype(np.dtype(array.dtype)))
            tensor.set_data_from_numpy(array)
            requests.append(tensor)
        wanted = [client.InferRequestedOutput(name) for name in outputs]
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self.client.infer(model or self.model, requests, outputs=wanted, **kwargs)
        return [result.as_numpy(name) for name in outputs]

    def __call__(self, support, support_labels, query):
        arrays = {name: t.detach().cpu().numpy().astype(self.np_dtype, copy=False)
                  for name, t in zip(EPISODE_INPUTS, (support, support_labels, query))}
        return torch.from_numpy(self.infer(arrays)[0].copy())

    def close(self):
        self.client.close()


def perf_analyzer_data(episodes, precision: str = "fp32") -> dict:
    """perf_analyzer's ``--input-data`` JSON (as a dict) for ``episodes``, each a
    (support, support_labels, query) of tensors or arrays: one ``data`` entry per episode
    (perf_analyzer sends them round-robin), each input its ``shape`` and its bytes
    (row-major, little-endian, the model's dtype) in base64, as perf_analyzer's "Real
    Input Data" reads them. The model's dims are -1 for S, way and Q, so every tensor
    carries its shape."""
    dtype = np.dtype(_NUMPY_TYPE[precision]).newbyteorder("<")
    entries = []
    for episode in episodes:
        entry = {}
        for name, tensor in zip(EPISODE_INPUTS, episode):
            array = np.ascontiguousarray(np.asarray(tensor), dtype=dtype)
            entry[name] = {"content": {"b64": base64.b64encode(array.tobytes()).decode("ascii")},
                           "shape": list(array.shape)}
        entries.append(entry)
    return {"data": entries}


def write_perf_analyzer_data(path, size: EpisodeSize, image_size: int = DEFAULT_IMAGE_SIZE,
                             seeds=(0,), precision: str = "fp32") -> Path:
    """Write perf_analyzer's input-data file for seeded random episodes of ``size``
    (``make_episode``, one per seed) at ``path``; returns the path."""
    episodes = [make_episode(size, image_size, seed=seed) for seed in seeds]
    path = Path(path)
    path.write_text(json.dumps(perf_analyzer_data(episodes, precision)))
    return path
