"""ONNX (``.onnx``): the standard flavour runs in stock onnxruntime ≥ 1.25 (deformable conv
as ONNX ``DeformConv``); the plugin flavour carries the TensorRT plugin's node instead."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from dmf_export._version import __version__
from dmf_export.contract import GRAPH_IO, METADATA_KEY, ArtifactInfo
from dmf_export.data import MAX_CALIBRATION_IMAGES, SPLITS, calibration_images
from dmf_export.errors import DMFExportError
from dmf_export.formats import _trace
from dmf_export.formats.base import Format, Option, Runner, RunOptions, split_partner
from dmf_export.onnx_ops import FLAVORS, translation_table
from dmf_export.onnx_quant import DEFAULT_METHOD, METHODS, backbone_weights, quantize

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
# int8 (onnx and triton read them): the images the activation ranges are calibrated on
CALIBRATE = Option("calibrate", None, kind="folder",
                   help="int8: the dataset to calibrate on (miniImageNet pickles or SPLIT/<class>/<images> "
                        "folders, as evaluate reads them).")
CALIB_SPLIT = Option("split", "test", kind="choice", choices=SPLITS,
                     help="int8: the split of --calibrate whose images calibrate.")
# bounded: the distinct images of these episodes are in memory at once (and capped too)
MAX_CALIB_EPISODES = 100
CALIB_EPISODES = Option("calib_episodes", 4, kind="int", minimum=1, maximum=MAX_CALIB_EPISODES,
                        help=f"int8: calibrate on the distinct images of the first N episodes evaluate "
                             f"draws (5w1s15q, seed 112), at most {MAX_CALIBRATION_IMAGES} images.")
CALIB_METHOD = Option("calib_method", DEFAULT_METHOD, kind="choice", choices=METHODS,
                      help="int8: how activation ranges are set from the calibration images (README).")
CALIB_TRANSFORM = Option("calib_transform", "imagenet", kind="choice", choices=("imagenet", "cifar-fs"),
                         help="int8: the preprocessing of the calibration images, as evaluate's "
                              "(cifar-fs: evaluate --cifar, images at their stored size).")
INT8_OPTIONS = (CALIBRATE, CALIB_SPLIT, CALIB_EPISODES, CALIB_METHOD, CALIB_TRANSFORM)


def check_int8(opts) -> None:
    """One line for int8 options that do not go together (onnx and triton)."""
    if opts.precision != "int8":
        given = [o.flag for o in INT8_OPTIONS if getattr(opts, o.name) != o.default]
        if given:
            raise DMFExportError(f"{given[0]} applies to --precision int8 (got --precision {opts.precision})")
        return
    if opts.calibrate is None:
        raise DMFExportError("--precision int8 needs --calibrate DATA: the images whose activation "
                             "ranges the int8 graph is built for (a dataset as evaluate reads it)")
    if getattr(opts, "onnx_flavor", "standard") == "plugin":
        raise DMFExportError("--precision int8 is for onnxruntime (the standard flavour), not the "
                             "plugin flavour")


def int8_tag(tags: str, opts) -> str:
    """``tags`` (a default output name's) with ``.int8`` for an int8 export, once."""
    return tags + ".int8" if opts.precision == "int8" and ".int8" not in tags else tags


def calibration_set(job, log):
    """The int8 calibration images of ``job`` (read once per export, checked before anything
    is written) and what the metadata says of them."""
    if "calibration" not in job.cache:
        opts = job.opts
        found = calibration_images(opts.calibrate, opts.split, opts.calib_episodes,
                                   cifar=opts.calib_transform == "cifar-fs", image_size=opts.image_size)
        log(f"calibrating on {len(found.images)} images of {found.where} ({found.layout}, the first "
            f"{found.episodes} episodes' distinct images), method {opts.calib_method}")
        meta = {"data": str(Path(opts.calibrate).resolve()), "split": found.split, "layout": found.layout,
                "episodes": found.episodes, "images": len(found.images), "method": opts.calib_method,
                "transform": opts.calib_transform}
        job.cache["calibration"] = (found.images, meta)
    return job.cache["calibration"]


def write_onnx(job, graph: str, path: Path, flavor: str, fmt: str = "onnx", **extra) -> None:
    """The ``graph`` of ``job`` as ONNX at ``path``, checked by ``onnx.checker``
    (``extra``: more ``ArtifactInfo`` fields for its metadata)."""
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
    info = job.info(fmt, graph, onnx_flavor=flavor, **extra)
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
    precisions = ("fp32", "fp16", "int8")
    options = (ONNX_FLAVOR, OPSET) + INT8_OPTIONS
    run_flags = ("tf32",)

    def check_options(self, opts) -> None:
        super().check_options(opts)
        check_int8(opts)

    def verification(self, opts) -> tuple[str | None, dict]:
        if opts.onnx_flavor == "plugin":
            return "the plugin-flavour graph runs in TensorRT (export --format tensorrt)", {}
        if opts.precision == "int8":  # onnxruntime's CPU provider has the int8 kernels
            return None, {"device": "cpu", "provider": "cpu"}
        reason, run = super().verification(opts)
        if reason or opts.precision != "fp16":
            return reason, run
        import onnxruntime  # heavy; only an fp16 export asks

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ("fp16 ONNX runs on onnxruntime's CUDA provider, which this onnxruntime lacks "
                    "(pip install onnxruntime-gpu, then dmf-export verify --provider cuda)"), {}
        return None, {"device": "cuda", "provider": "cuda"}

    def name_tags(self, opts) -> str:
        return int8_tag(super().name_tags(opts), opts) + (".plugin" if opts.onnx_flavor == "plugin" else "")

    def write(self, job, outputs, staging, log):
        if job.opts.precision == "int8":
            calibration_set(job, log)  # bad calibration data: one line before any graph is written
        return super().write(job, outputs, staging, log)

    def write_graph(self, job, graph, path, log):
        if job.opts.precision != "int8":
            write_onnx(job, graph, path, job.opts.onnx_flavor)
            return
        images, meta = calibration_set(job, log)
        if graph == "head":  # the head stays fp32 (onnx_quant)
            write_onnx(job, graph, path, job.opts.onnx_flavor, calibration=meta)
            return
        with tempfile.TemporaryDirectory(prefix="dmf-int8-") as scratch:
            fp32 = Path(scratch) / f"{graph}.fp32.onnx"
            write_onnx(job, graph, fp32, job.opts.onnx_flavor, calibration=meta)
            log(f"quantizing the {graph} graph's backbone to int8")
            quantize(fp32, path, graph, images, backbone_weights(job.modules["encoder"], graph),
                     job.info(self.name, graph, onnx_flavor=job.opts.onnx_flavor, calibration=meta),
                     job.opts.calib_method)

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
