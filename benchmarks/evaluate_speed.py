"""Episodes per second of ``dmf-export evaluate``, and the share spent on data.

    python benchmarks/evaluate_speed.py [--episodes 20] [--threads 2] [--out DIR] [--json]

Writes (once, into ``--out``) a synthetic 84×84 dataset in both of the original's
layouts (miniImageNet-style pickle, and image folders of JPEGs), the seeded random
checkpoint (``dmf-export demo``'s) and its ONNX and TorchScript exports; then runs
``evaluate`` on 5-way 1-shot episodes with 15 queries per class for each model and
layout, each in its own process, and prints episodes/s and the data figures:
- ``data busy``: decoding + preprocessing summed over the loader's workers, ÷ the run's
  wall time (setup excluded). With the loader working ahead this overlaps the model; on
  a machine with spare cores it costs nothing, on a busy one it competes for them;
- ``data wait``: time the evaluation loop waited for its next episode, ÷ wall time.
"""
from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PICKLE_TEST = "miniImageNet_category_split_test.pickle"


def synthetic_image(rng, class_index: int, size: int = 84) -> np.ndarray:
    """Noise tinted by the class, with a class-coloured square at a random place."""
    tint = np.array([(37 * class_index) % 256, (91 * class_index) % 256, (53 * class_index) % 256])
    image = (rng.integers(0, 128, (size, size, 3)) + tint // 2).clip(0, 255)
    x, y = rng.integers(0, size // 2, 2)
    image[y:y + size // 3, x:x + size // 3] = tint
    return image.astype(np.uint8)


def write_dataset(out: Path, classes: int, images: int) -> tuple[Path, Path]:
    pickled, folders = out / "pickle", out / "folders"
    if (pickled / PICKLE_TEST).is_file() and (folders / "test").is_dir():
        return pickled, folders
    rng = np.random.default_rng(0)
    data, labels = [], []
    for c in range(classes):
        folder = folders / "test" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images):
            image = synthetic_image(rng, c)
            Image.fromarray(image).save(folder / f"{i:04d}.jpg", quality=90)
            data.append(image)
            labels.append(80 + c)
    pickled.mkdir(parents=True, exist_ok=True)
    with open(pickled / PICKLE_TEST, "wb") as handle:
        pickle.dump({"data": np.stack(data), "labels": labels}, handle, protocol=4)
    return pickled, folders


def write_models(out: Path) -> dict[str, Path]:
    from dmf_export.synthetic import write_random_checkpoint
    from dmf_export.export import ExportOptions, export_checkpoint

    checkpoint = out / "dmf.pth.tar"
    if not checkpoint.is_file():
        write_random_checkpoint(checkpoint)
    models = {"eager": checkpoint}
    for fmt, name in (("onnx", "dmf.onnx"), ("torchscript", "dmf.ts")):
        if not (out / name).is_file():
            export_checkpoint(checkpoint, ExportOptions(format=fmt, output=str(out / name), force=True))
        models[fmt] = out / name
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--eager-episodes", type=int, default=None,
                        help="episodes for the (slow) eager model (default: --episodes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=600, help="images per class")
    parser.add_argument("--models", default="eager,onnx,torchscript")
    parser.add_argument("--layouts", default="pickle,folders")
    parser.add_argument("--out", type=Path, default=Path("evaluate-speed"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    roots = dict(zip(("pickle", "folders"), write_dataset(args.out, args.classes, args.images)))
    models = write_models(args.out)
    rows = []
    for layout in args.layouts.split(","):
        for name in args.models.split(","):
            episodes = args.eager_episodes if name == "eager" and args.eager_episodes else args.episodes
            command = [sys.executable, "-m", "dmf_export", "evaluate", str(models[name]),
                       "--data", str(roots[layout]), "--episodes", str(episodes),
                       "--threads", str(args.threads), "--workers", str(args.workers), "--json"]
            report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                               cwd=ROOT).stdout)
            timing = report["timing"]
            rows.append({"layout": layout, "model": name, "episodes": episodes,
                         "episodes_per_second": timing["episodes_per_second"],
                         "data_busy": timing["data_share"], "data_wait": timing["data_wait_share"],
                         "setup_seconds": timing["setup_seconds"],
                         "accuracy": report["models"][0]["accuracy"]})
            if not args.json:
                row = rows[-1]
                print(f"{layout:<8} {name:<12} {episodes:>4} episodes  {row['episodes_per_second']:6.3f}/s  "
                      f"data busy {row['data_busy']:6.1%}  wait {row['data_wait']:6.1%}  "
                      f"setup {row['setup_seconds']:5.1f} s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
