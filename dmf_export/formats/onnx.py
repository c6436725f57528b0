"""ONNX (``.onnx``): the standard flavour runs in stock onnxruntime ≥ 1.25 (deformable conv
as ONNX ``DeformConv``); the plugin flavour carries the TensorRT plugin's node instead."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmf_export._version import __version__
from dmf_export.contract import GRAPH_IO, METADATA_KEY, ArtifactInfo
from dmf_export.errors import DMFExportError
from dmf_export.formats import _trace
from dmf_export.formats.base import Format, Option, Runner, RunOptions, split_partner
from dmf_export.onnx_ops import FLAVORS, translation_table

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


ONNX_FLAVOR = Option("onnx_flavor", "standard", kind="choice", choices=FLAVORS,
                     help="standard: ONNX DeformConv (stock onnxruntime); plugin: the TensorRT plugin's node.")
# TensorRT builds its engines from the ONNX graph, so it reads the same option
OPSET = Option("opset", 19, kind="int", minimum=19,
               help="ONNX opset (≥ 19: DeformConv first appears in opset 19).")


def write_onnx(job, graph: str, path: Path, flavor: str, fmt: str = "onnx") -> None:
    """The ``graph`` of ``job`` as ONNX at ``path``, checked by ``onnx.checker``."""
    import onnx  # heavy, and only an export needs it

    opts = job.opts
    inputs, outputs = GRAPH_IO[graph]
    example = _trace.example_inputs(graph, opts, job.dtype)
    with _trace.quiet():
        program = torch.onnx.export(
            job.modules[graph], example, dynamo=True, opset_version=opts.opset,
            input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes=_trace.dynamic_shapes(graph),
            custom_translation_table=translation_table(flavor),
            external_data=False, optimize=True, verbose=False,
        )
    info = job.info(fmt, graph, onnx_flavor=flavor)
    program.model.metadata_props[METADATA_KEY] = info.to_json()
    program.model.producer_name = "dmf-export"
    program.model.producer_version = __version__
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))


def _session_fn(session, names, np_dtype):
    """Torch tensors (or arrays) in, a torch tensor out, through an onnxruntime session."""
    def run(*args):
        feeds = {name: (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
                 .astype(np_dtype, copy=False) for name, a in zip(names, args)}
        return torch.from_numpy(session.run(None, feeds)[0])
    return run


class Onnx(Format):
    name = "onnx"
    title = "ONNX"
    suffix = ".onnx"
    options = (ONNX_FLAVOR, OPSET)
    run_flags = ("tf32",)

    def verification(self, opts) -> tuple[str | None, dict]:
        if opts.onnx_flavor == "plugin":
            return "the plugin-flavour graph runs in TensorRT (export --format tensorrt)", {}
        reason, run = super().verification(opts)
        if reason or opts.precision != "fp16":
            return reason, run
        import onnxruntime  # heavy; only an fp16 export asks

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ("fp16 ONNX runs on onnxruntime's CUDA provider, which this onnxruntime lacks "
                    "(pip install onnxruntime-gpu, then dmf-export verify --provider cuda)"), {}
        return None, {"device": "cuda", "provider": "cuda"}

    def name_tags(self, opts) -> str:
        return super().name_tags(opts) + (".plugin" if opts.onnx_flavor == "plugin" else "")

    def write_graph(self, job, graph, path, log):
        write_onnx(job, graph, path, job.opts.onnx_flavor)

    def read_info(self, path: Path) -> ArtifactInfo:
        import onnx  # heavy (protobuf schemas): only reading or writing an .onnx needs it

        model = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in meta:
            raise DMFExportError(f"{path}: not an ONNX file written by dmf-export (no metadata)")
        return ArtifactInfo.from_json(meta[METADATA_KEY])

    def open(self, path: Path, info: ArtifactInfo, run: RunOptions) -> Runner:
        import onnxruntime as ort  # heavy: only running an .onnx needs it, not --help or export

        if info.onnx_flavor == "plugin":
            raise DMFExportError(f"{path} is a plugin-flavour ONNX graph (for TensorRT); "
                                 "onnxruntime runs the standard flavour")
        provider = PROVIDERS.get(run.provider)
        if provider is None:
            raise DMFExportError(f"unknown provider {run.provider!r}; choose from {', '.join(PROVIDERS)}")
        if provider not in ort.get_available_providers():
            raise DMFExportError(f"onnxruntime provider {run.provider!r} is not installed here "
                                 "(pip install 'dmf-export[gpu]' for cuda/tensorrt)")
        options = ort.SessionOptions()
        if run.threads:
            options.intra_op_num_threads = run.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        np_dtype = np.float16 if info.precision == "fp16" else np.float32
        files = {"episode": path} if info.graph == "episode" else {
            "encoder": path, "head": split_partner(path, info)}
        # onnxruntime's CUDA provider uses TF32 by default (~5e-3 from the original): fp32 means fp32
        providers = [(provider, {"use_tf32": "1" if run.tf32 else "0"}) if run.provider == "cuda" else provider]
        graphs = {}
        for graph, file in files.items():
            session = ort.InferenceSession(str(file), options, providers=providers)
            graphs[graph] = _session_fn(session, GRAPH_IO[graph][0], np_dtype)
        return Runner(path, info, "onnxruntime", graphs)


FORMAT = Onnx()
