"""How far an int8 ONNX export drifts from the eager fp32 original, per calibration method.

On a seeded random checkpoint (BN-calibrated, so activations are realistic) and a
synthetic image-folder split (``dmf_export.synthetic.write_synthetic_split``): for each
calibration method (and activation type), export ``--precision int8`` calibrated on the
split, then compare with the eager original
- on verify's seeded episodes (``contract.VERIFY_SIZES`` at the export's size): the
  largest |Δscore|, the largest |Δ| ÷ |score|, the share of the int8 tolerance used,
  arg-max agreement with near-ties (verify.compare);
- on episodes of the split as evaluate draws them, after those calibrated on (they may
  share images with them: the split has 600): per-query arg-max agreement.

    python benchmarks/int8_drift.py [--out DIR] [--episodes 20] [--methods minmax,entropy,percentile]
        [--graph episode|split] [--image-size 84] [--json]

Not a test: the figures depend on the random weights and the synthetic pictures; a
trained checkpoint on real images is what a user should calibrate and evaluate on.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dmf_export import load_checkpoint  # noqa: E402
from dmf_export.contract import TOLERANCES, VERIFY_SIZES, make_episode  # noqa: E402
from dmf_export.data import draw_episodes, load_episode, open_split, preprocessing_for  # noqa: E402
from dmf_export.export import ExportOptions, export_checkpoint  # noqa: E402
from dmf_export.formats import open_artifact  # noqa: E402
from dmf_export.synthetic import write_random_checkpoint, write_synthetic_split  # noqa: E402
from dmf_export.verify import compare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--episodes", type=int, default=20, help="held-out split episodes compared")
    parser.add_argument("--calib-episodes", type=int, default=4)
    parser.add_argument("--methods", default="minmax,entropy,percentile")
    parser.add_argument("--graph", default="episode", choices=("episode", "split"))
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dmf-int8-drift-") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = write_random_checkpoint(out / "dmf_random.pth.tar")
        cifar = args.image_size != 84  # the ImageNet transform crops to 84; others: stored size
        data = write_synthetic_split(out / "data", classes=20, images=30, size=args.image_size)
        model = load_checkpoint(checkpoint)
        split = open_split(data, "test")
        preprocessing = preprocessing_for(cifar)
        drawn = list(draw_episodes(split, args.calib_episodes + args.episodes))[args.calib_episodes:]
        held_out = [load_episode(split, e, preprocessing) for e in drawn]
        with torch.inference_mode():
            reference = [model(e.support, e.support_labels, e.query) for e in held_out]
            verify_expected = [model(*make_episode(size, args.image_size, seed=i))
                               for i, size in enumerate(VERIFY_SIZES)]
        rows = []
        for method in args.methods.split(","):
            opts = ExportOptions(format="onnx", precision="int8", calibrate=str(data), calib_method=method,
                                 calib_episodes=args.calib_episodes, graph=args.graph,
                                 calib_transform="cifar-fs" if cifar else "imagenet",
                                 image_size=args.image_size, output=str(out / f"int8-{method}"), force=True)
            start = time.perf_counter()
            path = export_checkpoint(str(checkpoint), opts)[0].path
            seconds = time.perf_counter() - start
            runner = open_artifact(path, threads=args.threads)
            sizes = [compare(runner(*make_episode(size, args.image_size, seed=i)), expected,
                             TOLERANCES["int8"], str(size))
                     for i, (size, expected) in enumerate(zip(VERIFY_SIZES, verify_expected))]
            same = total = 0
            worst_rel = worst_abs = 0.0
            for episode, expected in zip(held_out, reference):
                scores = runner(episode.support, episode.support_labels, episode.query).double()
                same += int((scores.argmax(1) == expected.argmax(1)).sum())
                total += len(expected)
                diff = (scores - expected.double()).abs()
                worst_abs = max(worst_abs, float(diff.max()))
                worst_rel = max(worst_rel, float((diff / expected.double().abs().clamp_min(1e-12)).max()))
            rows.append({
                "method": method, "graph": args.graph, "export_s": round(seconds, 1),
                "verify_max_abs": max(r.max_abs for r in sizes), "verify_max_rel": max(r.max_rel for r in sizes),
                "verify_tolerance_used": max(r.tolerance_used for r in sizes),
                "verify_agreement": min(r.agreement for r in sizes),
                "verify_near_ties": sum(r.near_ties for r in sizes),
                "verify_passed": all(r.passed for r in sizes),
                "split_agreement": same / total, "split_queries": total,
                "split_max_abs": worst_abs, "split_max_rel": worst_rel,
            })
            runner.close()
            if not args.json:
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
