"""Speed (and, on a GPU, parity) of dmf::deform_conv2d on DMF's shapes.

CPU, 2 threads: our op vs onnxruntime's DeformConv (opset 19) vs torchvision's
deform_conv2d when installed, on input [375, 640, 11, 11] (one 5-way 1-shot 75-query
episode's pairs), offsets ~ N(0, 1)*2, weights [64, 640, 3, 3] and [640, 640, 3, 3], pad 1.
With CUDA: the CUDA op against the CPU op (float32 and float16) and its time against
torchvision's CUDA deform_conv2d.

    python benchmarks/bench_deform_conv.py [--json] [--runs 5] [--batch 375]

Not a test: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dmf_export import ops  # noqa: E402
from dmf_export.ops import deform_conv2d  # noqa: E402

THREADS = 2


def timed(fns: dict, runs: int, sync=lambda: None) -> dict:
    """{name: {min_s, median_s}}; one warm-up each, then the runs interleaved (ours, theirs,
    ours, ...) so that a change in the machine's load hits every contender alike."""
    for fn in fns.values():
        fn()  # warm-up (first-call setup: primitive caches, allocations)
    sync()
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: {"min_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}


def ort_deform_conv(weight_shape):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    kh, kw = weight_shape[2:]
    node = helper.make_node("DeformConv", ["X", "W", "offset"], ["Y"], kernel_shape=[kh, kw],
                            pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1])
    graph = helper.make_graph(
        [node], "deform_conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("X", "W", "offset")],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def torchvision_deform_conv2d():
    try:
        from torchvision.ops import deform_conv2d as tv
    except Exception:  # not installed, or built for another torch
        return None
    return tv


def max_abs_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the output's scale."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_cpu(batch: int, out_channels: int, runs: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 640, 11, 11, generator=generator)
    offset = torch.randn(batch, 18, 11, 11, generator=generator) * 2
    weight = torch.randn(out_channels, 640, 3, 3, generator=generator) * 0.02
    row: dict = {"device": "cpu", "threads": THREADS, "input": list(image.shape),
                 "weight": list(weight.shape)}

    ours = deform_conv2d(image, offset, weight, 1, 1)
    session = ort_deform_conv(weight.shape)
    feeds = {"X": image.numpy(), "W": weight.numpy(), "offset": offset.numpy()}
    theirs = torch.from_numpy(session.run(None, feeds)[0])
    row["onnxruntime_max_abs_relative_error"] = max_abs_relative(ours, theirs)

    contenders = {"ours": lambda: deform_conv2d(image, offset, weight, 1, 1),
                  "onnxruntime": lambda: session.run(None, feeds)}
    tv = torchvision_deform_conv2d()
    if tv is not None:
        contenders["torchvision"] = lambda: tv(image, offset, weight, padding=1)
    row.update(timed(contenders, runs))
    row["ratio_ours_over_onnxruntime"] = row["ours"]["median_s"] / row["onnxruntime"]["median_s"]
    if tv is not None:
        row["ratio_ours_over_torchvision"] = (row["ours"]["median_s"]
                                              / row["torchvision"]["median_s"])
    return row


def bench_cuda(batch: int, out_channels: int, runs: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 640, 11, 11, generator=generator)
    offset = torch.randn(batch, 18, 11, 11, generator=generator) * 2
    weight = torch.randn(out_channels, 640, 3, 3, generator=generator) * 0.02
    row: dict = {"device": torch.cuda.get_device_name(), "input": list(image.shape),
                 "weight": list(weight.shape)}
    cpu_out = deform_conv2d(image, offset, weight, 1, 1)
    gpu = [t.cuda() for t in (image, offset, weight)]
    row["fp32_max_abs_relative_error_vs_cpu"] = max_abs_relative(
        deform_conv2d(*gpu, 1, 1), cpu_out)
    half = [t.half() for t in gpu]
    cpu_of_half = deform_conv2d(*[t.float().cpu() for t in half], 1, 1)
    row["fp16_max_abs_relative_error_vs_cpu"] = max_abs_relative(
        deform_conv2d(*half, 1, 1), cpu_of_half)
    row["fp32_parity_ok"] = row["fp32_max_abs_relative_error_vs_cpu"] <= 1e-5
    row["fp16_parity_ok"] = row["fp16_max_abs_relative_error_vs_cpu"] <= 1e-2

    contenders = {"ours_fp32": lambda: deform_conv2d(*gpu, 1, 1),
                  "ours_fp16": lambda: deform_conv2d(*half, 1, 1)}
    tv = torchvision_deform_conv2d()
    if tv is not None:
        contenders["torchvision_fp32"] = lambda: tv(gpu[0], gpu[1], gpu[2], padding=1)
    row.update(timed(contenders, runs, torch.cuda.synchronize))
    if tv is not None:
        row["ratio_ours_over_torchvision_fp32"] = (row["ours_fp32"]["median_s"]
                                                   / row["torchvision_fp32"]["median_s"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--batch", type=int, default=375, help="pairs (default: one episode)")
    parser.add_argument("--out-channels", type=int, nargs="+", default=[64, 640])
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    build_info = ops.require()

    rows = []
    for out_channels in args.out_channels:
        if not args.no_cpu:
            rows.append(bench_cpu(args.batch, out_channels, args.runs))
        if torch.cuda.is_available() and build_info.with_cuda:
            rows.append(bench_cuda(args.batch, out_channels, args.runs))
    if args.json:
        print(json.dumps({"torch": torch.__version__, "results": rows}, indent=2))
        return 0
    for row in rows:
        print(f"{row['device']}: input {row['input']} weight {row['weight']}")
        for key, value in row.items():
            if isinstance(value, dict):
                print(f"  {key:<18} min {value['min_s'] * 1e3:9.2f} ms   "
                      f"median {value['median_s'] * 1e3:9.2f} ms")
            elif key.startswith(("ratio", "fp", "onnxruntime_max")):
                print(f"  {key:<40} {value:.3g}" if isinstance(value, float)
                      else f"  {key:<40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
