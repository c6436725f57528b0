"""Cached vs uncached ``evaluate``: the paper's protocol with features encoded once.

    python benchmarks/feature_cache.py [--episodes 2000] [--uncached-episodes 200]
        [--threads 2] [--models eager,onnx,torchscript] [--out DIR]

On a synthetic split of ``--classes`` × ``--images`` 84×84 images (evaluate_speed.py's
writer; 20 × 600 is miniImageNet's test split), 5-way 1-shot, 15 queries per class: each
model (the seeded random checkpoint, its ONNX and TorchScript split exports) runs the
full ``--episodes`` cached, and the first ``--uncached-episodes`` uncached (its cost per
episode is constant: the full run is projected from it). Prints the CPU flags, episodes
per second, the share of wall time in the encoder, the head and data, and cached ÷
uncached; writes ``DIR/feature_cache.json``. Resumable: a finished run is read back from
that file, so an interrupted benchmark restarts where it stopped.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluate_speed import write_dataset  # noqa: E402  (the benchmarks' own synthetic split)

from dmf_export import cpu  # noqa: E402


def cpu_flags() -> str:
    """The model name and the vector extensions of this CPU (what the timings depend on)."""
    vector = sorted(f for f in cpu.cpu_flags() or () if f.startswith(("avx", "amx", "fma", "sse4")))
    return f"{cpu.model_name() or platform.processor()}; {' '.join(vector)}"


def write_split_models(out: Path) -> dict[str, Path]:
    from dmf_export.export import ExportOptions, export_checkpoint
    from dmf_export.synthetic import write_random_checkpoint

    checkpoint = out / "dmf.pth.tar"
    if not checkpoint.is_file():
        write_random_checkpoint(checkpoint)
    models = {"eager": checkpoint}
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
        encoder = out / f"dmf.encoder{suffix}"
        if not encoder.is_file():
            export_checkpoint(str(checkpoint), ExportOptions(format=fmt, graph="split", force=True,
                                                             output=str(out / f"dmf{suffix}")))
        models[fmt] = encoder
    return models


def run(model: Path, data: Path, episodes: int, threads: int, workers: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "dmf_export", "evaluate", str(model), "--data", str(data),
               "--episodes", str(episodes), "--threads", str(threads), "--workers", str(workers),
               "--json", "--no-progress", *extra]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                       cwd=ROOT).stdout)
    timing, figures = report["timing"], report["models"][0]
    run_seconds = timing["wall_seconds"] - timing["setup_seconds"]
    return {"episodes": episodes, "run_seconds": run_seconds,
            "setup_seconds": timing["setup_seconds"],
            "episodes_per_second": timing["episodes_per_second"],
            "encode_share": timing["encode_share"], "head_share": timing["head_share"],
            "data_share": timing["data_share"], "data_wait_share": timing["data_wait_share"],
            "model_share": figures["seconds"] / run_seconds if run_seconds > 0 else None,
            "accuracy": figures["accuracy"], "ci95": figures["ci95"],
            "feature_cache": figures["feature_cache"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--uncached-episodes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=600, help="images per class")
    parser.add_argument("--models", default="eager,onnx,torchscript")
    parser.add_argument("--cache-mb", type=float, help="passed to evaluate (default: its own)")
    parser.add_argument("--cache-overflow", choices=("spill", "recompute"), default="spill")
    parser.add_argument("--out", type=Path, default=Path("feature-cache-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "feature_cache.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    flags = cpu_flags()
    print(f"CPU: {flags}", flush=True)
    data, _ = write_dataset(args.out, args.classes, args.images)
    models = write_split_models(args.out)
    cache = ["--cache-overflow", args.cache_overflow] + (
        ["--cache-mb", str(args.cache_mb)] if args.cache_mb is not None else [])
    settings = {"classes": args.classes, "images": args.images, "threads": args.threads,
                "workers": args.workers, "cache": cache}
    if results.get("settings") != settings:  # another configuration: start afresh
        results = {"settings": settings, "runs": {}}
    results["cpu"] = flags
    for name in args.models.split(","):
        for label, episodes, extra in (("cached", args.episodes, cache),
                                       ("uncached", args.uncached_episodes, ["--no-feature-cache"])):
            key = f"{name}/{label}/{episodes}"
            if key not in results["runs"]:
                results["runs"][key] = run(models[name], data, episodes, args.threads, args.workers, extra)
                results_path.write_text(json.dumps(results, indent=2))
            row = results["runs"][key]
            print(f"{name:<12} {label:<9} {episodes:>5} episodes  {row['episodes_per_second']:7.3f}/s  "
                  f"encoder {row['encode_share'] or 0:6.1%}  head {row['head_share'] or 0:6.1%}  "
                  f"model {row['model_share'] or 0:6.1%}  data busy {row['data_share']:6.1%}  "
                  f"wait {row['data_wait_share']:6.1%}", flush=True)
        cached = results["runs"][f"{name}/cached/{args.episodes}"]
        uncached = results["runs"][f"{name}/uncached/{args.uncached_episodes}"]
        projected = args.episodes / uncached["episodes_per_second"]
        ratio = projected / cached["run_seconds"]
        results.setdefault("summary", {})[name] = {
            "cached_seconds": cached["run_seconds"], "uncached_projected_seconds": projected,
            "speedup": ratio}
        print(f"{name:<12} {args.episodes} episodes: cached {cached['run_seconds']:.0f} s, uncached "
              f"{projected:.0f} s (projected from {args.uncached_episodes}): {ratio:.2f}× faster",
              flush=True)
    results_path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
