"""What int8 ONNX and bf16 AOTInductor/TorchScript buy on a CPU, and what they cost in accuracy.

    python benchmarks/low_precision.py [--out DIR] [--episodes 200] [--threads 2]
                                       [--precisions int8,bf16] [--repeats 5]

On the seeded random checkpoint (``dmf-export demo``'s) and a synthetic 20-class test
split (84×84, miniImageNet's pickle layout, enough images per class for 5-way 1-shot 15
queries), through the command line as a user would run it. The images are
benchmarks/evaluate_speed.py's, mixed with ``--noise`` of uniform noise: its plain
class-tinted images are told apart perfectly even by random weights (100 % for fp32 and
bf16 alike, so no difference could show); at 0.7 the random network is right about half
the time, and its arg-max is at stake on many queries.
1. exports (skipped when the file is there, so a run resumes): fp32 and int8 ONNX
   (episode and ``--graph split``; int8 calibrated with ``--calibrate DATA --split
   test``), fp32 and bf16 AOTInductor (episode) and TorchScript (episode and split);
2. ``dmf-export verify --json`` of each low-precision artifact (its drift from the eager
   fp32 original on verify's episode sizes);
3. ONE ``dmf-export bench`` run at 5w1s75q over all of them: int8 ÷ fp32 for the ONNX
   episode, the split episode and the encoder alone, bf16 ÷ fp32 for AOTInductor and
   TorchScript;
4. ``dmf-export evaluate`` of each fp32 artifact with its low-precision twin: the split
   pairs (ONNX int8, TorchScript bf16) over ``--episodes`` episodes with evaluate's feature
   cache, AOTInductor's bf16 episode graph over ``--aoti-episodes`` (uncached); accuracy
   of each, the difference, and per-query agreement.
Prints the CPU (lscpu's model name, its AVX-512/AMX flags) first; writes every command's
JSON and a summary, ``low_precision.json``, into ``--out``. Run it on a quiet machine:
other load moves the timings, not the accuracy figures. With random weights the
accuracy is chance (20 %) and the agreement figures say how often bf16/int8 flip an
arg-max the random head barely decides; a trained checkpoint's margins are larger.
"""
from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from evaluate_speed import PICKLE_TEST, synthetic_image  # noqa: E402

from dmf_export import cpu  # noqa: E402
from dmf_export.synthetic import write_random_checkpoint  # noqa: E402

# name → (format, precision, graph); the fp32 twin of a low-precision artifact is the
# fp32 one of the same format and graph
ARTIFACTS = {
    "dmf.onnx": ("onnx", "fp32", "episode"),
    "dmf.int8.onnx": ("onnx", "int8", "episode"),
    "dmf.encoder.onnx": ("onnx", "fp32", "split"),
    "dmf.int8.encoder.onnx": ("onnx", "int8", "split"),
    "dmf.pt2": ("aoti", "fp32", "episode"),
    "dmf.bf16.pt2": ("aoti", "bf16", "episode"),
    "dmf.ts": ("torchscript", "fp32", "episode"),
    "dmf.bf16.ts": ("torchscript", "bf16", "episode"),
    "dmf.encoder.ts": ("torchscript", "fp32", "split"),
    "dmf.bf16.encoder.ts": ("torchscript", "bf16", "split"),
}


def cpu_description() -> dict:
    """The CPU's model name and its AVX-512 and AMX flags."""
    wanted = sorted(f for f in cpu.cpu_flags() or () if f.startswith(("avx512", "amx")))
    return {"model": cpu.model_name(), "flags": wanted}


def write_split(root: Path, classes: int, images: int, noise: float) -> Path:
    """The test split as a miniImageNet pickle (what evaluate and --calibrate read), once."""
    path = root / PICKLE_TEST
    if path.exists():
        return root
    rng = np.random.default_rng(0)
    data, labels = [], []
    for c in range(classes):
        for _ in range(images):
            image = synthetic_image(rng, c).astype(np.float32)
            mixed = (1 - noise) * image + noise * rng.integers(0, 256, image.shape)
            data.append(mixed.round().clip(0, 255).astype(np.uint8))
            labels.append(80 + c)  # miniImageNet's test classes are 80…99
    root.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    with open(temporary, "wb") as handle:
        pickle.dump({"data": np.stack(data), "labels": labels}, handle, protocol=4)
    temporary.replace(path)
    return root


def cli(*args, json_out: Path | None = None) -> dict | list | None:
    """Run ``dmf-export ARGS`` from this checkout; with ``json_out``, keep its JSON there."""
    command = [sys.executable, "-m", "dmf_export", *map(str, args)]
    print("$ dmf-export " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE if json_out else None)
    if result.returncode not in (0, 1):  # verify exits 1 on a FAIL: its JSON says so
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if json_out is None:
        return None
    json_out.write_text(result.stdout)
    return json.loads(result.stdout)


def export(out: Path, checkpoint: Path, data: Path, name: str) -> None:
    fmt, precision, graph = ARTIFACTS[name]
    if (out / name).exists():
        print(f"have {out / name}", flush=True)
        return
    target = out / name.replace(".encoder", "")
    args = ["export", checkpoint, "-f", fmt, "--precision", precision, "--graph", graph,
            "-o", target, "--no-verify"]
    if precision == "int8":
        args += ["--calibrate", data, "--split", "test"]
    cli(*args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("low-precision"))
    parser.add_argument("--precisions", default="int8,bf16",
                        help="which low precisions to measure (int8: ONNX; bf16: AOTI, TorchScript)")
    parser.add_argument("--episodes", type=int, default=200, help="evaluate's episodes (split pairs)")
    parser.add_argument("--aoti-episodes", type=int, default=40,
                        help="evaluate's episodes for the AOTInductor episode graphs (uncached: "
                             "about 3 s an episode for the pair on 2 cores)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="bench's timed runs per artifact")
    parser.add_argument("--sizes", default="5w1s75q", help="bench's episode sizes")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=20, help="images per class (≥ shot + 15)")
    parser.add_argument("--noise", type=float, default=0.7, help="share of noise in each image")
    parser.add_argument("--redo", action="store_true", help="measure again (exports are still reused)")
    args = parser.parse_args(argv)
    precisions = {p.strip() for p in args.precisions.split(",") if p.strip()}
    if not precisions <= {"int8", "bf16"}:
        parser.error("--precisions: int8, bf16")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"cpu": cpu_description(), "threads": args.threads, "episodes": args.episodes,
                     "sizes": args.sizes}
    print(f"CPU: {summary['cpu']['model']}; flags: {' '.join(summary['cpu']['flags']) or 'none'}", flush=True)

    pickled = write_split(out / f"data-noise{args.noise:g}", args.classes, args.images, args.noise)
    checkpoint = out / "dmf.pth.tar"
    if not checkpoint.exists():
        write_random_checkpoint(checkpoint)  # the demo's: seed 0, G 64, K 1
    names = [n for n, (_, p, _) in ARTIFACTS.items() if p == "fp32" or p in precisions]
    names = [n for n in names if "int8" in precisions or ARTIFACTS[n][0] != "onnx"]
    for name in names:
        export(out, checkpoint, pickled, name)

    def measured(file: str, *command) -> dict | list:
        path = out / file
        if path.exists() and not args.redo:
            print(f"have {path}", flush=True)
            return json.loads(path.read_text())
        return cli(*command, json_out=path)

    summary["verify"] = {}
    for name in names:
        if ARTIFACTS[name][1] != "fp32":
            report = measured(f"verify-{name}.json", "verify", out / name, "--checkpoint", checkpoint, "--json")
            summary["verify"][name] = {
                "passed": report["passed"], "tolerance": report["tolerance"],
                "max_abs": max(r["max_abs"] for r in report["results"]),
                "tolerance_used": max(r["tolerance_used"] or 0 for r in report["results"]),
                "min_agreement": min(r["agreement"] for r in report["results"]),
                "near_ties": sum(r["near_ties"] for r in report["results"])}

    rows = measured("bench.json", "bench", *(out / n for n in names), "--checkpoint", checkpoint,
                    "--sizes", args.sizes, "--threads", args.threads, "--repeats", args.repeats,
                    "--no-eager", "--json")
    summary["bench"] = rows
    medians = {(r["size"], r["kind"], r["name"]): r["median_s"] for r in rows}
    ratios = []
    for size in sorted({r["size"] for r in rows}):
        for name in names:
            fmt, precision, graph = ARTIFACTS[name]
            if precision == "fp32":
                continue
            twin = next(n for n, a in ARTIFACTS.items() if a == (fmt, "fp32", graph))
            kinds = ("artifact", "encoder") if graph == "split" else ("artifact",)
            for kind in kinds:
                mine = _median(medians, size, kind, out / name)
                theirs = _median(medians, size, kind, out / twin)
                if mine and theirs:
                    what = f"{fmt} {graph}" + (" (encoder only)" if kind == "encoder" else "")
                    ratios.append({"size": size, "what": what, "precision": precision,
                                   "median_ms": mine * 1e3, "fp32_median_ms": theirs * 1e3,
                                   "vs_fp32": mine / theirs})
    summary["vs_fp32"] = ratios

    summary["evaluate"] = []
    # split pairs encode each distinct image once (evaluate's feature cache): the full
    # --episodes in minutes; AOTInductor's episode graphs run every episode whole
    pairs = [("dmf.encoder.onnx", "dmf.int8.encoder.onnx", args.episodes),
             ("dmf.encoder.ts", "dmf.bf16.encoder.ts", args.episodes),
             ("dmf.pt2", "dmf.bf16.pt2", args.aoti_episodes)]
    for fp32, low, episodes in pairs:
        if low not in names or not episodes:
            continue
        report = measured(f"evaluate-{low}-{episodes}.json", "evaluate", out / fp32, out / low,
                          "--data", pickled, "--episodes", episodes, "--threads", args.threads,
                          "--no-progress", "--json")
        (first, second), agreement = report["models"], report["agreement"][0]
        summary["evaluate"].append({
            "fp32": fp32, "low": low, "fp32_accuracy": first["accuracy"],
            "low_accuracy": second["accuracy"],
            "accuracy_difference_points": 100 * (second["accuracy"] - first["accuracy"]),
            "query_agreement": agreement["queries_identical"] / agreement["queries"],
            "episodes_identical": agreement["episodes_identical"], "episodes": report["episodes"]})

    (out / "low_precision.json").write_text(json.dumps(summary, indent=2))
    print(f"\nCPU: {summary['cpu']['model']}; flags: {' '.join(summary['cpu']['flags'])}; "
          f"{args.threads} threads")
    for name, v in summary["verify"].items():
        print(f"verify {name}: {'PASS' if v['passed'] else 'FAIL'}, worst abs {v['max_abs']:.2e} "
              f"({v['tolerance_used']:.0%} of the tolerance), min agreement {v['min_agreement']:.0%} "
              f"(+{v['near_ties']} near-ties)")
    for r in ratios:
        print(f"{r['size']} {r['what']:<28} {r['precision']}: {r['median_ms']:8.1f} ms vs fp32 "
              f"{r['fp32_median_ms']:8.1f} ms = {r['vs_fp32']:.2f}×")
    for e in summary["evaluate"]:
        print(f"evaluate {e['low']} vs {e['fp32']}, {e['episodes']} episodes: accuracy "
              f"{100 * e['low_accuracy']:.2f}% vs {100 * e['fp32_accuracy']:.2f}% "
              f"({e['accuracy_difference_points']:+.2f} points), queries agreeing "
              f"{e['query_agreement']:.2%}, episodes identical {e['episodes_identical']}/{e['episodes']}")
    print(f"wrote {out / 'low_precision.json'}")
    return 0


def _median(medians: dict, size: str, kind: str, path: Path) -> float | None:
    """bench names a candidate by its path (an encoder-only row adds a note after it)."""
    for (s, k, name), value in medians.items():
        if s == size and k == kind and name.split(" (")[0] == str(path):
            return value
    return None


if __name__ == "__main__":
    sys.exit(main())
