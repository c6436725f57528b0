"""What the tracing exporters (ONNX, AOTInductor) share: example inputs, the dynamic axes
named as the contract names them, and a quiet exporter."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch

from dmf_export.contract import (
    ENCODER_INPUTS, ENCODER_OUTPUTS, EPISODE_INPUTS, EPISODE_OUTPUTS, FEATURE_CHANNELS,
    HEAD_INPUTS, HEAD_OUTPUTS, EpisodeSize, make_episode,
)

NAMES = {
    "episode": (EPISODE_INPUTS, EPISODE_OUTPUTS),
    "encoder": (ENCODER_INPUTS, ENCODER_OUTPUTS),
    "head": (HEAD_INPUTS, HEAD_OUTPUTS),
}


def trace_size(opts) -> EpisodeSize:
    # torch.export specialises dimensions whose example value is 0 or 1; tracing at ≥ 2
    # keeps every episode axis dynamic (S = way·shot ≥ 2 follows). The graph is the same
    # for every size.
    return EpisodeSize(max(opts.way, 2), opts.shot, max(opts.queries, 2))


def feature_size(image_size: int) -> int:
    size = image_size
    for _ in range(3):  # three max-pools with ceil_mode
        size = -(-size // 2)
    return size


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
    from torch.export import Dim

    support, way, query = Dim("S", min=1), Dim("way", min=1), Dim("Q", min=1)
    if graph == "episode":
        return {"support": {0: support}, "support_labels": {0: support, 1: way}, "query": {0: query}}
    if graph == "encoder":
        return {"images": {0: Dim("N", min=1)}}
    return {"support_features": {0: support}, "support_labels": {0: support, 1: way},
            "query_features": {0: query}}


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
