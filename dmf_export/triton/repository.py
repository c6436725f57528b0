"""Triton Inference Server model repositories from the artifacts: writing them, and reading
back which backend each model needs.

A repository holds, for each graph (the episode, and with ``--graph split`` also the
encoder and the head), two models over the same ``model.onnx``:

- ``<name>``: Triton's onnxruntime backend (``platform: "onnxruntime_onnx"``), for the
  stock NGC containers whose onnxruntime runs ``DeformConv`` (≥ 1.25, see README);
- ``<name>_python``: the python backend running that file with onnxruntime inside the
  server (``python_model.py`` beside this module, shipped as ``model.py``), for servers
  with an older or no onnxruntime backend (the ``nvidia-pytriton`` wheel ships only the
  python backend); it also checks each episode against the contract.

and, where asked for, ``<name>_torchscript`` (``pytorch_libtorch``; the server must load
the ``dmf::deform_conv2d`` op library) and ``<name>_tensorrt`` (``tensorrt_plan``; the
server must load the DMFDeformConv2d plugin library), as README's serving section says.
"""
from __future__ import annotations

import ast
import contextlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from dmf_export.contract import GRAPH_IO, ArtifactInfo, tensor_dims
from dmf_export.errors import DMFExportError
from dmf_export.staging import Staging


@dataclass(frozen=True)
class Backend:
    """One Triton backend a repository's models can name."""

    name: str                    # the backend's folder in a server's backend directory
    platform: str | None         # config.pbtxt's platform; None: the config names the backend
    model_file: str              # the file in the model's version folder
    suffix: str                  # what the model's name adds to the graph's (dmf + suffix)
    kind: str                    # instance group kind: where the instances run
    threads_parameter: str | None = None  # the config parameter for intra-op threads

    @property
    def config_line(self) -> str:
        return f'platform: "{self.platform}"' if self.platform else f'backend: "{self.name}"'


BACKENDS = {backend.name: backend for backend in (
    Backend("onnxruntime", "onnxruntime_onnx", "model.onnx", "", "KIND_CPU", "intra_op_thread_count"),
    Backend("python", None, "model.onnx", "_python", "KIND_CPU", "intra_op_threads"),
    Backend("pytorch", "pytorch_libtorch", "model.pt", "_torchscript", "KIND_CPU", "INTRA_OP_THREAD_COUNT"),
    Backend("tensorrt", "tensorrt_plan", "model.plan", "_tensorrt", "KIND_GPU"),
)}
# a config that names a platform gets its backend from it (what a server must have to load it)
PLATFORM_BACKENDS = {b.platform: b.name for b in BACKENDS.values() if b.platform}
# the backends that serve each artifact format
FORMAT_BACKENDS = {"onnx": ("onnxruntime", "python"), "torchscript": ("pytorch",),
                   "tensorrt": ("tensorrt",)}

MODEL_NAMES = {"episode": "dmf", "encoder": "dmf_encoder", "head": "dmf_head"}
VERSION = "1"  # every model has one version folder


def model_name(graph: str, backend: str) -> str:
    """The model serving ``graph`` through ``backend`` (``dmf``, ``dmf_encoder_python``…)."""
    return MODEL_NAMES[graph] + BACKENDS[backend].suffix


def model_path(repo, graph: str = "episode", backend: str = "python") -> Path:
    """The model file of ``graph``'s ``backend`` model in ``repo`` (by default the episode
    graph's ``model.onnx`` that the python-backend model runs)."""
    return Path(repo) / model_name(graph, backend) / VERSION / BACKENDS[backend].model_file


EPISODE_MODEL = model_name("episode", "python")  # the one the nvidia-pytriton wheel serves

PYTHON_MODEL = Path(__file__).with_name("python_model.py")  # shipped as <model>/1/model.py


def _shipped_constant(name: str):
    """A constant assigned in the shipped python model, read from its source: importing it
    needs ``triton_python_backend_utils``, which only the server's stub has."""
    for node in ast.parse(PYTHON_MODEL.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise DMFExportError(f"internal error: {PYTHON_MODEL} assigns no {name}")


# {parameter: default} the python-backend model reads from its config (its own table)
PYTHON_PARAMETERS: dict[str, object] = _shipped_constant("PARAMETERS")
# the episode bounds the python-backend model enforces unless told otherwise: 20-way,
# 20-shot, 300 queries is beyond the test protocol (5-way, 1/5-shot, 75 queries)
DEFAULT_BOUNDS = {"way": 20, "shot": 20, "queries": 300}

# instances of each model and intra-op threads of each instance when export is not told:
# measured for a 2-core server (README, "Serving"): one instance of one thread answered as
# many episodes per second at 2 and 4 concurrent clients as at one, over HTTP and gRPC
# alike. onnxruntime's own default (a thread per core, spinning between episodes, per
# instance) lost half its throughput at 2 clients, and costs more CPU per episode.
DEFAULT_INSTANCES = 1
DEFAULT_THREADS: int | None = 1

_TRITON_TYPE = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16"}
_TRITON_TYPE["int8"] = _TRITON_TYPE["fp32"]  # an int8 graph takes and returns fp32


def _tensors(names, dims, data_type) -> str:
    entries = [f'  {{\n    name: "{name}"\n    data_type: {data_type}\n'
               f'    dims: [ {", ".join(str(d) for d in dims[name])} ]\n  }}' for name in names]
    return "[\n" + ",\n".join(entries) + "\n]"


def _parameters(values: dict[str, object]) -> str:
    return "".join(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
                   for key, value in values.items())


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
    spec = BACKENDS[backend]
    head = f'name: "{name}"\n{spec.config_line}\nmax_batch_size: 0\n'
    body = (f"input {_tensors(inputs, dims, data_type)}\n"
            f"output {_tensors(outputs, dims, data_type)}\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: {spec.kind}\n  }}\n]\n")
    parameters: dict[str, object] = {}
    if backend == "python":
        parameters["image_size"] = info.image_size
        parameters.update({f"max_{k}": v for k, v in (bounds or {}).items()})
    if threads and spec.threads_parameter:
        parameters[spec.threads_parameter] = threads
    unread = [key for key in parameters if key not in PYTHON_PARAMETERS] if backend == "python" else []
    if unread:
        raise DMFExportError(f"the python-backend model reads no parameter {', '.join(unread)} "
                             f"(it reads {', '.join(PYTHON_PARAMETERS)})")
    return head + body + _parameters(parameters)


def _write_model(folder: Path, config: str, artifact: Path, backend: str) -> None:
    version = folder / VERSION
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config)
    shutil.copyfile(artifact, version / BACKENDS[backend].model_file)
    if backend == "python":
        shutil.copyfile(PYTHON_MODEL, version / "model.py")


def _check_artifact(path: Path, info: ArtifactInfo) -> None:
    if info.format not in FORMAT_BACKENDS:
        raise DMFExportError(f"{path}: Triton serves ONNX, TorchScript and TensorRT artifacts, not {info.format}")
    if info.format == "onnx" and info.onnx_flavor == "plugin":
        raise DMFExportError(f"{path} is a plugin-flavour ONNX graph (for TensorRT); Triton's onnxruntime "
                             "and python backends run the standard flavour")
    if info.graph not in MODEL_NAMES:
        raise DMFExportError(f"{path}: unknown graph {info.graph!r}")


def write_repository(repo: Path, artifacts, *, force: bool = False,
                     instances: int = DEFAULT_INSTANCES, threads: int | None = None,
                     bounds: dict[str, int] | None = None,
                     staging: Staging | None = None) -> dict[str, Path]:
    """Write a Triton model repository at ``repo`` from dmf-export artifacts ({path: its
    ``ArtifactInfo``}, as ``formats.read_info`` reads it: format and graph, episode,
    encoder or head).

    Per artifact: a standard ONNX graph gives an onnxruntime-backend model ``dmf[_encoder|
    _head]`` and a python-backend one ``…_python``; TorchScript ``…_torchscript``
    (pytorch_libtorch); a TensorRT engine ``…_tensorrt`` (tensorrt_plan, on a GPU).
    ``instances`` model instances each, ``threads`` intra-op threads per instance (None:
    ``DEFAULT_THREADS``; 0: the runtime's default, a thread per core), ``bounds`` the largest way, shot and queries the
    python-backend episode model accepts (default ``DEFAULT_BOUNDS``). All or nothing:
    written in a folder beside ``repo`` and renamed onto it (by ``staging``, a
    ``Staging`` of which ``repo`` is one output, when the caller commits it, else
    here). Returns {model name: folder}.
    """
    repo = Path(repo)
    threads = DEFAULT_THREADS if threads is None else threads
    bounds = {**DEFAULT_BOUNDS, **(bounds or {})}
    planned = {}
    for path, info in artifacts.items():
        path = Path(path)
        _check_artifact(path, info)
        for backend in FORMAT_BACKENDS[info.format]:
            name = model_name(info.graph, backend)
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


def repository_models(repo) -> dict[str, str]:
    """{model name: backend} of a repository, from each model's config.pbtxt."""
    models = {}
    for config in sorted(Path(repo).glob("*/config.pbtxt")):
        text = config.read_text()
        backend = re.search(r'^\s*backend:\s*"([^"]+)"', text, re.M)
        platform = re.search(r'^\s*platform:\s*"([^"]+)"', text, re.M)
        name = config.parent.name
        if backend:
            models[name] = backend.group(1)
        elif platform and platform.group(1) in PLATFORM_BACKENDS:
            models[name] = PLATFORM_BACKENDS[platform.group(1)]
        else:
            raise DMFExportError(f"{config}: neither a backend nor a known platform")
    if not models:
        raise DMFExportError(f"{repo} is not a Triton model repository (no */config.pbtxt)")
    return models
