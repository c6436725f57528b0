"""How far a GPU's reduced precision moves DMF's scores, emulated on a CPU.

    python benchmarks/precision_drift.py [--checkpoint CKPT] [--sizes 5w1s75q,...] [--json]

For each episode size, against the eager original in float64, the deployment graph:
- ``fp32``: as exported, in IEEE float32;
- ``tf32``: float32 with every convolution's input and weight rounded to TF32's 10-bit
  mantissa (round to nearest) and accumulated in float32, as cuDNN does under PyTorch's
  default ``torch.backends.cudnn.allow_tf32 = True``; matmuls stay float32 (PyTorch's
  default for cuBLAS) and so does the deformable conv (its kernel has no tensor cores);
- ``fp16``: the graph in float16 (``--precision fp16``), its deformable conv computed
  in float32 and rounded to float16 (the CPU op has no float16 kernel; the CUDA one
  accumulates in float32 too).
Each row is judged by ``verify``'s rule for that precision (fp32's tolerance for tf32).
This is an emulation: a GPU's rounding order differs, so read the figures as magnitudes.
Without ``--checkpoint`` the weights are the seeded random checkpoint of the tests, whose
scores for different classes nearly tie (it was never trained).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmf_export.checkpoint import load_checkpoint  # noqa: E402
from dmf_export.contract import TOLERANCES, make_episode, parse_sizes  # noqa: E402
from dmf_export.deploy import build_episode_graph  # noqa: E402
from dmf_export.synthetic import write_random_checkpoint  # noqa: E402
from dmf_export.verify import compare  # noqa: E402


def round_to_tf32(tensor: torch.Tensor) -> torch.Tensor:
    """float32 → the nearest value with a 10-bit mantissa (ties away from zero)."""
    bits = tensor.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def tf32_convolutions():
    original = F.conv2d

    def conv2d(input, weight, bias=None, *args, **kwargs):
        return original(round_to_tf32(input), round_to_tf32(weight), bias, *args, **kwargs)

    F.conv2d = conv2d  # nn.Conv2d and deploy.py both call it through the module
    try:
        yield
    finally:
        F.conv2d = original


@contextlib.contextmanager
def float16_deform_conv():
    op = torch.ops.dmf.deform_conv2d

    def deform_conv2d(input, offset, weight, *args):
        return op(input.float(), offset.float(), weight.float(), *args).half()

    torch.ops.dmf.deform_conv2d = deform_conv2d  # the graph runs as Python, not TorchScript
    try:
        yield
    finally:
        torch.ops.dmf.deform_conv2d = op


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="default: the seeded random checkpoint (G 64, K 1)")
    parser.add_argument("--sizes", default="5w1s75q,5w5s75q")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.checkpoint or write_random_checkpoint(Path(scratch) / "random.pth.tar")
        model = load_checkpoint(path)
    graph = build_episode_graph(model)
    half = build_episode_graph(model).half()
    reference = model.double()
    rows = []
    with torch.inference_mode():
        for seed, size in enumerate(parse_sizes(args.sizes)):
            support, labels, query = make_episode(size, args.image_size, seed=seed)
            expected = reference(support.double(), labels.double(), query.double())
            top2 = expected.topk(min(2, expected.shape[1]), dim=1).values
            gap = float((top2[:, 0] - top2[:, -1]).min())
            runs = {"fp32": lambda: graph(support, labels, query)}
            runs["tf32"] = lambda: _within(tf32_convolutions(), graph, support, labels, query)
            runs["fp16"] = lambda: _within(float16_deform_conv(), half, support.half(),
                                           labels.half(), query.half())
            for mode, run in runs.items():
                result = compare(run(), expected, TOLERANCES["fp16" if mode == "fp16" else "fp32"],
                                 str(size))
                rows.append({"size": str(size), "mode": mode, "max_abs": result.max_abs,
                             "max_rel": result.max_rel, "agreement": result.agreement,
                             "near_ties": result.near_ties, "passed": result.passed,
                             "smallest_top2_gap": gap})
                if not args.json:
                    print(f"{size!s:>9} {mode}: max abs {result.max_abs:.2e}, max rel "
                          f"{result.max_rel:.2e}, agreement {result.agreement:.0%} "
                          f"(+{result.near_ties} near-ties), verify {'PASS' if result.passed else 'FAIL'}"
                          f"; smallest top-2 gap of the original {gap:.1e}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _within(context, graph, *inputs):
    with context:
        return graph(*inputs)


if __name__ == "__main__":
    sys.exit(main())
