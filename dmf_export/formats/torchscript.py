"""TorchScript (``.ts``): ``dmf_export.load_torchscript(path)(support, support_labels, query)``
from Python (or ``torch.jit.load`` after ``import dmf_export`` once the op is built), or from
libtorch C++ after loading the op library (``dmf-export op-library``). Deprecated upstream,
still what libtorch serving loads."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dmf_export import ops
from dmf_export.contract import METADATA_KEY, ArtifactInfo
from dmf_export.errors import DMFExportError
from dmf_export.formats._torch import check_bf16, torch_graphs
from dmf_export.formats.base import Format, Runner, RunOptions, split_partner


def _jit_load(path, **kwargs):
    ops.require()  # the graph calls dmf::deform_conv2d
    with warnings.catch_warnings():  # TorchScript's deprecation notice is not the user's concern
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), **kwargs)


def load_torchscript(path, map_location=None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of a dmf-export TorchScript file, building dmf::deform_conv2d
    first if this machine has not yet."""
    return _jit_load(path, map_location=map_location)


class TorchScript(Format):
    name = "torchscript"
    title = "TorchScript"
    suffix = ".ts"
    read_suffixes = (".ts", ".pt")
    precisions = ("fp32", "fp16",
                  "bf16")
    run_flags = ("cuda_graph", "tf32")
    cpu_batch = 16  # its encoder takes 16 images at a time on a CPU (deploy.Encoder)

    def check_options(self, opts) -> None:
        super().check_options(opts)
        if opts.precision == "bf16":
            check_bf16(on_gpu=False)  # a TorchScript file runs anywhere; bf16 is for a CPU

    def write_graph(self, job, graph, path, log):
        info = job.info(self.name, graph)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(job.modules[graph])
            torch.jit.save(scripted, str(path), _extra_files={METADATA_KEY: info.to_json()})

    def read_info(self, path: Path) -> ArtifactInfo:
        extra = {METADATA_KEY: ""}
        _jit_load(path, map_location="cpu", _extra_files=extra)
        if not extra[METADATA_KEY]:
            raise DMFExportError(f"{path}: not a TorchScript file written by dmf-export")
        return ArtifactInfo.from_json(extra[METADATA_KEY])

    def open(self, path: Path, info: ArtifactInfo, run: RunOptions) -> Runner:
        partner = split_partner(path, info) if info.graph != "episode" else None
        load = lambda file, device: _jit_load(file, map_location=device).eval()  # noqa: E731
        graphs, context = torch_graphs(load, path, partner, info, run)
        return Runner(path, info, self.name, graphs, context)


FORMAT = TorchScript()
