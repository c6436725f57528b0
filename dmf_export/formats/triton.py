"""A Triton Inference Server model repository (a folder): the episode graph (and with
``--graph split`` the encoder and head too) for Triton's onnxruntime and python backends,
and with ``--variants`` TorchScript (pytorch_libtorch) and TensorRT (tensorrt_plan) models
too. ``dmf_export.triton`` writes the repository and runs a real server; this module only
fits it into the format registry.

As an artifact it runs through a server started from the ``nvidia-pytriton`` wheel (its
python-backend models), so ``verify`` and ``bench`` measure what a client of the server
gets; the environment that server runs in is ``$DMF_TRITON_ENV`` or this interpreter's.
"""
from __future__ import annotations

import atexit
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from dmf_export.contract import ArtifactInfo
from dmf_export.errors import DMFExportError
from dmf_export.formats import onnx, tensorrt, torchscript
from dmf_export.formats.base import MAX_THREADS, Format, Option, Runner, RunOptions, Staging, Written, strip_checkpoint_suffix
from dmf_export.triton import (DEFAULT_INSTANCES, DEFAULT_THREADS, EPISODE_MODEL, TritonServer,
                               find_distribution, model_name, model_path, repository_models,
                               write_repository)
from dmf_export.triton.remote import open_server

# the artifact formats a repository can hold
VARIANT_FORMATS = {module.FORMAT.name: module.FORMAT for module in (onnx, torchscript, tensorrt)}
VARIANTS = tuple(VARIANT_FORMATS)
# What a repository may ask of its server: past this, memory (a model per instance) grows
# with an option rather than with the machine.
MAX_INSTANCES = 64


class Triton(Format):
    name = "triton"
    title = "Triton"
    suffix = ".triton"  # the default repository folder's name: <checkpoint>.triton/
    precisions = ("fp32", "fp16", "int8")  # int8: the ONNX graph, run by onnxruntime
    options = onnx.INT8_OPTIONS + (Option("variants", ("onnx",), kind="list", choices=VARIANTS,
                      help="triton: the artifact formats the repository holds, comma-separated "
                           "(onnx, torchscript, tensorrt; onnx serves the onnxruntime and python backends)."),
               # bounded: each python-backend instance is a process holding its own copy of the model
               Option("instances", DEFAULT_INSTANCES, kind="int", minimum=1, maximum=MAX_INSTANCES,
                      help="triton: instances of each model (instance_group count); each python-backend "
                           "instance is a process of its own. Instances × threads should not exceed the "
                           "server's cores (README)."),
               Option("threads", DEFAULT_THREADS, kind="int", minimum=0, maximum=MAX_THREADS,
                      help="triton: intra-op threads of each instance (onnxruntime, libtorch); "
                           "0: the runtime's default, a thread per core in every instance."))

    def unavailable(self, device: str = "cpu", purpose: str = "run") -> str | None:
        if purpose == "export":
            return None  # a repository is plain files
        try:
            find_distribution()
        except DMFExportError as err:
            return f"no Triton server to run it here: {err}"
        return None

    def claims(self, path: Path) -> bool:
        return path.suffix == self.suffix or (path.is_dir() and any(path.glob("*/config.pbtxt")))

    def check_options(self, opts) -> None:
        super().check_options(opts)
        if "onnx" not in opts.variants:
            raise DMFExportError("--variants must include onnx: the served episode model is the ONNX graph")
        onnx.check_int8(opts)
        if opts.precision == "int8" and tuple(opts.variants) != ("onnx",):
            raise DMFExportError("--precision int8 is an ONNX graph: use --variants onnx")

    def name_tags(self, opts) -> str:
        return onnx.int8_tag(super().name_tags(opts), opts)

    def outputs(self, checkpoint, opts) -> dict[str, Path]:
        if opts.output:
            return {"repository": Path(opts.output)}
        stem = strip_checkpoint_suffix(Path(checkpoint).name) + self.name_tags(opts)
        return {"repository": Path(checkpoint).parent / f"{stem}{self.suffix}"}

    def write(self, job, outputs, staging, log) -> list[Written]:
        repo, opts = outputs["repository"], job.opts
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dmf-triton-") as scratch:
            artifacts = {}
            for variant in opts.variants:
                fmt = VARIANT_FORMATS[variant]
                graphs = ["episode"] + (["encoder", "head"] if opts.graph == "split" and "split" in fmt.graphs
                                        else [])
                # the format's own deployment graph (TorchScript encodes 16 images at a time on a CPU)
                variant_job = job.for_format(fmt)
                for graph in graphs:
                    base = Path(scratch) / variant / graph
                    base.parent.mkdir(parents=True, exist_ok=True)
                    paths = {graph: Path(f"{base}{fmt.suffix}")}
                    with Staging(fmt.staged(paths)) as inner:
                        fmt.write(variant_job, paths, inner, log)
                    artifacts[paths[graph]] = fmt.read_info(paths[graph])
            log(f"writing the Triton model repository → {repo}")
            write_repository(repo, artifacts, force=opts.force, staging=staging,
                             instances=opts.instances, threads=opts.threads)
        return [Written(repo, "episode" if opts.graph == "episode" else "split", time.perf_counter() - start)]

    def read_info(self, path: Path) -> ArtifactInfo:
        model = model_path(path)  # the episode graph the served model runs
        if not model.is_file():
            raise DMFExportError(f"{path}: not a Triton repository written by dmf-export (no {model.relative_to(path)})")
        info = onnx.FORMAT.read_info(model)
        info.format, info.onnx_flavor = self.name, None
        return info

    def open(self, path: Path, info: ArtifactInfo, run: RunOptions) -> Runner:
        if torch.device(run.device).type != "cpu" or run.provider != "cpu":
            raise DMFExportError(f"{path}: the Triton server from the wheel runs on the CPU")
        # the python-backend models (what the wheel serves): the episode, and with a split
        # repository the encoder and the head, so that features can be encoded apart
        served = repository_models(path)
        split = [model_name(g, "python") for g in ("encoder", "head")]
        models = [EPISODE_MODEL] + (split if all(m in served for m in split) else [])
        server = TritonServer(path, models=models).start()
        atexit.register(server.stop)  # if the runner is never closed
        resources = contextlib.ExitStack()
        resources.callback(server.stop)
        try:
            remote = open_server([server.url("http")])
        except BaseException:
            resources.close()
            raise
        resources.callback(remote.close)  # closed first, while the server still answers
        return Runner(path, info, self.name, remote.graphs, close=resources.close)


FORMAT = Triton()
