"""``dmf-export demo``: the whole job on a seeded checkpoint with random weights."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from dmf_export import formats
from dmf_export.bench import bench
from dmf_export.contract import EpisodeSize
from dmf_export.errors import DMFExportError
from dmf_export.export import ExportOptions, export_checkpoint
from dmf_export.report import write_demo_report
from dmf_export.synthetic import write_random_checkpoint, write_synthetic_split
from dmf_export.verify import verify_artifact


def supported_formats() -> tuple[list[str], dict[str, str]]:
    """(formats this machine writes and runs, {format: why not} for the others)."""
    usable, skipped = [], {}
    for fmt in formats.all_formats():
        reason = fmt.unavailable()
        if reason:
            skipped[fmt.name] = reason
        else:
            usable.append(fmt.name)
    return usable, skipped


def run_demo(out_dir: Path, *, groups: int = 64, kernel: int = 1, seed: int = 0, queries: int = 15,
             log: Callable[[str], None] = print, echo: Callable[[str], None] = print) -> bool:
    """Export, verify and time every format this machine supports; the last line echoed is
    the path of the report page (out_dir/report/index.html) when matplotlib is installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "dmf_random.pth.tar"
    write_random_checkpoint(checkpoint, groups=groups, kernel=kernel, seed=seed)
    log(f"wrote {checkpoint}: RANDOM weights (seed {seed}) in the original training code's layout, "
        f"groups {groups}, kernel {kernel}; it classifies nothing, it exercises the pipeline")

    rows = []
    size = EpisodeSize(5, 1, queries)
    usable, skipped = supported_formats()
    for fmt, reason in skipped.items():
        log(f"skipping {fmt}: {reason}")
    for fmt in usable:
        opts = ExportOptions(format=fmt, output=str(out_dir / "dmf.fp32"), force=True, queries=queries)
        written = export_checkpoint(str(checkpoint), opts, log=log)[0]
        log(f"verifying {written.path.name}")
        report = verify_artifact(str(written.path), str(checkpoint), log=log)
        rows.append([fmt, written, report])
    if "onnx" in usable:
        # int8 needs images to calibrate on: a small synthetic split (80 pictures) stands in
        calibration = write_synthetic_split(out_dir / "calibration", classes=5, images=16)
        opts = ExportOptions(format="onnx", output=str(out_dir / "dmf.int8"), force=True, queries=queries,
                             precision="int8", calibrate=str(calibration), calib_episodes=1)
        written = export_checkpoint(str(checkpoint), opts, log=log)[0]
        log(f"verifying {written.path.name}")
        report = verify_artifact(str(written.path), str(checkpoint), log=log)
        rows.append(["onnx int8", written, report])

    log(f"timing a {size} episode (eager original vs artifacts, {torch.get_num_threads()} threads)")
    timings = bench(str(checkpoint), [str(r[1].path) for r in rows], [size], repeats=3, backbone=False,
                    log=log)
    by_name = {t.name: t for t in timings}
    eager = by_name["eager"]

    echo("")
    echo(f"{'format':<12} {'file':<28} {'MB':>6} {'export s':>9} {'parity':>7} {'worst abs':>10} "
         f"{'ms/episode':>11} {'vs eager':>9}")
    echo(f"{'eager':<12} {'(models/, torchdiffeq rk4)':<28} {'':>6} {'':>9} {'':>7} {'':>10} "
         f"{eager.median_s * 1e3:>11.1f} {'1.00×':>9}")
    ok = True
    for fmt, written, report in rows:
        t = by_name[str(written.path)]
        ok &= report.passed
        echo(f"{fmt:<12} {written.path.name:<28} {written.size_mb:>6.1f} {written.seconds:>9.1f} "
             f"{'PASS' if report.passed else 'FAIL':>7} {max(r.max_abs for r in report.results):>10.1e} "
             f"{t.median_s * 1e3:>11.1f} {t.speedup:>8.2f}×")
    for fmt, reason in skipped.items():
        echo(f"{fmt:<12} skipped: {reason}")
    echo(f"\nartifacts in {out_dir}/ (episode: {size}, image 84×84, scores [Q, way])")
    try:
        page = write_demo_report(out_dir / "report", [r[2].to_dict() for r in rows],
                                 [dataclasses.asdict(t) for t in timings])
    except DMFExportError as err:  # matplotlib missing (the report extra): the demo still ran
        log(f"no report page: {err}")
    else:
        echo(str(page))  # the last line: the report page, to open in a browser
    return ok
