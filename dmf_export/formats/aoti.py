"""torch.export + AOTInductor (``.pt2``): the graph compiled ahead of time into a package that
Python loads with ``torch._inductor.aoti_load_package`` and libtorch C++ with
``torch::inductor::AOTIModelPackageLoader``, with no Python at run time.

``dmf::deform_conv2d`` is not an Inductor kernel: the package calls it through PyTorch's
dispatcher, so the op library must be loaded first (the runner does it, building it if
needed; in C++ ``dlopen`` of the path ``dmf-export op-library`` prints). A package is compiled for
one device (``--device``), and on a CPU for this CPU's vector instructions.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import zipfile
from pathlib import Path

import torch

from dmf_export import ops
from dmf_export.contract import METADATA_KEY, ArtifactInfo
from dmf_export.errors import DMFExportError
from dmf_export.formats import _trace
from dmf_export.formats._torch import check_bf16, torch_graphs
from dmf_export.formats.base import Format, Option, Runner, RunOptions, split_partner

# where AOTInductor keeps a package's metadata (aot_inductor.metadata) beside its library
_METADATA_SUFFIX = ".wrapper_metadata.json"


def _compiler() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    return shutil.which((shlex.split(compiler) or [""])[0])


def _package_metadata(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(_METADATA_SUFFIX) and "/data/aotinductor/" in f"/{name}":
                return json.loads(archive.read(name))
    raise DMFExportError(f"{path}: not an AOTInductor package (no model metadata inside)")


class AOTInductor(Format):
    name = "aoti"
    title = "AOTInductor"
    suffix = ".pt2"
    precisions = ("fp32", "fp16",
                  "bf16")
    options = (Option("device", "cpu", help="aoti: the device the package is compiled for and runs on (cpu, cuda)."),)
    run_flags = ("cuda_graph", "tf32")

    def unavailable(self, device: str = "cpu", purpose: str = "run") -> str | None:
        if _compiler() is None:
            return "AOTInductor compiles C++: no C++ compiler found (install g++, or set CXX)"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return "a CUDA package needs a GPU, and torch sees none here"
        return None

    def check_options(self, opts) -> None:
        super().check_options(opts)
        if opts.precision == "fp16" and torch.device(opts.device).type != "cuda":
            raise DMFExportError("fp16 AOTInductor packages are for a GPU: add --device cuda")
        if opts.precision == "bf16":
            check_bf16(torch.device(opts.device).type == "cuda")

    def write_graph(self, job, graph, path, log):
        device = torch.device(job.opts.device)
        module = job.modules[graph].to(device)
        example = _trace.example_inputs(graph, job.opts, job.dtype, device)
        info = job.info(self.name, graph, device=device.type)
        with _trace.quiet():
            # torch 2.11 cannot otherwise prove min(way, h·w·way) == way after the kernel-1
            # matmul (the deferred asserts are what torch.onnx.export passes too)
            program = torch.export.export(module, example, dynamic_shapes=_trace.dynamic_shapes(graph),
                                          prefer_deferred_runtime_asserts_over_guards=True)
            log(f"  compiling the {graph} graph with AOTInductor (a minute or so)")
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path),
                inductor_configs={"aot_inductor.metadata": {METADATA_KEY: info.to_json()}})

    def read_info(self, path: Path) -> ArtifactInfo:
        meta = _package_metadata(path)
        if METADATA_KEY not in meta:
            raise DMFExportError(f"{path}: an AOTInductor package not written by dmf-export")
        info = ArtifactInfo.from_json(meta[METADATA_KEY])
        info.device = meta.get("AOTI_DEVICE_KEY", info.device)
        info.cpu_isa = meta.get("AOTI_CPU_ISA") or None
        return info

    def open(self, path: Path, info: ArtifactInfo, run: RunOptions) -> Runner:
        ops.require()  # the package calls dmf::deform_conv2d through the dispatcher
        device = torch.device(run.device)
        if device.type != (info.device or "cpu"):
            raise DMFExportError(f"{path} is compiled for {info.device}; run it there (--device "
                                 f"{info.device}), or export another package with --device {device.type}")
        if device.type == "cpu" and "AVX512" in (info.cpu_isa or "") \
                and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            raise DMFExportError(f"{path} was compiled for a CPU with AVX-512 and this one has "
                                 f"{torch.backends.cpu.get_cpu_capability()}: export it on this machine")
        partner = split_partner(path, info) if info.graph != "episode" else None

        def load(file, device):
            index = device.index if device.index is not None else -1
            return torch._inductor.aoti_load_package(str(file), device_index=index)

        graphs, context = torch_graphs(load, path, partner, info, run)
        return Runner(path, info, self.name, graphs, context)


FORMAT = AOTInductor()
