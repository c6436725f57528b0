"""``dmf::deform_conv2d``: DCNv1 deformable convolution (forward only) as a PyTorch op.

The op lives in a C++/CUDA library built from ``csrc/`` (``_build``). ``require()`` loads
it, building it first when the cache holds none for this torch and these sources (about
a minute, announced in one line on stderr), and registers what PyTorch needs around it: a
fake (meta) kernel so ``torch.export`` and the ONNX exporter can trace it with symbolic
sizes, an autograd formula that refuses to differentiate, and a CUDA kernel that says why
a build has none. Everything that runs the op calls it first (the eager model's
``DeformConv2d``, the TorchScript and AOTInductor runners, ``dmf-export op-library``).

Importing this module only loads a library that is already built, never compiles: so
``import dmf_export`` stays cheap for commands that never run the op, and a TorchScript
file still loads with ``torch.jit.load`` after it once the op was built.
Semantics: ``docs/op.md``.
"""
from __future__ import annotations

import threading
from typing import List, Tuple, Union

import torch
from torch import Tensor

from dmf_export import _build
from dmf_export.errors import DMFExportError

__all__ = ["deform_conv2d", "require"]

IntPair = Union[int, Tuple[int, int], List[int]]


def _pair(value: IntPair, name: str) -> List[int]:
    # written so that TorchScript compiles it too (modules that call deform_conv2d script)
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, list):
        values = [int(v) for v in value]
    else:
        values = [int(value[0]), int(value[1])] if len(value) == 2 else [0]
    if len(values) != 2:
        raise DMFExportError("deform_conv2d: " + name + " must be an int or a pair")
    return values


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                  offset_groups: int = 1) -> Tensor:
    """DCNv1 deformable convolution without bias or mask.

    input ``[N, C, H, W]``, offset ``[N, 2*offset_groups*kh*kw, out_h, out_w]`` ((dy, dx)
    per kernel tap, taps in row-major order), weight ``[O, C/groups, kh, kw]`` →
    ``[N, O, out_h, out_w]``. CPU (float32, float64) and CUDA (float32, float16, float64).
    The input may also hold fewer images, ``N_in`` dividing N: sample n then reads image
    ``n % N_in`` (one image, many offset sets, no copy per sample). ONNX exports expand it.
    Builds the op's library on first use.
    """
    if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
        require()  # a flag check once loaded; TorchScript and the tracers skip it
    return torch.ops.dmf.deform_conv2d(input, offset, weight, _pair(stride, "stride"),
                                       _pair(padding, "padding"), _pair(dilation, "dilation"),
                                       int(groups), int(offset_groups))


def _deform_conv2d_fake(input, offset, weight, stride, padding, dilation, groups, offset_groups):
    torch._check(input.dim() == 4 and offset.dim() == 4 and weight.dim() == 4,
                 lambda: "dmf::deform_conv2d: input, offset and weight must be 4-D")
    _, channels, height, width = input.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    torch._check(group_channels * groups == channels,
                 lambda: f"dmf::deform_conv2d: weight {tuple(weight.shape)} does not fit "
                         f"{channels} input channels in {groups} groups")
    out_h = (height + 2 * padding[0] - (dilation[0] * (kernel_h - 1) + 1)) // stride[0] + 1
    out_w = (width + 2 * padding[1] - (dilation[1] * (kernel_w - 1) + 1)) // stride[1] + 1
    torch._check(offset.shape[1] == 2 * offset_groups * kernel_h * kernel_w,
                 lambda: f"dmf::deform_conv2d: offset has {offset.shape[1]} channels, expected "
                         f"2*offset_groups*kh*kw = {2 * offset_groups * kernel_h * kernel_w}")
    # N_in dividing the offsets' batch is the kernels' check; here it would only add guards
    return input.new_empty((offset.shape[0], out_channels, out_h, out_w))


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_output):
    raise DMFExportError("dmf::deform_conv2d is forward-only (inference export); no gradient")


def _register(info: _build.BuildInfo) -> _build.BuildInfo:
    """What PyTorch needs around the op the library just defined (once per process)."""
    torch.library.register_fake("dmf::deform_conv2d", _deform_conv2d_fake)
    torch.library.register_autograd("dmf::deform_conv2d", _backward, setup_context=_setup_context)
    if not info.with_cuda:
        def missing_cuda(input, offset, weight, stride, padding, dilation, groups, offset_groups):
            raise DMFExportError(f"dmf::deform_conv2d was built without CUDA ({info.without_cuda_reason})")

        # A clear message instead of the dispatcher's "could not run with the CUDA backend".
        torch.library.register_kernel("dmf::deform_conv2d", "cuda", missing_cuda)
    return info


_lock = threading.Lock()  # two threads' first use must not register twice
_info: _build.BuildInfo | None = None


def require() -> _build.BuildInfo:
    """Make ``torch.ops.dmf.deform_conv2d`` usable in this process, building the library
    first if needed; what was built (the library's path, whether it has CUDA kernels)."""
    global _info
    with _lock:
        if _info is None:
            _info = _register(_build.load())
    return _info


_built = _build.load_built()  # an existing build only: importing never compiles
if _built is not None:
    _info = _register(_built)
