"""What the tracing exporters (ONNX, AOTInductor) share: example inputs, the dynamic axes
named as the contract names them, and a quiet exporter."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch

from torch.export import Dim

from dmf_export.contract import FEATURE_CHANNELS, EpisodeSize, dynamic_axes, feature_size, make_episode


def trace_size(opts) -> EpisodeSize:
    # torch.export specialises dimensions whose example value is 0 or 1; tracing at ≥ 2
    # keeps every episode axis dynamic (S = way·shot ≥ 2 follows). The graph is the same
    # for every size.
    return EpisodeSize(max(opts.way, 2), opts.shot, max(opts.queries, 2))


def example_inputs(graph: str, opts, dtype: torch.dtype, device="cpu") -> tuple:
    size, image_size = trace_size(opts), opts.image_size
    support, labels, query = make_episode(size, image_size, seed=0, dtype=dtype, device=device)
    if graph == "episode":
        return support, labels, query
    if graph == "encoder":
        return (torch.cat([support, query]),)
    gen = torch.Generator().manual_seed(1)
    hw = feature_size(image_size)
    feats = lambda n: torch.randn(n, FEATURE_CHANNELS, hw, hw, generator=gen).to(device, dtype)  # noqa: E731
    return feats(size.support), labels, feats(size.queries)


def dynamic_shapes(graph: str) -> dict:
    """torch.export's dynamic shapes for ``graph``: one ``Dim`` per axis name of the contract."""
    dims: dict[str, Dim] = {}
    return {name: {axis: dims.setdefault(d, Dim(d, min=1)) for axis, d in axes.items()}
            for name, axes in dynamic_axes(graph).items()}


def quiet():
    """The exporters print progress and warnings of their own; keep ours readable."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch._inductor",
                 "onnxscript"):
        logger = logging.getLogger(name)
        previous = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, previous)
    return stack
