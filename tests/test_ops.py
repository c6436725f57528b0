"""dmf::deform_conv2d: DCNv1 forward (semantics: docs/op.md) on CPU and CUDA.

Ground truth is never the op itself: the independent plain-PyTorch reference
(tests/reference_dcn.py), onnxruntime's DeformConv (opset 19), numbers worked out by hand
from the semantics, and (for the CUDA kernel) the CPU implementation.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dmf_export import _build, ops, toolchain
from dmf_export.errors import DMFExportError
from dmf_export.ops import deform_conv2d
from dmf_export.paths import source_dir
from reference_dcn import deform_conv2d_reference

REPO = Path(__file__).resolve().parent.parent
KERNELS = source_dir("csrc") / "kernels"
build_info = ops.require()  # every test here runs the op


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_case(n=2, c=6, h=7, w=7, o=5, kernel=(3, 3), stride=1, padding=1, dilation=1,
              groups=1, offset_groups=1, offset_scale=2.0, dtype=torch.float64, seed=0):
    """Random input, offsets ~ N(0, 1)*offset_scale and weight, with the op's arguments."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    out_h = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    offset = torch.randn(n, 2 * offset_groups * kh * kw, out_h, out_w, generator=g,
                         dtype=torch.float64) * offset_scale
    weight = torch.randn(o, c // groups, kh, kw, generator=g, dtype=torch.float64)
    args = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups,
                offset_groups=offset_groups)
    return x.to(dtype), offset.to(dtype), weight.to(dtype), args


def reference(x, offset, weight, args):
    """The reference in float64, whatever the inputs' dtype."""
    return deform_conv2d_reference(x.double(), offset.double(), weight.double(), **args)


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (the error relative to the output's scale)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


CONFIGS = {
    "3x3_pad1": dict(),
    "1x1": dict(kernel=(1, 1), padding=0),
    "non_square_input_and_kernel": dict(h=6, w=9, kernel=(2, 3), padding=(0, 1)),
    "stride_2": dict(h=9, w=8, stride=2),
    "stride_per_axis": dict(stride=(2, 1)),
    "dilation_2": dict(h=9, w=9, dilation=2, padding=2),
    "dilation_per_axis": dict(w=10, dilation=(1, 3), padding=(1, 0)),
    "padding_0": dict(padding=0),
    "padding_3": dict(padding=3),
    "groups_2": dict(c=8, o=6, groups=2),
    "depthwise": dict(c=4, o=8, groups=4),
    "offset_groups_3": dict(offset_groups=3),
    "offset_groups_cross_groups": dict(c=8, o=4, groups=2, offset_groups=4),
    "groups_cross_offset_groups": dict(c=8, o=4, groups=4, offset_groups=2),
    "one_pixel_image": dict(h=1, w=1, padding=1),
}


# --- CPU against the reference --------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_cpu_float64_matches_reference(config):
    x, offset, weight, args = make_case(**config)
    out = deform_conv2d(x, offset, weight, **args)
    assert out.dtype == torch.float64
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-12


@pytest.mark.parametrize("out_channels", [16, 64 * 9], ids=["16", "64x9"])
def test_cpu_float32_on_dmf_like_shapes(out_channels):
    x, offset, weight, args = make_case(n=6, c=64, h=11, w=11, o=out_channels,
                                        dtype=torch.float32)
    out = deform_conv2d(x, offset, weight, **args)
    assert out.shape == (6, out_channels, 11, 11) and out.dtype == torch.float32
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-5


def test_offsets_far_outside_the_image_give_exact_zero():
    x, offset, weight, args = make_case()
    offset = torch.where(torch.rand(offset.shape, dtype=torch.float64) < 0.5,
                         torch.full_like(offset, 1e6), torch.full_like(offset, -1e6))
    assert torch.equal(deform_conv2d(x, offset, weight, **args),
                       torch.zeros(2, 5, 7, 7, dtype=torch.float64))


def test_nan_offsets_sample_zero():
    x, offset, weight, args = make_case(kernel=(1, 1), padding=0)
    offset[:, 0] = float("nan")  # dy NaN (dx finite) for every position: every sample is 0
    out = deform_conv2d(x, offset, weight, **args)
    assert torch.equal(out, torch.zeros_like(out))


def test_some_nan_offsets_match_reference():
    x, offset, weight, args = make_case(offset_groups=3)
    offset.view(-1)[::7] = float("nan")
    out = deform_conv2d(x, offset, weight, **args)
    assert not out.isnan().any()
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-12


def test_bilinear_sampling_at_the_border_by_hand():
    # 1x1 kernel, weight 1: each output is one bilinear sample of the 2x3 image.
    image = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]], dtype=torch.float64)
    offset = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    dy, dx = offset[0, 0], offset[0, 1]
    dy[0, 0] = -0.5        # py = -0.5: row -1 is outside, so half of I[0,0]
    dy[0, 1] = -1.0        # py = -1: outside (strict inequality), 0
    dx[0, 2] = 0.25        # px = 2.25: right corner outside: 0.75 * I[0,2]
    dy[1, 0], dx[1, 0] = 0.5, -0.999   # py = 1.5, px = -0.999: only I[1,0] inside
    dx[1, 1] = 1.0         # px = 2: exactly a pixel, I[1,2]
    dx[1, 2] = 1.0         # px = 3 = W: outside, 0
    expected = torch.tensor([[0.5 * 1.0, 0.0, 0.75 * 4.0],
                             [0.5 * 0.001 * 8.0, 32.0, 0.0]], dtype=torch.float64)
    out = deform_conv2d(image.view(1, 1, 2, 3), offset, torch.ones(1, 1, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(out.view(2, 3), expected, rtol=1e-12, atol=1e-12)


def test_zero_offsets_equal_an_ordinary_convolution():
    x, offset, weight, args = make_case(c=8, o=6, groups=2, stride=(2, 1), dilation=(1, 2),
                                        padding=(1, 2))
    expected = torch.nn.functional.conv2d(x, weight, None, args["stride"], args["padding"],
                                          args["dilation"], args["groups"])
    out = deform_conv2d(x, torch.zeros_like(offset), weight, **args)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    x, offset, weight, args = make_case()
    out = deform_conv2d(x.contiguous(memory_format=torch.channels_last),
                        offset.transpose(2, 3).contiguous().transpose(2, 3),
                        weight.transpose(0, 1).contiguous().transpose(0, 1), **args)
    assert out.is_contiguous()
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-12


def test_many_uneven_chunks_match_reference(monkeypatch):
    # a tiny column budget forces one or two samples per chunk (and a short last chunk)
    monkeypatch.setenv("DMF_EXPORT_CPU_CHUNK_MB", "0.02")
    x, offset, weight, args = make_case(n=7, c=8, h=9, w=9, o=5)
    out = deform_conv2d(x, offset, weight, **args)
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-12


def test_taps_split_into_passes_match_reference(monkeypatch):
    # a budget below one sample's columns: one tap per pass, products summed over passes
    monkeypatch.setenv("DMF_EXPORT_CPU_CHUNK_MB", "0.002")
    x, offset, weight, args = make_case(n=3, c=8, h=6, w=5, o=6, groups=2, offset_groups=4,
                                        kernel=(3, 2))
    out = deform_conv2d(x, offset, weight, **args)
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-12


def test_batch_of_several_chunks_matches_reference():
    x, offset, weight, args = make_case(n=37, c=8, h=6, w=5, o=6, groups=2, offset_groups=4)
    out = deform_conv2d(x, offset, weight, **args)
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-12


def test_empty_batch_gives_empty_output():
    x, offset, weight, args = make_case(n=0)
    assert deform_conv2d(x, offset, weight, **args).shape == (0, 5, 7, 7)


def test_wrapper_takes_ints_or_pairs():
    x, offset, weight, _ = make_case(h=8, w=8, stride=2, padding=1, dilation=1)
    expected = deform_conv2d_reference(x, offset, weight, 2, 1, 1)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, 2, 1, 1), expected)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, [2, 2], (1, 1), (1, 1)), expected)
    with pytest.raises(DMFExportError, match="stride must be an int or a pair"):
        deform_conv2d(x, offset, weight, stride=(1, 1, 1))


# --- against onnxruntime DeformConv (opset 19) ----------------------------------------

def onnxruntime_deform_conv(x, offset, weight, args):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    (ph, pw) = args["padding"]
    node = helper.make_node(
        "DeformConv", ["X", "W", "offset"], ["Y"], kernel_shape=list(weight.shape[2:]),
        strides=list(args["stride"]), pads=[ph, pw, ph, pw], dilations=list(args["dilation"]),
        group=args["groups"], offset_group=args["offset_groups"])
    graph = helper.make_graph(
        [node], "deform_conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("X", "W", "offset")],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    # IR 9 is opset 19's; onnx's default (the newest IR) is more than onnxruntime < 1.32 reads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"X": x.float().numpy(), "W": weight.float().numpy(), "offset": offset.float().numpy()}
    return torch.from_numpy(session.run(None, feeds)[0])


ORT_CONFIGS = {k: CONFIGS[k] for k in ("3x3_pad1", "1x1", "non_square_input_and_kernel",
                                       "stride_per_axis", "dilation_per_axis", "groups_2",
                                       "offset_groups_cross_groups", "depthwise")}
ORT_CONFIGS["dmf_like_64x9"] = dict(n=3, c=64, h=11, w=11, o=64 * 9)


@pytest.mark.parametrize("config", ORT_CONFIGS.values(), ids=ORT_CONFIGS.keys())
def test_cpu_float32_matches_onnxruntime(config):
    x, offset, weight, args = make_case(**config, dtype=torch.float32)
    expected = onnxruntime_deform_conv(x, offset, weight, args)
    assert relative_error(deform_conv2d(x, offset, weight, **args), expected) < 1e-5


def test_far_and_nan_offsets_match_onnxruntime():
    x, offset, weight, args = make_case(c=8, o=6, groups=2, offset_groups=2, dtype=torch.float32)
    offset.view(-1)[::5] = float("nan")
    offset.view(-1)[::13] = 1e4
    offset.view(-1)[::17] = -1e4
    expected = onnxruntime_deform_conv(x, offset, weight, args)
    assert relative_error(deform_conv2d(x, offset, weight, **args), expected) < 1e-5


def onnxruntime_deform_conv_in_zero_border(x, offset, weight, args, border=2):
    """onnxruntime's DeformConv of `x`, computed on `x` framed by `border` zero pixels with
    the offsets moved by `border`: every corner outside `x` lands on a zero of the frame
    (or outside the frame, where onnxruntime 1.32 reads the frame's pixel 0, a zero, with
    weight 0). So this is the DCNv1 answer even where `x` holds Inf/NaN at its pixel 0,
    which onnxruntime 1.32 itself multiplies by 0 for every outside corner."""
    n, c, h, w = x.shape
    framed = torch.zeros(n, c, h + 2 * border, w + 2 * border, dtype=x.dtype)
    framed[:, :, border:border + h, border:border + w] = x
    (sh, sw), (ph, pw), (dh, dw) = args["stride"], args["padding"], args["dilation"]
    kh, kw = weight.shape[2:]
    out_h = (h + 2 * border + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (w + 2 * border + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    moved = torch.zeros(n, offset.shape[1], out_h, out_w, dtype=offset.dtype)
    moved[:, :, :offset.shape[2], :offset.shape[3]] = offset + border
    out = onnxruntime_deform_conv(framed, moved, weight, args)
    return out[:, :, :offset.shape[2], :offset.shape[3]]


NON_FINITE_PIXELS = {  # (value, pixels (y, x) set to it in every image and channel)
    "inf_at_pixel_0": (float("inf"), [(0, 0)]),
    "nan_at_pixel_0": (float("nan"), [(0, 0)]),
    "minus_inf_at_pixel_0_and_inside": (float("-inf"), [(0, 0), (3, 4)]),
    "nan_at_the_border": (float("nan"), [(0, 0), (6, 6), (0, 5)]),
}


def non_finite_case(value, pixels, **config):
    x, offset, weight, args = make_case(**config, offset_scale=3.0, dtype=torch.float32)
    for y, x_ in pixels:
        x[:, :, y, x_] = value
    offset.view(-1)[::13] = 40.0  # whole samples outside the image
    return x, offset, weight, args


@pytest.mark.parametrize("value,pixels", NON_FINITE_PIXELS.values(), ids=NON_FINITE_PIXELS.keys())
def test_non_finite_pixels_stay_where_dcnv1_reads_them(value, pixels):
    # a corner outside the image is 0, whatever pixel 0 holds: the pixel leaks only into the
    # samples whose bilinear support contains it
    x, offset, weight, args = non_finite_case(value, pixels, c=4, o=3, offset_groups=2)
    out = deform_conv2d(x, offset, weight, **args)
    expected = onnxruntime_deform_conv_in_zero_border(x, offset, weight, args)
    assert 0.2 < expected.isfinite().float().mean() < 0.95  # both kinds of outputs occur
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.double(), reference(x, offset, weight, args),
                               rtol=1e-5, atol=1e-5, equal_nan=True)
    # onnxruntime on the unframed image: finite only where no sample touches pixel 0
    # (1.32 weights it 0 and multiplies); wherever it is finite, so are we, equal
    direct = onnxruntime_deform_conv(x, offset, weight, args)
    finite = direct.isfinite()
    assert out[finite].isfinite().all()
    torch.testing.assert_close(out[finite], direct[finite], rtol=1e-5, atol=1e-5)


def test_inf_at_pixel_0_by_hand():
    # 1x1 kernel, weight 1 on a 2x2 image whose pixel 0 is Inf: a sample at (0.5, 1.5) has
    # its right corners outside (0) and its left ones I[0,1], I[1,1] inside, a quarter each
    image = torch.tensor([[float("inf"), 2.0], [4.0, 8.0]], dtype=torch.float64)
    offset = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    offset[0, 0, 0, 1], offset[0, 1, 0, 1] = 0.5, 0.5   # (0, 1) -> (0.5, 1.5)
    offset[0, 0, 1, 1], offset[0, 1, 1, 1] = 5.0, 0.0   # (1, 1) -> (6, 1): outside, 0
    offset[0, 0, 1, 0], offset[0, 1, 1, 0] = -0.5, 0.0  # (1, 0) -> (0.5, 0): reads the Inf
    out = deform_conv2d(image.view(1, 1, 2, 2), offset,
                        torch.ones(1, 1, 1, 1, dtype=torch.float64)).view(2, 2)
    assert out[0, 0] == float("inf")                    # the Inf pixel itself
    assert out[0, 1] == 0.25 * 2.0 + 0.25 * 8.0
    assert out[1, 1] == 0.0
    assert out[1, 0] == float("inf")


# --- errors ----------------------------------------------------------------------------

def _bad(**changes):
    x, offset, weight, args = make_case(c=8, o=6)
    case = dict(x=x, offset=offset, weight=weight, **args)
    case.update(changes)
    return case


BAD_ARGUMENTS = {
    "offset_channels": (_bad(offset=torch.zeros(2, 16, 7, 7, dtype=torch.float64)),
                        r"offset must have shape \[N, 2\*offset_groups\*kh\*kw, out_h, out_w\]"),
    "offset_spatial": (_bad(offset=torch.zeros(2, 18, 6, 7, dtype=torch.float64)),
                       "offset must have shape"),
    "offset_batch": (_bad(offset=torch.zeros(3, 18, 7, 7, dtype=torch.float64)),
                     r"offset batch \(3\) must equal the input batch \(2\) or be a multiple"),
    "weight_channels": (_bad(weight=torch.zeros(6, 5, 3, 3, dtype=torch.float64)),
                        "input channels per group"),
    "groups_not_dividing": (_bad(groups=3), "groups=3 must divide"),
    "offset_groups_not_dividing": (_bad(offset_groups=3), "offset_groups=3 must divide"),
    "input_3d": (_bad(x=torch.zeros(8, 7, 7, dtype=torch.float64)), r"input must be \[N, C, H, W\]"),
    "dtypes_differ": (_bad(weight=torch.zeros(6, 8, 3, 3)), "must have one dtype"),
    "image_too_small": (_bad(x=torch.zeros(2, 8, 1, 1, dtype=torch.float64), padding=(0, 0)),
                        "smaller than the dilated kernel"),
    "stride_zero": (_bad(stride=(0, 1)), "stride must be positive"),
    "negative_padding": (_bad(padding=(-1, 1)), "padding must be non-negative"),
    "integer_dtype": (_bad(x=torch.zeros(2, 8, 7, 7, dtype=torch.int64),
                           offset=torch.zeros(2, 18, 7, 7, dtype=torch.int64),
                           weight=torch.zeros(6, 8, 3, 3, dtype=torch.int64)),
                      "supports float32 and float64"),
}


@pytest.mark.parametrize("case,message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_a_clear_error(case, message):
    with pytest.raises(RuntimeError, match=f"dmf::deform_conv2d.*{message}"):
        deform_conv2d(case.pop("x"), case.pop("offset"), case.pop("weight"), **case)


def test_backward_raises_forward_only_error():
    x, offset, weight, args = make_case()
    weight.requires_grad_(True)
    out = deform_conv2d(x, offset, weight, **args)
    assert out.requires_grad
    with pytest.raises(DMFExportError, match="forward-only .* no gradient"):
        out.sum().backward()


@pytest.mark.skipif(build_info.with_cuda, reason="only a CPU-only build lacks the CUDA kernel")
def test_cpu_only_build_names_why_cuda_is_missing():
    # A CPU-only torch cannot make CUDA tensors: dispatch the op through its CUDA key (what
    # a CUDA tensor would reach) to show that the key holds the explaining kernel.
    x, offset, weight, args = make_case()
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(DMFExportError, match=r"built without CUDA \(.+\)"):
        torch.ops.dmf.deform_conv2d.default.redispatch(
            cuda_only, x, offset, weight, *(list(args[k]) for k in ("stride", "padding", "dilation")),
            args["groups"], args["offset_groups"])


# --- PyTorch integration ---------------------------------------------------------------

def test_opcheck_forward():
    # Forward-only op: no input requires grad, so test_aot_dispatch_dynamic checks the
    # forward under AOT tracing with dynamic shapes and does not try the (refused) backward.
    x, offset, weight, args = make_case(n=3, c=4, h=6, w=5, o=4, groups=2, offset_groups=2,
                                        dtype=torch.float32)
    torch.library.opcheck(torch.ops.dmf.deform_conv2d.default,
                          (x, offset, weight, list(args["stride"]), list(args["padding"]),
                           list(args["dilation"]), args["groups"], args["offset_groups"]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_autograd_registration():
    # With grad-requiring inputs: checks an autograd kernel is registered (ours refuses).
    x, offset, weight, args = make_case(n=2, c=4, h=5, w=5, o=3, dtype=torch.float32)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.dmf.deform_conv2d.default,
                          (x, offset, weight, [1, 1], [1, 1], [1, 1], 1, 1),
                          test_utils=("test_schema", "test_autograd_registration"))


class MetaFilter(torch.nn.Module):
    """The way DMF uses the op: 3x3, pad 1, weight a parameter."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, features, offsets):
        return deform_conv2d(features, offsets, self.weight, 1, padding=(1, 1))


def test_torch_export_with_dynamic_batch():
    x, offset, weight, args = make_case(n=3, c=4, o=6, dtype=torch.float32)
    batch = torch.export.Dim("batch")
    program = torch.export.export(MetaFilter(weight), (x, offset),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    x5, offset5, _, _ = make_case(n=5, c=4, o=6, dtype=torch.float32, seed=1)
    with torch.no_grad():
        out = program.module()(x5, offset5)
    assert relative_error(out, reference(x5, offset5, weight, args)) < 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated")
def test_torchscript_module_loads_in_a_fresh_process(tmp_path):
    x, offset, weight, args = make_case(n=2, c=4, o=6, dtype=torch.float32)
    torch.jit.script(MetaFilter(weight)).save(str(tmp_path / "scripted.pt"))
    torch.jit.trace(MetaFilter(weight), (x, offset)).save(str(tmp_path / "traced.pt"))
    torch.save((x, offset), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import dmf_export
        x, offset = torch.load({str(tmp_path / 'inputs.pt')!r})
        for name in ("scripted", "traced"):
            module = torch.jit.load({str(tmp_path)!r} + f"/{{name}}.pt")
            torch.save(module(x, offset).detach(), {str(tmp_path)!r} + f"/{{name}}_out.pt")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    expected = reference(x, offset, weight, args)
    for name in ("scripted", "traced"):
        assert relative_error(torch.load(tmp_path / f"{name}_out.pt"), expected) < 1e-5


# --- build -----------------------------------------------------------------------------

def test_build_key_changes_with_torch_and_sources(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(source_dir("csrc"), csrc)
    every = lambda: _build._sources(csrc, False)[1]  # noqa: E731
    key = _build._build_key(csrc, every(), None, [])
    cuda = toolchain.CudaToolkit(tmp_path / "cuda", "13.0")
    assert _build._build_key(csrc, every(), cuda, []) != key
    assert _build._build_key(csrc, every(), cuda, ["-gencode=arch=compute_90,code=sm_90"]) \
        != _build._build_key(csrc, every(), cuda, [])
    sampler = csrc / "kernels" / "deform_sampler.h"
    sampler.write_text(sampler.read_text() + "\n// changed\n")
    changed_source = _build._build_key(csrc, every(), None, [])
    assert changed_source != key
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert _build._build_key(csrc, every(), None, []) not in (key, changed_source)


def test_a_library_is_loaded_at_import_only_when_built_for_this_torch(tmp_path, monkeypatch):
    with monkeypatch.context() as empty:
        empty.setenv("DMF_EXPORT_CACHE", str(tmp_path))
        assert _build.load_built() is None and list(tmp_path.iterdir()) == []  # nothing compiled
    assert _build.load_built() == build_info  # the one this session built
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert _build.load_built() is None


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DMF_EXPORT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(DMFExportError, match="no C\\+\\+ compiler found"):
        _build.load()


def broadcast_case(images, samples, **config):
    """A case whose input holds `images` images for `samples` offset sets, and the same case
    with sample n's image (n % images) copied out, for the reference."""
    x, offset, weight, args = make_case(n=samples, **config)
    x = x[:images].clone()
    return x, offset, weight, args, x.repeat(samples // images, 1, 1, 1)


BROADCAST_CONFIGS = {  # (images, samples, make_case arguments)
    "3x3": (2, 6, dict(c=6, o=5)),
    "dmf_weight_first": (3, 12, dict(c=9 * 4, h=5, w=5, o=4, kernel=(1, 1), padding=0,
                                    offset_groups=9)),
    "one_image": (1, 5, dict(c=8, o=4, groups=2, offset_groups=4)),
}


@pytest.mark.parametrize("config", BROADCAST_CONFIGS.values(), ids=BROADCAST_CONFIGS.keys())
def test_an_input_image_serves_every_sample_n_with_n_mod_images(config):
    images, samples, case = config
    x, offset, weight, args, per_sample = broadcast_case(images, samples, **case)
    out = deform_conv2d(x, offset, weight, **args)
    assert out.shape[0] == samples
    assert relative_error(out, reference(per_sample, offset, weight, args)) < 1e-12


def test_broadcast_input_across_uneven_chunks(monkeypatch):
    # chunks of one or two samples start at every residue of n mod 3
    monkeypatch.setenv("DMF_EXPORT_CPU_CHUNK_MB", "0.02")
    x, offset, weight, args, per_sample = broadcast_case(3, 21, c=8, h=9, w=9, o=5)
    out = deform_conv2d(x, offset, weight, **args)
    assert relative_error(out, reference(per_sample, offset, weight, args)) < 1e-12


# --- CUDA ------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_cuda_float64_matches_reference(config):
    x, offset, weight, args = make_case(**config)
    out = deform_conv2d(x.cuda(), offset.cuda(), weight.cuda(), **args)
    assert out.is_cuda and out.dtype == torch.float64
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-12


@pytest.mark.cuda
@pytest.mark.parametrize("out_channels", [16, 64 * 9, 70], ids=["16", "64x9", "70"])
def test_cuda_float32_matches_cpu_op(out_channels):
    x, offset, weight, args = make_case(n=6, c=64, h=11, w=11, o=out_channels,
                                        dtype=torch.float32)
    offset.view(-1)[::23] = float("nan")
    offset.view(-1)[::29] = 1e4
    expected = deform_conv2d(x, offset, weight, **args)
    out = deform_conv2d(x.cuda(), offset.cuda(), weight.cuda(), **args)
    assert relative_error(out, expected) < 1e-5
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-5


@pytest.mark.cuda
def test_cuda_float16_matches_cpu_op():
    x, offset, weight, args = make_case(n=6, c=64, h=11, w=11, o=64 * 9, dtype=torch.float16)
    expected = deform_conv2d(x.float(), offset.float(), weight.float(), **args)
    out = deform_conv2d(x.cuda(), offset.cuda(), weight.cuda(), **args)
    assert out.dtype == torch.float16
    assert relative_error(out, expected) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("config", BROADCAST_CONFIGS.values(), ids=BROADCAST_CONFIGS.keys())
def test_cuda_broadcast_input_matches_reference(config):
    images, samples, case = config
    x, offset, weight, args, per_sample = broadcast_case(images, samples, **case)
    out = deform_conv2d(x.cuda(), offset.cuda(), weight.cuda(), **args)
    assert relative_error(out, reference(per_sample, offset, weight, args)) < 1e-12


@pytest.mark.cuda
def test_cuda_empty_batch_and_non_contiguous():
    x, offset, weight, args = make_case(n=0, dtype=torch.float32)
    assert deform_conv2d(x.cuda(), offset.cuda(), weight.cuda(), **args).shape == (0, 5, 7, 7)
    x, offset, weight, args = make_case(dtype=torch.float32)
    out = deform_conv2d(x.cuda().contiguous(memory_format=torch.channels_last), offset.cuda(),
                        weight.cuda(), **args)
    assert relative_error(out, reference(x, offset, weight, args)) < 1e-5


def _cuda_home():
    cuda = toolchain.find_cuda()
    return cuda.home if cuda else None


@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit (nvcc) found")
def test_cuda_kernel_compiles_standalone_with_nvcc(tmp_path):
    # The launcher must build without PyTorch headers: the TensorRT plugin compiles it too.
    nvcc = str(Path(_cuda_home()) / "bin" / "nvcc")
    subprocess.run([nvcc, "-std=c++17", "-O3", "-c", str(KERNELS / "deform_conv_cuda.cu"),
                    "-gencode=arch=compute_80,code=sm_80", "-Werror=all-warnings",
                    "-o", str(tmp_path / "deform_conv_cuda.o")], check=True, timeout=300)


# The CUDA kernel's source, run on the CPU by the stand-in CUDA headers in
# tests/cpp/cuda_emulation/ (see cuda_runtime.h there).
EMULATION = Path(__file__).resolve().parent / "cpp" / "cuda_emulation"


@pytest.fixture(scope="module")
def emulated_cuda_kernel(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the CPU emulation of the CUDA kernel")
    folder = tmp_path_factory.mktemp("cuda_emulation")
    source, launches = re.subn(
        r"([\w:]+<\w+>)\s*<<<([^,]+),([^,]+),[^>]*>>>\s*\(([^;]*)\);",
        r"::emu::launch(\2, \3, [&] { \1(\4); });", (KERNELS / "deform_conv_cuda.cu").read_text())
    assert launches == 1, "expected exactly one kernel launch in deform_conv_cuda.cu"
    (folder / "deform_conv_cuda_emulated.inc").write_text(source)
    library = folder / "kernel.so"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-D__CUDACC__",
         f"-I{EMULATION}", f"-I{folder}", f"-I{KERNELS}", str(EMULATION / "emulated_forward.cpp"),
         "-o", str(library)],
        capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and ("barrier" in build.stderr or "_Float16" in build.stderr):
        pytest.skip("g++ lacks C++20 <barrier> or _Float16")
    assert build.returncode == 0, build.stderr[-3000:]
    return ctypes.CDLL(str(library))


EMULATION_CONFIGS = {
    "tails_of_every_tile": dict(n=2, c=40, h=6, w=7, o=70),  # 84 positions, 70 channels, 40 = 2.5 slices
    "groups_cross_offset_groups": dict(c=8, o=4, groups=4, offset_groups=2, kernel=(3, 2),
                                       stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    "offset_groups_cross_groups": dict(n=1, c=34, h=5, w=5, o=140, kernel=(2, 2), padding=0,
                                       groups=2, offset_groups=1),
    "1x1_offset_groups": dict(n=3, c=12, h=5, w=6, o=9, kernel=(1, 1), padding=0, groups=3,
                              offset_groups=2),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("config", EMULATION_CONFIGS.values(), ids=EMULATION_CONFIGS.keys())
def test_cuda_kernel_source_under_cpu_emulation_matches_reference(emulated_cuda_kernel, config,
                                                                  dtype):
    x, offset, weight, args = make_case(**config, offset_scale=3.0, dtype=dtype)
    offset.view(-1)[::7] = float("nan")
    offset.view(-1)[::11] = 50.0
    n, _, _, _ = x.shape
    out_shape = (n, weight.shape[0], offset.shape[2], offset.shape[3])
    output = torch.full(out_shape, float("nan"), dtype=dtype)  # catches unwritten outputs
    status = run_emulated(emulated_cuda_kernel, x, offset, weight, output, args, input_batch=0)
    assert status == 0
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3}[dtype]
    assert relative_error(output, reference(x, offset, weight, args)) < tolerance


@pytest.mark.parametrize("value,pixels", NON_FINITE_PIXELS.values(), ids=NON_FINITE_PIXELS.keys())
def test_cuda_kernel_source_under_cpu_emulation_keeps_non_finite_pixels_local(
        emulated_cuda_kernel, value, pixels):
    x, offset, weight, args = non_finite_case(value, pixels, n=2, c=20, o=70, offset_groups=2)
    output = torch.zeros(2, 70, 7, 7)
    assert run_emulated(emulated_cuda_kernel, x, offset, weight, output, args, input_batch=0) == 0
    expected = reference(x, offset, weight, args)
    assert 0.2 < expected.isfinite().double().mean() < 0.95
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-4, equal_nan=True)


def run_emulated(kernel, x, offset, weight, output, args, input_batch):
    sizes = torch.tensor([offset.shape[0], *x.shape[1:], weight.shape[0], *weight.shape[2:],
                          *args["stride"], *args["padding"], *args["dilation"], args["groups"],
                          args["offset_groups"], input_batch], dtype=torch.int64)
    code = {torch.float32: 0, torch.float64: 1, torch.float16: 2}[x.dtype]
    return kernel.emulated_forward(
        code, *(ctypes.c_void_p(t.data_ptr()) for t in (x, offset, weight, output, sizes)))


@pytest.mark.parametrize("config", BROADCAST_CONFIGS.values(), ids=BROADCAST_CONFIGS.keys())
def test_cuda_kernel_source_under_cpu_emulation_broadcasts_the_input(emulated_cuda_kernel, config):
    images, samples, case = config
    x, offset, weight, args, per_sample = broadcast_case(images, samples, **case)
    output = torch.full((samples, weight.shape[0], *offset.shape[2:]), float("nan"),
                        dtype=torch.float64)
    assert run_emulated(emulated_cuda_kernel, x, offset, weight, output, args, images) == 0
    assert relative_error(output, reference(per_sample, offset, weight, args)) < 1e-12
    # a batch that the images do not divide is refused, as by the PyTorch op
    assert run_emulated(emulated_cuda_kernel, x, offset, weight, output, args, samples + 1) != 0
