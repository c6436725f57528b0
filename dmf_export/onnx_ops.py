"""How ``dmf::deform_conv2d`` is written into ONNX, in the two flavours.

- ``standard``: the ONNX ``DeformConv`` operator (opset 19), so stock onnxruntime ≥ 1.25
  runs the graph with nothing else installed. DMF's DCNv1 is DeformConv without mask
  and bias.
- ``plugin``: the project's own node, ``dmf::DMFDeformConv2d`` version 1, which the
  TensorRT plugin in ``plugins/`` implements (TensorRT's ONNX parser falls back to the
  plugin registry for nodes it does not know, by op type, ``plugin_version`` and
  ``plugin_namespace``: the plugin's identity, ``dmf_export.tensorrt.plugin``).
  Documented in ``plugins/DMFDeformConv2dPlugin/README.md``.
"""
from __future__ import annotations

import functools

import torch

from dmf_export.tensorrt.plugin import ONNX_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

FLAVORS = ("standard", "plugin")

def _plugin_schema():
    from onnx.defs import OpSchema  # heavy, deferred with onnxscript (see _onnxscript)

    # onnxscript (≥ 0.6) and torch's ONNX tracer only call ops that have a schema, and
    # none is registered for a custom domain: hand one to the op directly (no global
    # registration). Input, attribute names and types are the plugin's
    # (plugins/DMFDeformConv2dPlugin/README.md).
    ints, integer, string = OpSchema.AttrType.INTS, OpSchema.AttrType.INT, OpSchema.AttrType.STRING
    return OpSchema(
        PLUGIN_NAME, ONNX_DOMAIN, 1,
        doc="DCNv1 deformable convolution (no bias, no mask); the TensorRT plugin DMFDeformConv2d.",
        inputs=[OpSchema.FormalParameter(name, "T") for name in ("input", "offset", "weight")],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "one type for every tensor")],
        attributes=[OpSchema.Attribute(name, ints, "") for name in ("stride", "padding", "dilation")]
        + [OpSchema.Attribute(name, integer, "") for name in ("groups", "offset_groups")]
        + [OpSchema.Attribute(name, string, "") for name in ("plugin_version", "plugin_namespace")],
    )


@functools.cache
def _onnxscript():
    """onnxscript's opset 19 and the plugin's op, made on the first export: onnxscript and
    onnx take most of a second to import, which `dmf-export --help` should not pay."""
    import onnxscript  # heavy, deferred on purpose (see above)
    from onnxscript import opset19

    plugin = onnxscript.values.Op(onnxscript.values.Opset(ONNX_DOMAIN, 1), PLUGIN_NAME, _plugin_schema())
    return opset19, plugin


def _per_sample(input, offset):
    """The input with one image per offset set, image n % N_in for sample n, as both ONNX
    nodes need: an Expand of [1, N_in, C, H, W] to [N / N_in, N_in, C, H, W], flattened.
    Left out where the two batch sizes are known to be equal."""
    try:
        if input.shape is not None and offset.shape is not None and input.shape[0] == offset.shape[0]:
            return input
    except (AttributeError, IndexError, TypeError):
        pass
    op, _ = _onnxscript()
    images = op.Shape(input)  # [N_in, C, H, W]
    samples = op.Shape(offset, start=0, end=1)
    repeats = op.Div(samples, op.Shape(input, start=0, end=1))
    tiled = op.Expand(op.Unsqueeze(input, op.Constant(value_ints=[0])),
                      op.Concat(repeats, images, axis=0))
    return op.Reshape(tiled, op.Concat(samples, op.Shape(input, start=1), axis=0))


def _standard(input, offset, weight, stride, padding, dilation, groups, offset_groups):
    # DeformConv takes (X, W, offset); kernel_shape is inferred from W.
    op, _ = _onnxscript()
    return op.DeformConv(
        _per_sample(input, offset), weight, offset,
        strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
        dilations=list(dilation), group=groups, offset_group=offset_groups,
    )


def _plugin(input, offset, weight, stride, padding, dilation, groups, offset_groups):
    _, plugin_op = _onnxscript()
    return plugin_op(
        _per_sample(input, offset), offset, weight,
        stride=list(stride), padding=list(padding), dilation=list(dilation),
        groups=groups, offset_groups=offset_groups,
        plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE,
    )


def translation_table(flavor: str) -> dict:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown ONNX flavour {flavor!r}; choose from {', '.join(FLAVORS)}")
    return {torch.ops.dmf.deform_conv2d.default: _standard if flavor == "standard" else _plugin}
