"""Running torch-based artifacts (TorchScript, AOTInductor) on a device: the one device
check, IEEE fp32 on GPUs, and CUDA-graph replay."""
from __future__ import annotations

import contextlib

import torch

from dmf_export.contract import ArtifactInfo
from dmf_export.cpu import bf16_unavailable
from dmf_export.errors import DMFExportError


def check_device(device: str, cuda_graph: bool = False, path=None,
                 info: ArtifactInfo | None = None) -> None:
    """Refuse in one line what ``device`` cannot run: CUDA graphs or a GPU this torch does
    not see, and (given a torch-based artifact's ``info``) an fp16 graph off the GPU, a
    bf16 graph on a GPU or on a CPU without bf16 instructions (``check_bf16``).
    Called before loading, and by bench before minutes of timing."""
    try:
        on_gpu = torch.device(device).type == "cuda"
    except RuntimeError as err:
        raise DMFExportError(f"unknown device {device!r} (cpu, cuda, cuda:1, …)") from err
    if info is not None and info.precision == "fp16" and not on_gpu:
        raise DMFExportError(f"{path} is an fp16 {info.format} graph: run it on a GPU (--device cuda)")
    if info is not None and info.precision == "bf16":
        check_bf16(on_gpu, path)
    if cuda_graph and not on_gpu:
        raise DMFExportError("CUDA graphs need a GPU (--device cuda)")
    if on_gpu and not torch.cuda.is_available():
        raise DMFExportError(f"device {device!r}: this torch sees no CUDA GPU")


def check_bf16(on_gpu: bool, artifact=None) -> None:
    """Refuse bf16 (export or run) in one line on a GPU, or on a CPU without AMX or
    AVX-512-BF16. A GPU would run the graph, but fp16 is its reduced precision (and what
    TensorRT builds); on a CPU without the instructions oneDNN emulates bf16, slower than
    fp32, so the artifact would only lose accuracy. ``artifact``: the path a run opens."""
    where = f"{artifact}: " if artifact is not None else ""
    if on_gpu:
        raise DMFExportError(f"{where}bf16 artifacts are for CPUs (AMX, AVX-512-BF16); on a GPU use fp16")
    reason = bf16_unavailable()
    if reason:
        raise DMFExportError(where + reason)


class CudaGraphs:
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


class ExactFloat32:
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


def torch_graphs(load, path, partner, info: ArtifactInfo, run) -> tuple[dict, object]:
    """({graph: fn}, context) for a torch-based artifact: each fn moves and casts its
    inputs to the run's device and the artifact's dtype; ``run.cuda_graph`` replays each
    graph from a CUDA graph; the context keeps fp32 exact on a GPU unless ``run.tf32``."""
    device = torch.device(run.device)
    check_device(run.device, run.cuda_graph, path, info)
    dtype = torch.float16 if info.precision == "fp16" else torch.float32
    files = {"episode": path} if info.graph == "episode" else {"encoder": path, "head": partner}
    graphs = {}
    for graph, file in files.items():
        module = load(file, device)
        if run.cuda_graph:
            module = CudaGraphs(module)
        graphs[graph] = (lambda m: lambda *args: m(*(a.to(device, dtype) for a in args)))(module)
    exact = device.type == "cuda" and dtype == torch.float32 and not run.tf32
    return graphs, (ExactFloat32 if exact else contextlib.nullcontext)
