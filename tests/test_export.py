"""Exported artifacts compute what the eager original computes, in every format.

Every registered format (``dmf_export.formats``) that runs on this machine is exported
once per configuration (session fixtures) and run at episode sizes other than the
export-time one, one-way episodes included; a format added to the registry is tested
here with no new test. The eager model is the reference here; it is itself checked
against an independent rendering of the original in test_model.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import EXPORT_IMAGE as IMAGE  # the `exported` fixture's image size

from dmf_export import formats
from dmf_export.contract import EpisodeSize, make_episode
from dmf_export.formats import open_artifact

CONFIGS = [(64, 1), (640, 1), (64, 3)]
SIZES = [EpisodeSize(5, 1, 4), EpisodeSize(5, 5, 3), EpisodeSize(3, 1, 2),
         EpisodeSize(10, 1, 2), EpisodeSize(4, 2, 1), EpisodeSize(1, 2, 2), EpisodeSize(1, 1, 1)]


def _format_param(fmt, graph="episode"):
    reason = fmt.unavailable()
    marks = [pytest.mark.skip(reason=f"{fmt.name}: {reason}")] if reason else []
    return pytest.param(fmt.name, marks=marks, id=fmt.name)


EPISODE_FORMATS = [_format_param(f) for f in formats.all_formats()]
# a Triton repository holds every graph in one folder, not a file per graph
SPLIT_FORMATS = [_format_param(f) for f in formats.all_formats() if "split" in f.graphs and f.name != "triton"]


def assert_matches_eager(runner, model, sizes=SIZES, tol=1e-4, dtype=torch.float32):
    for i, size in enumerate(sizes):
        support, labels, query = make_episode(size, IMAGE, seed=100 + i)
        with torch.inference_mode():
            expected = model(support, labels, query)
        scores = runner(support.to(dtype), labels.to(dtype), query.to(dtype)).float().cpu()
        assert scores.shape == (size.queries, size.way), size
        torch.testing.assert_close(scores, expected, rtol=tol, atol=tol, msg=lambda m: f"{size}: {m}")
        assert torch.equal(scores.argmax(1), expected.argmax(1)), size


@pytest.mark.parametrize("groups,kernel", CONFIGS)
@pytest.mark.parametrize("fmt", EPISODE_FORMATS)
def test_episode_artifact_matches_eager_at_sizes_other_than_the_export_size(exported, eager, fmt, groups, kernel):
    checkpoint, (path,) = exported(groups, kernel, fmt)
    runner = open_artifact(path)
    try:
        assert runner.info.format == fmt and runner.info.graph == "episode"
        assert_matches_eager(runner, eager(checkpoint))
    finally:
        runner.close()


@pytest.mark.parametrize("fmt", SPLIT_FORMATS)
def test_split_encoder_and_head_match_eager(exported, eager, fmt):
    checkpoint, paths = exported(64, 3, fmt, graph="split")
    assert [p.name.split(".")[-2] for p in paths] == ["encoder", "head"]
    assert_matches_eager(open_artifact(paths[0]), eager(checkpoint), SIZES[:3] + SIZES[-1:])


def test_split_encoder_gives_backbone_features(exported, eager):
    checkpoint, paths = exported(64, 1, "onnx", graph="split")
    import onnxruntime as ort

    images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    features = ort.InferenceSession(str(paths[0])).run(None, {"images": images.numpy()})[0]
    with torch.inference_mode():
        expected = eager(checkpoint).base(images)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_standard_onnx_uses_only_standard_ops_with_named_dynamic_axes(exported):
    _, (path,) = exported(64, 1, "onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert "DeformConv" in {node.op_type for node in model.graph.node}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"support": ["S", 3, IMAGE, IMAGE], "support_labels": ["S", "way"],
                    "query": ["Q", 3, IMAGE, IMAGE]}
    assert [o.name for o in model.graph.output] == ["scores"]
    out = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out == ["Q", "way"]


def test_plugin_flavour_writes_the_plugin_node_instead_of_deformconv(exported):
    from dmf_export.tensorrt.plugin import ONNX_DOMAIN, PLUGIN_NAME

    _, (path,) = exported(64, 3, "onnx", onnx_flavor="plugin")
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_NAME]
    assert len(nodes) == 1 and "DeformConv" not in {n.op_type for n in model.graph.node}
    node = nodes[0]
    assert node.domain == ONNX_DOMAIN == "dmf"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["stride"] == [1, 1] and attrs["padding"] == [1, 1] and attrs["dilation"] == [1, 1]
    assert attrs["groups"] == 1 and attrs["offset_groups"] == 1
    assert attrs["plugin_version"] == b"1"
    weight = {i.name: i for i in model.graph.initializer}[node.input[2]]
    assert list(weight.dims) == [64 * 9, 640, 3, 3]


# ONNX ops that TensorRT's ONNX parser (onnx-tensorrt, operators.md) imports with dynamic
# shapes. Not in it on purpose: EyeLike ("does not work for dynamically shaped tensors"),
# which torch.diagonal exports to.
TENSORRT_DYNAMIC_OPS = {
    "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Equal",
    "Expand", "Flatten", "Gather", "Identity", "LeakyRelu", "MatMul", "Max", "MaxPool", "Min",
    "Mul", "Pad", "Pow", "Range", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "Relu",
    "Reshape", "Shape", "Sigmoid", "Slice", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze",
}


@pytest.mark.parametrize("groups,kernel", CONFIGS)
def test_plugin_flavour_uses_only_ops_tensorrt_parses_with_dynamic_shapes(exported, groups, kernel):
    from dmf_export.tensorrt.plugin import PLUGIN_NAME

    _, (path,) = exported(groups, kernel, "onnx", onnx_flavor="plugin")
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert PLUGIN_NAME in ops
    assert ops - {PLUGIN_NAME} <= TENSORRT_DYNAMIC_OPS, ops - {PLUGIN_NAME} - TENSORRT_DYNAMIC_OPS


def _fp16_evaluator(model):
    """ONNX's reference evaluator, with Conv and DeformConv computed by torch in float32
    and rounded to float16 (as a GPU accumulates): its own versions are pure Python and
    take minutes. DeformConv comes from the independent tests/reference_dcn.py."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops import op_conv, op_deform_conv
    from reference_dcn import deform_conv2d_reference

    f32 = lambda a: None if a is None else torch.from_numpy(a).float()  # noqa: E731

    class Conv(op_conv.Conv):
        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,
                 kernel_shape=None, pads=None, strides=None):
            half = len(pads) // 2
            assert pads[:half] == pads[half:]
            out = torch.nn.functional.conv2d(f32(X), f32(W), f32(B), stride=strides,
                                             padding=pads[:half], dilation=dilations, groups=group)
            return (out.half().numpy(),)

    class DeformConv(op_deform_conv.DeformConv):
        def _run(self, X, W, offset, B=None, mask=None, dilations=None, group=None,
                 kernel_shape=None, offset_group=None, pads=None, strides=None):
            assert B is None and mask is None
            out = deform_conv2d_reference(f32(X), f32(offset), f32(W), strides, pads[:2],
                                          dilations, group, offset_group)
            return (out.half().numpy(),)

    return ReferenceEvaluator(model, new_ops=[Conv, DeformConv])


def test_fp16_onnx_is_a_float16_graph_that_matches_eager_within_1e_2(exported, eager):
    checkpoint, (path,) = exported(64, 1, "onnx", precision="fp16")
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16, value.name
    assert all(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer
               if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    # onnxruntime's CPU provider lacks float16 kernels for these ops.
    for seed, size in enumerate([EpisodeSize(3, 1, 2), EpisodeSize(5, 2, 3)]):
        support, labels, query = make_episode(size, IMAGE, seed=7 + seed)
        scores = _fp16_evaluator(model).run(None, {"support": support.half().numpy(),
                                                   "support_labels": labels.half().numpy(),
                                                   "query": query.half().numpy()})[0]
        assert scores.dtype == np.float16
        with torch.inference_mode():
            expected = eager(checkpoint)(support, labels, query).numpy()
        np.testing.assert_allclose(scores.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
        assert (scores.argmax(1) == expected.argmax(1)).all()


def test_torchscript_keeps_the_custom_op_and_loads_in_a_fresh_process(exported):
    _, (path,) = exported(64, 1, "torchscript")
    graph = str(torch.jit.load(str(path)).inlined_graph)
    assert "dmf::deform_conv2d" in graph
    code = ("import sys, torch, dmf_export; m = torch.jit.load(sys.argv[1]);"
            "s = m(torch.randn(2,3,32,32), torch.eye(2), torch.randn(3,3,32,32)); print(tuple(s.shape))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 2)"


@pytest.mark.parametrize("solver,steps", [("euler", 2), ("rk4", 3)])
def test_other_solvers_match_torchdiffeq_with_the_same_fixed_steps(exported, eager, solver, steps):
    checkpoint, (path,) = exported(64, 1, "onnx", solver=solver, steps=steps)
    model = eager(checkpoint)
    runner = open_artifact(path)
    support, labels, query = make_episode(EpisodeSize(3, 1, 2), IMAGE, seed=11)
    with torch.inference_mode():
        expected = model(support, labels, query, method=solver, steps=steps)
        original = model(support, labels, query)
    scores = runner(support, labels, query)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, original, rtol=1e-4, atol=1e-4), "the solver made no difference"


# -- on a GPU (skipped without one) ---------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("groups,kernel", CONFIGS)
def test_torchscript_fp32_on_cuda_matches_eager_within_1e_4(exported, eager, groups, kernel):
    checkpoint, (path,) = exported(groups, kernel, "torchscript")
    assert_matches_eager(open_artifact(path, device="cuda"), eager(checkpoint))


@pytest.mark.cuda
@pytest.mark.parametrize("groups,kernel", [(64, 1), (64, 3)])
def test_a_cuda_aoti_package_matches_eager_within_1e_4(exported, eager, groups, kernel):
    checkpoint, (path,) = exported(groups, kernel, "aoti", device="cuda")
    runner = open_artifact(path, device="cuda")
    assert runner.info.device == "cuda"
    assert_matches_eager(runner, eager(checkpoint))


@pytest.mark.cuda
@pytest.mark.parametrize("groups,kernel", [(64, 1), (64, 3)])
def test_torchscript_fp16_on_cuda_matches_eager_within_1e_2(exported, eager, groups, kernel):
    checkpoint, (path,) = exported(groups, kernel, "torchscript", precision="fp16")
    runner = open_artifact(path, device="cuda")
    model = eager(checkpoint)
    for i, size in enumerate(SIZES[:3]):
        support, labels, query = make_episode(size, IMAGE, seed=40 + i)
        with torch.inference_mode():
            expected = model(support, labels, query)
        scores = runner(support, labels, query)
        assert scores.dtype == torch.float16 and scores.is_cuda
        torch.testing.assert_close(scores.float().cpu(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("graph", ["episode", "split"])
def test_cuda_graph_replay_reads_each_calls_inputs(exported, eager, graph):
    checkpoint, paths = exported(64, 1, "torchscript", graph=graph)
    runner = open_artifact(paths[0], device="cuda", cuda_graph=True)
    model = eager(checkpoint)
    size = EpisodeSize(5, 1, 4)
    for seed in (50, 51, 52):  # one capture, then replays on new inputs of the same shapes
        support, labels, query = make_episode(size, IMAGE, seed=seed)
        with torch.inference_mode():
            expected = model(support, labels, query)
        torch.testing.assert_close(runner(support, labels, query).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_cuda_graphs_and_fp16_torchscript_refuse_a_cpu_device(exported):
    from dmf_export.errors import DMFExportError

    _, (path,) = exported(64, 1, "torchscript")
    with pytest.raises(DMFExportError, match="CUDA graphs need a GPU"):
        open_artifact(path, cuda_graph=True)
    _, (onnx_path,) = exported(64, 1, "onnx")
    with pytest.raises(DMFExportError, match="applies to torchscript and aoti artifacts, not onnx"):
        open_artifact(onnx_path, cuda_graph=True)


# -- the op alone in ONNX ---------------------------------------------------------------

class _DeformConv(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, input, offset):
        return torch.ops.dmf.deform_conv2d(input, offset, self.weight, [1, 1], [1, 1], [1, 1], 1, 1)


@pytest.mark.parametrize("broadcast", [True, False], ids=["fewer_images", "one_image_each"])
def test_onnx_deformconv_gets_one_image_per_offset_set(tmp_path, broadcast):
    """The op's input may hold fewer images than offset sets (sample n reads image n % N_in);
    ONNX DeformConv may not, so the translation expands them, and only then."""
    from torch.export import Dim

    from dmf_export.onnx_ops import translation_table
    from reference_dcn import deform_conv2d_reference
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 6, 3, 3, generator=gen)
    images, samples = Dim("images", min=1), Dim("samples", min=1)

    def case(n_images, n_samples):
        return (torch.randn(n_images, 6, 7, 7, generator=gen),
                torch.randn(n_samples, 18, 7, 7, generator=gen) * 2)

    example = case(2, 6) if broadcast else case(3, 3)
    dynamic = ({"input": {0: images}, "offset": {0: samples}} if broadcast
               else {"input": {0: samples}, "offset": {0: samples}})
    program = torch.onnx.export(_DeformConv(weight), example, dynamo=True, opset_version=19,
                                input_names=["input", "offset"], dynamic_shapes=dynamic,
                                custom_translation_table=translation_table("standard"))
    path = tmp_path / "dcn.onnx"
    program.save(str(path))
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ("Expand" in ops) == broadcast, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, offset = case(3, 12) if broadcast else case(5, 5)  # sizes other than the export's
    out = session.run(None, {"input": x.numpy(), "offset": offset.numpy()})[0]
    expected = deform_conv2d_reference(x.double().repeat(offset.shape[0] // x.shape[0], 1, 1, 1),
                                       offset.double(), weight.double(), 1, 1, 1)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-4)
