"""Triton Inference Server model repositories from the artifacts, and a client runner.

A repository holds, for each graph (the episode, and with ``--graph split`` also the
encoder and the head), two models over the same ``model.onnx``:

- ``<name>``: Triton's onnxruntime backend (``platform: "onnxruntime_onnx"``), for the
  stock NGC containers whose onnxruntime runs ``DeformConv`` (≥ 1.25, see README);
- ``<name>_python``: the python backend running that file with onnxruntime inside the
  server (``triton_python_model.py``), for servers with an older or no onnxruntime
  backend (the ``nvidia-pytriton`` wheel ships only the python backend); it also checks
  each episode against the contract.

and, where asked for, ``<name>_torchscript`` (``pytorch_libtorch``; the server must load
the ``dmf::deform_conv2d`` op library) and ``<name>_tensorrt`` (``tensorrt_plan``; the
server must load the DMFDeformConv2d plugin library), as README's serving section says.

``TritonRunner`` is the client side: ``runner(support, support_labels, query)`` →
``scores``, through ``tritonclient`` (HTTP or gRPC) only.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch

from dmf_export.contract import EPISODE_INPUTS, EPISODE_OUTPUTS, GRAPH_IO, ArtifactInfo, tensor_dims
from dmf_export.errors import DMFExportError

MODEL_NAMES = {"episode": "dmf", "encoder": "dmf_encoder", "head": "dmf_head"}
PYTHON_SUFFIX = "_python"
EPISODE_MODEL = MODEL_NAMES["episode"] + PYTHON_SUFFIX  # the one the nvidia-pytriton wheel serves
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
_TRITON_TYPE = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16"}
_NUMPY_TYPE = {"fp32": np.float32, "fp16": np.float16}
# the episode bounds the python-backend model enforces unless told otherwise: 20-way,
# 20-shot, 300 queries is beyond the test protocol (5-way, 1/5-shot, 75 queries)
DEFAULT_BOUNDS = {"way": 20, "shot": 20, "queries": 300}


def _tensors(names, dims, data_type) -> str:
    entries = [f'  {{\n    name: "{name}"\n    data_type: {data_type}\n'
               f'    dims: [ {", ".join(str(d) for d in dims[name])} ]\n  }}' for name in names]
    return "[\n" + ",\n".join(entries) + "\n]"


def _parameters(values: dict[str, object]) -> str:
    return "".join(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
                   for key, value in values.items())


# backend → (config.pbtxt's first line, the model file's name, the model name's suffix, device)
BACKENDS = {
    "onnxruntime": ('platform: "onnxruntime_onnx"', "model.onnx", "", "KIND_CPU"),
    "python": ('backend: "python"', "model.onnx", PYTHON_SUFFIX, "KIND_CPU"),
    "pytorch": ('platform: "pytorch_libtorch"', "model.pt", "_torchscript", "KIND_CPU"),
    "tensorrt": ('platform: "tensorrt_plan"', "model.plan", "_tensorrt", "KIND_GPU"),
}
# the backends that serve each artifact format
_FORMAT_BACKENDS = {"onnx": ("onnxruntime", "python"), "torchscript": ("pytorch",),
                    "tensorrt": ("tensorrt",)}


def config_text(name: str, graph: str, info: ArtifactInfo, *,
                backend: str = "onnxruntime", instances: int = 1, threads: int | None = None,
                bounds: dict[str, int] | None = None) -> str:
    """config.pbtxt of one model (``backend`` a key of ``BACKENDS``). Whole-episode tensors,
    so ``max_batch_size: 0`` and full shapes. The tensor names are the contract's: for
    TorchScript they are the forward's argument names, which Triton's PyTorch backend
    binds by; a TensorRT engine's bindings carry the ONNX names."""
    inputs, outputs = GRAPH_IO[graph]
    dims = tensor_dims(graph, info.image_size)
    data_type = _TRITON_TYPE[info.precision]
    first_line, _, _, kind = BACKENDS[backend]
    head = f'name: "{name}"\n{first_line}\nmax_batch_size: 0\n'
    body = (f"input {_tensors(inputs, dims, data_type)}\n"
            f"output {_tensors(outputs, dims, data_type)}\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n")
    parameters: dict[str, object] = {}
    if backend == "onnxruntime" and threads:
        parameters["intra_op_thread_count"] = threads
    elif backend == "pytorch" and threads:
        parameters["INTRA_OP_THREAD_COUNT"] = threads
    elif backend == "python":
        parameters["image_size"] = info.image_size
        parameters.update({f"max_{k}": v for k, v in (bounds or {}).items()})
        if threads:
            parameters["intra_op_threads"] = threads
    return head + body + _parameters(parameters)


def _write_model(folder: Path, config: str, artifact: Path, backend: str) -> None:
    version = folder / "1"
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config)
    shutil.copyfile(artifact, version / BACKENDS[backend][1])
    if backend == "python":
        shutil.copyfile(PYTHON_MODEL, version / "model.py")


def _artifact_info(path: Path) -> ArtifactInfo:
    from dmf_export.formats import read_info

    info = read_info(path)
    if info.format not in _FORMAT_BACKENDS:
        raise DMFExportError(f"{path}: Triton serves ONNX, TorchScript and TensorRT artifacts, not {info.format}")
    if info.format == "onnx" and info.onnx_flavor == "plugin":
        raise DMFExportError(f"{path} is a plugin-flavour ONNX graph (for TensorRT); Triton's onnxruntime "
                             "and python backends run the standard flavour")
    if info.graph not in MODEL_NAMES:
        raise DMFExportError(f"{path}: unknown graph {info.graph!r}")
    return info


def write_repository(repo: Path, artifacts, *, force: bool = False, instances: int = 1,
                     threads: int | None = None, bounds: dict[str, int] | None = None,
                     staging=None) -> dict[str, Path]:
    """Write a Triton model repository at ``repo`` from dmf-export artifacts (paths; each
    one's metadata says its format and graph: episode, encoder or head).

    Per artifact: a standard ONNX graph gives an onnxruntime-backend model ``dmf[_encoder|
    _head]`` and a python-backend one ``…_python``; TorchScript ``…_torchscript``
    (pytorch_libtorch); a TensorRT engine ``…_tensorrt`` (tensorrt_plan, on a GPU).
    ``instances`` model instances each, ``threads`` intra-op threads per instance (None:
    the runtime's default, all cores), ``bounds`` the largest way, shot and queries the
    python-backend episode model accepts (default ``DEFAULT_BOUNDS``). All or nothing:
    written in a folder beside ``repo`` and renamed onto it (by ``staging``, a
    ``formats.Staging`` of which ``repo`` is one output, when the caller commits it, else
    here). Returns {model name: folder}.
    """
    from dmf_export.formats.base import Staging

    repo = Path(repo)
    bounds = {**DEFAULT_BOUNDS, **(bounds or {})}
    planned = {}
    for path in map(Path, artifacts):
        info = _artifact_info(path)
        for backend in _FORMAT_BACKENDS[info.format]:
            name = MODEL_NAMES[info.graph] + BACKENDS[backend][2]
            if name in planned:
                raise DMFExportError(f"two artifacts for the model {name}: {planned[name][0]} and {path}")
            planned[name] = (path, info, backend)
    if not planned:
        raise DMFExportError("no artifacts to write a repository from")
    models = {}
    own = staging is None
    staging = Staging([repo], force) if own else staging
    with staging if own else contextlib.nullcontext():
        tmp = staging.temp(repo)
        tmp.mkdir()
        for name, (path, info, backend) in planned.items():
            config = config_text(name, info.graph, info, backend=backend,
                                 instances=instances, threads=threads, bounds=bounds)
            _write_model(tmp / name, config, path, backend)
            models[name] = repo / name
    return models


VARIANTS = tuple(_FORMAT_BACKENDS)  # the artifact formats a repository can hold


class TritonRunner:
    """``runner(support, support_labels, query)`` → ``scores`` from a Triton server.

    ``url_or_server``: 'host:port' (HTTP or gRPC as ``protocol`` says) or a
    ``dmf_export.serve.TritonServer``. One runner per thread (tritonclient's clients are
    not meant to be shared across threads).
    """

    def __init__(self, url_or_server, model: str = EPISODE_MODEL,
                 protocol: str = "http", timeout: float = 60.0, precision: str = "fp32"):
        if protocol not in ("http", "grpc"):
            raise DMFExportError(f"unknown protocol {protocol!r}; choose from http, grpc")
        try:
            if protocol == "http":
                import tritonclient.http as client
            else:
                import tritonclient.grpc as client
        except ImportError as err:
            raise DMFExportError("tritonclient is not installed (pip install 'dmf-export[serve]')") from err
        url = url_or_server if isinstance(url_or_server, str) else url_or_server.url(protocol)
        self.protocol, self.model, self.timeout = protocol, model, timeout
        self._client_module = client
        self.np_dtype = _NUMPY_TYPE[precision]
        if protocol == "http":
            self.client = client.InferenceServerClient(url, connection_timeout=timeout,
                                                       network_timeout=timeout)
        else:
            self.client = client.InferenceServerClient(url)

    def infer(self, inputs: dict[str, np.ndarray], outputs=EPISODE_OUTPUTS) -> list[np.ndarray]:
        """Send named arrays as one request; the named outputs as arrays (raises
        tritonclient's InferenceServerException on an error response)."""
        client = self._client_module
        requests = []
        for name, array in inputs.items():
            tensor = client.InferInput(name, list(array.shape), _datatype(array.dtype))
            tensor.set_data_from_numpy(array)
            requests.append(tensor)
        wanted = [client.InferRequestedOutput(name) for name in outputs]
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self.client.infer(self.model, requests, outputs=wanted, **kwargs)
        return [result.as_numpy(name) for name in outputs]

    def __call__(self, support, support_labels, query):
        arrays = {name: t.detach().cpu().numpy().astype(self.np_dtype, copy=False)
                  for name, t in zip(EPISODE_INPUTS, (support, support_labels, query))}
        return torch.from_numpy(self.infer(arrays)[0].copy())

    def close(self):
        self.client.close()


def _datatype(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(dtype))
