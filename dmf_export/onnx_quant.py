"""Static int8 quantization of an fp32 ONNX graph with onnxruntime (QDQ).

What is quantized: the backbone (ResNet-12, BN folded): its sixteen convolutions with
per-channel int8 weights, and its LeakyReLUs, residual Adds and max-pools, so that its
activations stay uint8 from one convolution to the next (only quantizing the
convolutions, each one's output went back to fp32 for the element-wise ops: 0.55× the
fp32 encoder's time instead of 0.37×, README). Activation ranges come from calibration
images. What stays fp32: everything after the backbone's last max-pool, the head: the
meta-filter's offset and tap convolutions, the deformable convolution (onnxruntime has
no int8 ``DeformConv``), the alignment ODE and the scores; they are about a tenth of an
episode's arithmetic, and the ODE's small differences are what the scores are made of.
The boundary is the backbone's features: an int8 encoder's output is fp32.

Calibration runs the graph itself on the images: an encoder on batches of them, an
episode graph on pseudo-episodes whose support holds a batch (each image a class of at
most five, so every class has a support image) and whose query is one image; the
head's ranges are collected too but unused. Each batch is one pass of the calibrator,
merged into the ranges found so far, so memory holds one batch's activations whatever
the image count.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from dmf_export.contract import GRAPH_IO, METADATA_KEY, ArtifactInfo
from dmf_export.errors import DMFExportError

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"
# the backbone's nodes by type: 4 blocks × (3 convs + the shortcut's, 3 LeakyReLUs, the
# residual Add; a max-pool after each of the first three)
BACKBONE_OPS = {"Conv": 16, "LeakyRelu": 12, "Add": 4, "MaxPool": 3}
CALIBRATION_BATCH = 16  # images per calibrator pass: one batch's activations in memory
_EPISODE_WAY = 5


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer prints progress per calibration pass (the histogram methods)
    and warns through the root logger that pre-processing may help (it does not change
    which nodes are quantized here): neither is for a user of the export."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(disabled)


def backbone_weights(encoder: torch.nn.Module, graph: str) -> set[str]:
    """The names the backbone's conv weights have in ``graph``'s ONNX initializers (the
    module's parameter names; the episode graph's encoder is its ``encoder``)."""
    prefix = "encoder." if graph == "episode" else ""
    return {prefix + name for name, p in encoder.named_parameters() if p.dim() == 4}


def backbone_nodes(model, weights: set[str]) -> list[str]:
    """The names of the backbone's nodes in ``model``: its convolutions (by their weights'
    names) and the LeakyReLU, Add and MaxPool nodes that take what a backbone node gives
    (found in graph order, which is topological). Checked against ``BACKBONE_OPS``: a graph
    whose backbone is not that is refused rather than quantized where it should not be."""
    chosen: list = []
    produced: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "Conv":
            ours = len(node.input) > 1 and node.input[1] in weights
        else:
            ours = node.op_type in BACKBONE_OPS and any(name in produced for name in node.input)
        if ours:
            chosen.append(node)
            produced.update(node.output)
    found = {op: sum(node.op_type == op for node in chosen) for op in BACKBONE_OPS}
    if found != BACKBONE_OPS:
        raise DMFExportError(f"the graph's backbone has {found} nodes, expected {BACKBONE_OPS}: "
                             "cannot tell where it ends, so nothing is quantized")
    return [node.name for node in chosen]


def _batches(images: torch.Tensor, graph: str):
    for batch in images.split(CALIBRATION_BATCH):
        batch = batch.numpy().astype(np.float32, copy=False)
        if graph == "encoder":
            yield {GRAPH_IO["encoder"][0][0]: batch}
            continue
        way = min(_EPISODE_WAY, len(batch))
        labels = np.eye(way, dtype=np.float32)[np.arange(len(batch)) % way]
        support, support_labels, query = GRAPH_IO["episode"][0]
        yield {support: batch, support_labels: labels, query: batch[:1]}


def quantize(source: Path, target: Path, graph: str, images: torch.Tensor, weights: set[str],
             info: ArtifactInfo, method: str = DEFAULT_METHOD) -> None:
    """``source`` (an fp32 episode or encoder graph) → ``target``: its Conv nodes whose
    weight is in ``weights`` quantized (QDQ, per-channel int8 weights, uint8 activations),
    calibrated by ``method`` on ``images`` [N, 3, H, W]; ``info`` is stored as the metadata."""
    import onnx  # heavy, only an int8 export needs it
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)  # heavy, as above

    if graph not in ("episode", "encoder"):
        raise ValueError(f"only the episode and encoder graphs are quantized, not {graph!r}")
    if method not in METHODS:
        raise DMFExportError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    nodes = backbone_nodes(onnx.load(str(source)), weights)

    class Reader(CalibrationDataReader):
        # onnxruntime asks for len() and set_range() to calibrate in strides (one batch each)
        def __init__(self):
            self.set_range(0, len(self))

        def __len__(self):
            return -(-len(images) // CALIBRATION_BATCH)

        def set_range(self, start_index, end_index):
            self.pending = _batches(images[start_index * CALIBRATION_BATCH:end_index * CALIBRATION_BATCH],
                                    graph)

        def get_next(self):
            return next(self.pending, None)

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="dmf-quant-") as scratch:
        quantized = Path(scratch) / "int8.onnx"
        with _quiet():
            quantize_static(
                str(source), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(BACKBONE_OPS), nodes_to_quantize=nodes, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=calibrate,
                extra_options={"CalibStridedMinMax": 1})
        model = onnx.load(str(quantized))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()
    model.producer_name = "dmf-export"
    onnx.save(model, str(target))
    onnx.checker.check_model(str(target))
