"""Run an exported artifact on an episode: one small class per backend, same call.

``open_artifact(path)`` reads the artifact's own metadata and returns a runner with
``runner(support, support_labels, query) -> scores`` (torch tensors in, torch tensor
out) and ``runner.info``. A split export is run by passing the encoder's path: the
head is found beside it.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch

from dmf_export.contract import METADATA_KEY, ArtifactInfo
from dmf_export.errors import DMFExportError, summarize

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _jit_load(path, **kwargs):
    with warnings.catch_warnings():  # TorchScript's deprecation notice is not the user's concern
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), **kwargs)


def read_info(path: Path) -> ArtifactInfo:
    path = Path(path)
    if not path.is_file():
        raise DMFExportError(f"{path}: no such file")
    suffix = path.suffix
    try:
        if suffix == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            meta = {p.key: p.value for p in model.metadata_props}
            if METADATA_KEY not in meta:
                raise DMFExportError(f"{path}: not an ONNX file written by dmf-export (no metadata)")
            return ArtifactInfo.from_json(meta[METADATA_KEY])
        if suffix in (".ts", ".pt"):
            extra = {METADATA_KEY: ""}
            _jit_load(path, map_location="cpu", _extra_files=extra)
            if not extra[METADATA_KEY]:
                raise DMFExportError(f"{path}: not a TorchScript file written by dmf-export")
            return ArtifactInfo.from_json(extra[METADATA_KEY])
        if suffix in (".engine", ".plan"):
            from dmf_export.tensorrt import read_engine_info

            return read_engine_info(path)
    except DMFExportError:
        raise
    except Exception as err:
        raise DMFExportError(f"{path}: cannot read it as a {suffix[1:]} artifact ({summarize(err)})") from err
    raise DMFExportError(f"{path}: unknown artifact type {suffix!r} (expected .ts, .onnx or .engine)")


def _split_partner(path: Path, info: ArtifactInfo) -> Path:
    if info.graph != "encoder":
        raise DMFExportError(f"{path} is the head of a split export: pass the encoder's path")
    partner = path.with_name(path.name.replace(".encoder.", ".head.", 1))
    if partner == path or not partner.is_file():
        raise DMFExportError(f"{path} is a split encoder but its head {partner} is missing")
    return partner


def check_device(device: str, cuda_graph: bool = False, path=None,
                 info: ArtifactInfo | None = None) -> None:
    """Refuse in one line what ``device`` cannot run: CUDA graphs or a GPU this torch does
    not see, and (given a TorchScript artifact's ``info``) an fp16 graph off the GPU.
    Called before loading, and by bench before minutes of timing."""
    on_gpu = torch.device(device).type == "cuda"
    if info is not None and info.format == "torchscript" and info.precision == "fp16" and not on_gpu:
        raise DMFExportError(f"{path} is an fp16 TorchScript graph: run it on a GPU (--device cuda)")
    if cuda_graph and not on_gpu:
        raise DMFExportError("CUDA graphs need a GPU (--device cuda)")
    if on_gpu and not torch.cuda.is_available():
        raise DMFExportError(f"device {device!r}: this torch sees no CUDA GPU")


class _CudaGraphs:
    """Replays ``fn`` from a CUDA graph captured once per input signature (shapes, dtypes).

    Capture follows PyTorch's recipe: warm-up runs on a side stream (cuDNN's algorithm
    choice, TorchScript's profiling runs), then one captured call on static input tensors;
    each call copies its inputs in, replays, and returns a copy of the static output.
    """

    WARMUP = 3

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict = {}

    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*static)
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for dst, src in zip(static, args):
            dst.copy_(src)
        graph.replay()
        return out.clone()


class _ExactFloat32:
    """While active, cuDNN convolutions and cuBLAS matmuls stay in IEEE fp32 (no TF32).

    PyTorch lets cuDNN use TF32 by default on Ampere and later, which moves scores by
    about 5e-3 (3.6e-4 relative; benchmarks/precision_drift.py emulates it): an fp32
    artifact promises 1e-4 of the original.
    """

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


class TorchScriptRunner:
    """``cuda_graph``: replay each episode size from a captured CUDA graph (GPU only).
    ``tf32``: let an fp32 graph use TF32 on the GPU (faster, ~5e-3 from the original);
    off by default, so fp32 means fp32."""

    backend = "torchscript"

    def __init__(self, path: Path, info: ArtifactInfo, device: str = "cpu", *,
                 cuda_graph: bool = False, tf32: bool = False):
        import dmf_export  # noqa: F401  (registers dmf::deform_conv2d for the loaded graph)

        self.info, self.device = info, torch.device(device)
        self.dtype = torch.float16 if info.precision == "fp16" else torch.float32
        check_device(device, cuda_graph, path, info)
        self._exact = self.device.type == "cuda" and self.dtype == torch.float32 and not tf32
        load = lambda p: _jit_load(p, map_location=self.device).eval()  # noqa: E731
        if info.graph == "episode":
            self.episode = load(path)
        else:
            self.encoder, self.head = load(path), load(_split_partner(path, info))
            self.episode = lambda s, y, q: self.head(self.encoder(s), y, self.encoder(q))  # noqa: E731
        self._encode = self.encoder if info.graph != "episode" else None
        if cuda_graph:
            self.episode = _CudaGraphs(self.episode)
            if self._encode is not None:
                self._encode = _CudaGraphs(self._encode)

    def _context(self):
        return _ExactFloat32() if self._exact else contextlib.nullcontext()

    @torch.inference_mode()
    def encode(self, images):
        """Backbone features of a split export's encoder."""
        if self._encode is None:
            raise DMFExportError("encode() needs the encoder of a split export")
        with self._context():
            return self._encode(images.to(self.device, self.dtype))

    @torch.inference_mode()
    def __call__(self, support, support_labels, query):
        args = [t.to(self.device, self.dtype) for t in (support, support_labels, query)]
        with self._context():
            return self.episode(*args)


class OnnxRunner:
    backend = "onnxruntime"

    def __init__(self, path: Path, info: ArtifactInfo, provider: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        if info.onnx_flavor == "plugin":
            raise DMFExportError(f"{path} is a plugin-flavour ONNX graph (for TensorRT); "
                                 "onnxruntime runs the standard flavour")
        name = PROVIDERS.get(provider)
        if name is None:
            raise DMFExportError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
        if name not in ort.get_available_providers():
            raise DMFExportError(f"onnxruntime provider {provider!r} is not installed here "
                                 "(pip install 'dmf-export[gpu]' for cuda/tensorrt)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = lambda p: ort.InferenceSession(str(p), options, providers=[name])  # noqa: E731
        self.info, self.provider = info, provider
        self.np_dtype = np.float16 if info.precision == "fp16" else np.float32
        if info.graph == "episode":
            self.episode = session(path)
        else:
            self.encoder, self.head = session(path), session(_split_partner(path, info))

    def _np(self, t):
        return t.detach().cpu().numpy().astype(self.np_dtype, copy=False)

    def encode(self, images):
        """Backbone features of a split export's encoder."""
        return torch.from_numpy(self.encoder.run(None, {"images": self._np(images)})[0])

    def __call__(self, support, support_labels, query):
        support, labels, query = (self._np(t) for t in (support, support_labels, query))
        if self.info.graph == "episode":
            scores = self.episode.run(None, {"support": support, "support_labels": labels, "query": query})[0]
        else:
            encode = lambda x: self.encoder.run(None, {"images": x})[0]  # noqa: E731
            scores = self.head.run(None, {"support_features": encode(support), "support_labels": labels,
                                          "query_features": encode(query)})[0]
        return torch.from_numpy(scores)


def open_artifact(path, provider: str = "cpu", device: str = "cpu", threads: int | None = None, *,
                  cuda_graph: bool = False, tf32: bool = False):
    """A runner for the artifact at ``path``; ``cuda_graph`` and ``tf32`` apply to
    TorchScript on a GPU (see ``TorchScriptRunner``)."""
    path = Path(path)
    info = read_info(path)
    if info.format == "torchscript":
        return TorchScriptRunner(path, info, device, cuda_graph=cuda_graph, tf32=tf32)
    if cuda_graph:
        raise DMFExportError(f"{path}: --cuda-graph applies to TorchScript artifacts")
    if info.format == "onnx":
        return OnnxRunner(path, info, provider, threads)
    if info.format == "tensorrt":
        from dmf_export.tensorrt import EngineRunner

        return EngineRunner(path)
    raise DMFExportError(f"{path}: unknown artifact format {info.format!r}")
