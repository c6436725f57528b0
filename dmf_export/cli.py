"""The ``dmf-export`` command line: parsing and printing only; the work is in the modules
it imports."""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import click
import torch

from dmf_export import formats, ops
from dmf_export import report as pages
from dmf_export.bench import bench as run_bench
from dmf_export.contract import parse_sizes
from dmf_export.demo import run_demo
from dmf_export.errors import DMFExportError
from dmf_export.data import MAX_WORKERS, PREFETCH_EPISODES
from dmf_export.evaluate import describe, printable
from dmf_export.evaluate import evaluate as run_evaluate
from dmf_export.evaluate import predict as run_predict
from dmf_export.feature_cache import DEFAULT_CAP_MB_MAX, OVERFLOWS
from dmf_export.export import PRECISIONS, SOLVERS, ExportOptions, export_checkpoint, format_options
from dmf_export.formats.base import MAX_THREADS, Option
from dmf_export.triton import TritonServer, serve_forever, write_repository
from dmf_export.triton.remote import DEFAULT_TIMEOUT, MAX_CLIENTS, PROTOCOLS
from dmf_export.tensorrt import plugin as trt_plugin
from dmf_export.verify import describe_ties, verify_artifact


class _Group(click.Group):
    """Turns DMFExportError (and other expected failures) into one line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except DMFExportError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="dmf-export")
@click.pass_context
def main(ctx, debug):
    """Deploy DMF few-shot checkpoints (CVPR 2021) as TorchScript, ONNX, AOTInductor and
    TensorRT artifacts and Triton model repositories, and check them.

    \b
    Typical use:
      dmf-export inspect model.pth.tar
      dmf-export export model.pth.tar --format onnx -o dmf.onnx
      dmf-export verify dmf.onnx --checkpoint model.pth.tar
      dmf-export evaluate model.pth.tar dmf.onnx --data miniImageNet/
      dmf-export export model.pth.tar --format triton -o repo && dmf-export serve repo
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.argument("path", metavar="CHECKPOINT_OR_ARTIFACT", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect(path, as_json):
    """Say what CHECKPOINT_OR_ARTIFACT is, reading it safely (no pickled code runs).

    \b
    A checkpoint: its layout (wrapped, prefix, serialisation), groups, kernel, classes,
    parameters. An artifact (.pt TorchScript, .onnx, .pt2, .engine, a Triton repository):
    its format, graph, precision, image size, export options and the metadata the export
    wrote (ONNX: opsets, inputs and outputs).
    """
    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if info.get("kind") == "checkpoint":
        if info["dataset"] == "unknown":
            info["dataset"] = f"unknown ({info['classes']} classes: not miniImageNet's 64 " \
                              f"nor tieredImageNet's 351)"
        else:
            info["dataset"] = f"{info['dataset']} (by its {info['classes']} classes)"
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            shown = ", ".join(map(str, value))
        elif isinstance(value, dict):
            shown = ", ".join(f"{k}={'×'.join(map(str, v)) if isinstance(v, list) else v}"
                              for k, v in value.items())
        else:
            shown = value
        click.echo(f"{key:<{width}}  {printable(str(shown))}")


def _log(message: str) -> None:
    click.echo(message, err=True)


# -- options several commands share, declared once ---------------------------------------

_provider_option = click.option(
    "--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"]),
    help="onnxruntime execution provider (ONNX artifacts).")
_device_option = click.option(
    "--device", default="cpu", show_default=True,
    help="torch device for the eager model and TorchScript/AOTInductor artifacts (cpu, cuda, cuda:1).")
_threads_option = click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS),
                               help="CPU threads for torch and onnxruntime.")
_checkpoint_option = click.option("--checkpoint", "-c", required=True, type=click.Path(dir_okay=False),
                                  help="The checkpoint the artifacts were exported from (the eager original).")
_cuda_graph_option = click.option("--cuda-graph", is_flag=True,
                                  help="TorchScript/AOTInductor on a GPU: replay each episode from a captured CUDA graph.")
_tf32_option = click.option("--tf32", is_flag=True,
                            help="On a GPU, let fp32 convolutions use TF32 (~5e-3 from the original). Off: IEEE fp32.")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def _server_options(fn):
    """--server/--protocol/--timeout/--clients: talk to Triton servers the user runs."""
    fn = click.option("--clients", default=1, show_default=True, type=click.IntRange(1, MAX_CLIENTS),
                      help="Concurrent requests to the server(s) (each holds one episode in flight).")(fn)
    fn = click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True,
                      type=click.FloatRange(min=0, min_open=True),
                      help="Seconds a request to the server may take before the run ends.")(fn)
    fn = click.option("--protocol", default="http", show_default=True, type=click.Choice(PROTOCOLS),
                      help="How to talk to --server: HTTP/REST or gRPC.")(fn)
    fn = click.option("--server", "servers", multiple=True, metavar="HOST:PORT",
                      help="A running Triton server with a dmf-export repository (repeatable: "
                           "the episodes are spread over the servers).")(fn)
    return fn


def _check_server_options(servers, protocol, timeout, clients) -> None:
    """--protocol, --timeout and --clients say how to talk to --server: refused without one."""
    given = [flag for flag, value, default in (("--protocol", protocol, "http"), ("--timeout", timeout, DEFAULT_TIMEOUT),
                                               ("--clients", clients, 1)) if value != default]
    if given and not servers:
        raise DMFExportError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --server HOST:PORT")


def _cache_options(fn):
    """--feature-cache/--no-feature-cache, --cache-mb, --cache-overflow (evaluate)."""
    fn = click.option("--cache-overflow", default="spill", show_default=True,
                      type=click.Choice(OVERFLOWS),
                      help="Features beyond --cache-mb: written to a memory-mapped file in a "
                           "temporary folder (removed at the end) and read back, or encoded again.")(fn)
    fn = click.option("--cache-mb", type=click.FloatRange(min=0),
                      help="Memory for cached features, MB, shared by the cached models (default: "
                           f"min(25% of available memory, {DEFAULT_CAP_MB_MAX} MB); 84×84 images "
                           "take 0.31 MB each).")(fn)
    fn = click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
                      help="Encode each distinct image once (checkpoints, split exports, servers "
                           "with a split repository) and run the head per episode on its features.")(fn)
    return fn


def _report_option(what: str):
    def check(ctx, param, value):
        if value is not None:  # before minutes of work: matplotlib there, the folder usable
            pages.require_matplotlib()
            pages.check_folder(value)
        return value

    return click.option("--report", "report_dir", type=click.Path(file_okay=False), callback=check,
                        help=f"Also write a report page to this folder: {what} (index.html, its "
                             f"PNGs and the JSON; needs {pages.INSTALL}).")


def _wrote_report(path) -> None:
    _log(f"report: {path}")


def _sizes_option(default: str | None, help: str):
    def parse(ctx, param, value):
        try:
            return parse_sizes(value) if value else None
        except ValueError as err:
            raise click.BadParameter(str(err)) from err

    return click.option("--sizes", default=default, show_default=bool(default), callback=parse, help=help)


def _format_option(option: Option):
    """The export command's flag for an option a format declares (``Format.options``)."""
    types = {"int": click.IntRange(min=option.minimum, max=option.maximum), "text": str, "list": str,
             "number": click.FloatRange(min=option.minimum, max=option.maximum, min_open=option.open_minimum),
             "choice": click.Choice(option.choices), "file": click.Path(dir_okay=False, exists=True),
             "new-file": click.Path(dir_okay=False), "folder": click.Path(file_okay=False)}
    default = ",".join(option.default) if option.kind == "list" else option.default
    return click.option(option.flag, option.name, default=default, show_default=default is not None,
                        type=types[option.kind], help=option.help)


def _format_options(fn):
    for option in reversed(list(format_options().values())):
        fn = _format_option(option)(fn)
    return fn


def _episode_options(way=5, shot=1, queries=75):
    def decorate(fn):
        fn = click.option("--queries", default=queries, show_default=True, type=click.IntRange(min=1),
                          help="Query images per episode (example size; the graph stays dynamic).")(fn)
        fn = click.option("--shot", default=shot, show_default=True, type=click.IntRange(min=1),
                          help="Support images per class (example size).")(fn)
        fn = click.option("--way", default=way, show_default=True, type=click.IntRange(min=1),
                          help="Classes per episode (example size).")(fn)
        return fn
    return decorate


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--format", "-f", "fmt", required=True,
              type=click.Choice(formats.names()), help="Artifact to write.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output path (default: beside the checkpoint, named after it).")
@click.option("--solver", default="rk4", show_default=True, type=click.Choice(SOLVERS),
              help="Fixed-step ODE method the alignment is unrolled with (rk4 = the original).")
@click.option("--steps", default=1, show_default=True, type=click.IntRange(min=1),
              help="Equal steps over t ∈ [0, 1] (1 = the original).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="fp16: a GPU's; bf16 (aoti, torchscript): a CPU's with AMX or AVX-512-BF16; "
                   "int8: ONNX and Triton, calibrated on --calibrate DATA (README).")
@click.option("--graph", default="episode", show_default=True, type=click.Choice(["episode", "split"]),
              help="One episode graph, or an encoder and a head (encode a support set once).")
@click.option("--groups", type=click.IntRange(min=1), help="Override the groups inferred from the weights.")
@click.option("--kernel", type=click.Choice(["1", "3"]), help="Override the kernel inferred from the weights.")
@_episode_options()
@click.option("--image-size", default=84, show_default=True, type=click.IntRange(min=8),
              help="Input height and width.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--verify/--no-verify", "run_verify", default=True, show_default=True,
              help="Check the artifact against the eager model after writing it.")
@_format_options
def export(checkpoint, fmt, output, kernel, run_verify, **options):
    """Export CHECKPOINT as a TorchScript, ONNX, AOTInductor or TensorRT artifact, or a
    Triton Inference Server model repository.

    Every file of one export lands, or none does; existing files are kept unless --force.

    \b
    Examples:
      dmf-export export model.pth.tar -f onnx
      dmf-export export model.pth.tar -f torchscript -o dmf.ts
      dmf-export export model.pth.tar -f onnx --graph split --precision fp16
      dmf-export export model.pth.tar -f aoti            # → model.pt2 (torch.export + AOTInductor)
      dmf-export export model.pth.tar -f triton -o repo  # a Triton model repository
      dmf-export export model.pth.tar -f tensorrt --precision fp16 --max-queries 100
      dmf-export export model.pth.tar -f aoti --precision bf16   # → model.bf16.pt2
    """
    for name, option in format_options().items():
        if option.kind == "list":
            options[name] = tuple(v.strip() for v in options[name].split(",") if v.strip())
    opts = ExportOptions(format=fmt, output=output, kernel=int(kernel) if kernel else None, **options)
    written = export_checkpoint(checkpoint, opts, log=_log)
    for item in written:
        click.echo(f"wrote {item.path} ({item.size_mb:.1f} MB, {item.seconds:.1f} s)")
    if not run_verify:
        return
    cannot_run, run = formats.get(fmt).verification(opts)
    if cannot_run:
        _log(f"skipping verify: {cannot_run}")
        return
    if not _run_verify(str(written[0].path), checkpoint, **run):
        sys.exit(1)


def _run_verify(artifact, checkpoint, as_json=False, report_dir=None, **kwargs) -> bool:
    if not as_json:
        what = artifact or " and ".join(kwargs.get("servers") or ()) or "nothing"
        _log(f"verifying {what} against the eager model")
    report = verify_artifact(artifact, checkpoint, log=(lambda _: None) if as_json else _log, **kwargs)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        tol = report.tolerance
        ties = describe_ties(sum(r.near_ties for r in report.results))
        verdict = "PASS" if report.passed else "FAIL"
        click.echo(f"{verdict}: {report.backend} {report.precision}, {len(report.results)} episode sizes, "
                   f"worst abs {max(r.max_abs for r in report.results):.2e}, "
                   f"min agreement {min(r.agreement for r in report.results):.0%}{ties} "
                   f"(rtol {tol.rtol:g}, atol {tol.atol:g}; agreement ≥ {tol.min_agreement:.0%}, "
                   f"near-ties counted as agreeing)")
    if report_dir is not None:
        _wrote_report(pages.write_verify_report(report_dir, report.to_dict()))
    return report.passed


@main.command()
@click.argument("artifact", type=click.Path(), required=False)
@_checkpoint_option
@_server_options
@_provider_option
@_device_option
@_sizes_option(None, "Episode sizes, e.g. 5w1s10q,3w2s4q (default: a spread of sizes).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the first random episode.")
@click.option("--rtol", type=float, help="Relative tolerance (default: the artifact's precision's, "
              "README's table).")
@click.option("--atol", type=float, help="Absolute tolerance (default: the artifact's precision's).")
@_cuda_graph_option
@_tf32_option
@_json_option
@_report_option("the error per episode size against the tolerance")
def verify(artifact, checkpoint, servers, protocol, timeout, clients, provider, device, sizes, seed, rtol,
           atol, cuda_graph, tf32, as_json, report_dir):
    """Run ARTIFACT (or the Triton servers at --server) and the eager model on the same
    seeded episodes and compare.

    \b
    Exits 1 when any episode is outside the tolerances.
    Example, against a running server (a dmf-export repository):
      dmf-export verify -c model.pth.tar --server gpu1:8000 --server gpu2:8000 --clients 4
    """
    _check_server_options(servers, protocol, timeout, clients)
    if servers and (provider != "cpu" or device != "cpu" or cuda_graph or tf32):
        raise DMFExportError("--provider, --device, --cuda-graph and --tf32 choose how an ARTIFACT runs "
                             "here; with --server the server runs it")
    ok = _run_verify(artifact, checkpoint, as_json=as_json, report_dir=report_dir, provider=provider,
                     device=device, sizes=sizes, seed=seed, rtol=rtol, atol=atol,
                     cuda_graph=cuda_graph, tf32=tf32, servers=servers, protocol=protocol,
                     timeout=timeout, clients=clients)
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("artifacts", nargs=-1, type=click.Path())
@_checkpoint_option
@_sizes_option("5w1s75q", "Episode sizes, comma-separated.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed runs of each episode per candidate (after one warm-up).")
@_threads_option
@click.option("--no-eager", is_flag=True, help="Do not time the eager original (it is slow on a CPU).")
@click.option("--no-backbone", is_flag=True, help="Do not time the eager backbone alone.")
@_provider_option
@_device_option
@_cuda_graph_option
@_tf32_option
@_server_options
@_json_option
@_report_option("latency per candidate and episode size, ratios, peak memory")
def bench(artifacts, checkpoint, sizes, repeats, threads, no_eager, no_backbone, provider, device,
          cuda_graph, tf32, servers, protocol, timeout, clients, as_json, report_dir):
    """Per-episode latency (min/median) and peak memory of the eager model and of
    ARTIFACTS, side by side on the same episodes.

    \b
    The eager backbone and the encoder of a split export (pass its .encoder. file) are
    also timed alone on the episode's S + Q images: the floor an episode graph can reach.
    Each artifact's median is divided by the eager backbone's (÷ backbone) and by the
    encoder of the same format and precision, when one is among ARTIFACTS (÷ encoder).
    With --server, the Triton servers the user runs are one more candidate ("triton @
    host:port"), --clients requests in flight at once: its episodes/s is their throughput.
    Examples:
      dmf-export bench m.onnx m.encoder.onnx m.ts -c m.pth.tar --sizes 5w1s75q,5w5s75q --threads 2
      dmf-export bench -c m.pth.tar --server gpu1:8000 --server gpu2:8000 --clients 8 --no-eager
    """
    _check_server_options(servers, protocol, timeout, clients)
    rows = run_bench(checkpoint, artifacts, sizes, repeats=repeats, eager=not no_eager,
                     backbone=not no_backbone, provider=provider, device=device, threads=threads,
                     cuda_graph=cuda_graph, tf32=tf32, servers=servers, protocol=protocol,
                     timeout=timeout, clients=clients, log=(lambda _: None) if as_json else _log)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        _print_timings(rows)
    if report_dir is not None:
        _wrote_report(pages.write_bench_report(report_dir, [dataclasses.asdict(r) for r in rows]))


def _print_timings(rows) -> None:
    gpu = any(r.gpu_peak_mb is not None for r in rows)
    lower = any(r.vs_fp32 is not None for r in rows)  # a bf16/fp16/int8 artifact beside its fp32 twin
    click.echo(f"{'episode':<9} {'what':<40} {'min ms':>8} {'median ms':>9} {'vs eager':>8} "
               f"{'÷ backbone':>10} {'÷ encoder':>9}" + (f" {'÷ fp32':>7}" if lower else "")
               + f" {'peak MB':>7}" + (f" {'GPU MB':>7}" if gpu else ""))
    ratio = lambda v, fmt: format(v, fmt) if v else ""  # noqa: E731
    for r in rows:
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "?"
        gpu_peak = f" {r.gpu_peak_mb:>7.0f}" if gpu and r.gpu_peak_mb is not None else ""
        click.echo(f"{r.size:<9} {r.name[-40:]:<40} {r.min_s * 1e3:>8.1f} {r.median_s * 1e3:>9.1f} "
                   f"{ratio(r.speedup, '.2f') + ('×' if r.speedup else ''):>8} "
                   f"{ratio(r.vs_backbone, '.3f'):>10} {ratio(r.vs_encoder, '.3f'):>9}"
                   + (f" {ratio(r.vs_fp32, '.3f'):>7}" if lower else "") + f" {peak:>7}{gpu_peak}")
    click.echo("vs eager: eager median ÷ this one; ÷ backbone: this median ÷ the eager backbone's; "
               "÷ encoder: this median ÷ its format's split encoder alone (the floor)"
               + ("; ÷ fp32: this median ÷ its fp32 twin's (the same format)." if lower else "."))
    for r in rows:
        if r.episodes_per_s is not None:
            click.echo(f"{r.size} {r.name}: {r.episodes_per_s:.2f} episodes/s with {r.clients} "
                       f"request{'s' if r.clients != 1 else ''} in flight")


@main.command()
@click.option("--out", "out_dir", default="dmf-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo checkpoint and artifacts.")
@click.option("--groups", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--kernel", default="1", show_default=True, type=click.Choice(["1", "3"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--queries", default=15, show_default=True, type=click.IntRange(min=1),
              help="Queries per benchmark episode (5-way 1-shot).")
def demo(out_dir, groups, kernel, seed, queries):
    """The whole job on an embedded default: a seeded checkpoint with RANDOM weights in the
    original layout, exported to every format this machine supports, verified, timed.

    With matplotlib (pip install 'dmf-export[report]') it also writes a report page beside
    the artifacts, OUT/report/index.html, and prints its path as the last line."""
    if not run_demo(Path(out_dir), groups=groups, kernel=int(kernel), seed=seed, queries=queries,
                    log=_log, echo=click.echo):
        sys.exit(1)


@main.command("op-library")
def op_library():
    """Build dmf::deform_conv2d if needed and print its library's path (last line).

    \b
    A C++ program loads it (dlopen) before torch::jit::load of a TorchScript artifact or
    torch::inductor::AOTIModelPackageLoader of an AOTInductor package: examples/cpp/.
    """
    build_info = ops.require()
    _log(f"dmf::deform_conv2d for torch {torch.__version__}"
         f"{' with CUDA' if build_info.with_cuda else ' (CPU only: ' + str(build_info.without_cuda_reason) + ')'}")
    click.echo(str(build_info.library))


@main.command("build-plugin")
@click.option("--tensorrt-root", type=click.Path(file_okay=False),
              help="TensorRT install or include folder (default $TENSORRT_ROOT, then the usual system paths).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Build folder (default: a cache folder keyed by the sources, TensorRT and CUDA).")
def build_plugin(tensorrt_root, out_dir):
    """Build the TensorRT plugin library (DMFDeformConv2d) and print its path (last line).

    \b
    Needs TensorRT's headers, a CUDA toolkit (nvcc; CUDA_HOME) and a C++ compiler; no GPU.
    Load the library with tensorrt.get_plugin_registry().load_library(PATH) or
    trtexec --dynamicPlugins=PATH.
    """
    click.echo(str(trt_plugin.build_plugin(tensorrt_root, out_dir, log=_log)))


# -- evaluate and predict: accuracy on a dataset, answers for image files ---------------

def _runner_options(fn):
    fn = _threads_option(fn)
    fn = _device_option(fn)
    fn = _provider_option(fn)
    fn = click.option("--image-size", type=click.IntRange(min=1),
                      help="The image size a checkpoint runs at (default 84; 32 with --cifar). "
                           "Images of any other size are refused, as an artifact refuses images "
                           "not of its exported size.")(fn)
    fn = click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
                      help=f"Threads decoding and preprocessing images (at most {MAX_WORKERS} run). "
                           f"Memory does not grow with it: {PREFETCH_EPISODES} episodes are "
                           "decoded ahead whatever the count (about 7 MB each at 84×84, 5-way "
                           "1-shot, 15 queries).")(fn)
    fn = click.option("--cifar", is_flag=True,
                      help="CIFAR-FS's test transform: its mean/std, and no resize or crop.")(fn)
    return fn


@main.command()
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--data", "data_root", required=True, type=click.Path(file_okay=False),
              help="Dataset root: the miniImageNet pickles, or {train,val,test}/<class>/<image>.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Which split (the original's test.py evaluates val unless --phase test).")
@click.option("--episodes", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Episodes to evaluate (the original's test.py: 2000). Drawn as they are "
                   "consumed: any count starts at once, in bounded memory.")
@click.option("--way", default=5, show_default=True, type=click.IntRange(min=1),
              help="Classes per episode.")
@click.option("--shot", default=1, show_default=True, type=click.IntRange(min=1),
              help="Support images per class.")
@click.option("--queries-per-class", default=15, show_default=True, type=click.IntRange(min=1),
              help="Query images per class (the original: 15, so 75 queries a 5-way episode).")
@click.option("--layout", type=click.Choice(["pickle", "folders"]),
              help="Dataset layout (default: detected).")
@click.option("--seed", default=112, show_default=True, type=int,
              help="Seed of the episode sampler (112: the original's).")
@click.option("--all-images", is_flag=True,
              help="Image folders: read every image file, not only names containing '.jpg' "
                   "(the original's rule; changes the episodes where other files exist).")
@_runner_options
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr (default on): a bar on a terminal, otherwise a line "
                   "every 10 s with the rate and the time left.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report with per-episode figures.")
@_report_option("accuracy, per-class accuracy, confusion matrix, the hardest queries as pictures, "
                "where models disagree")
@_cache_options
@_server_options
def evaluate(models, data_root, split, episodes, way, shot, queries_per_class, layout, seed,
             all_images, cifar, workers, image_size, provider, device, threads, progress, as_json,
             report_dir, feature_cache, cache_mb, cache_overflow, servers, protocol, timeout, clients):
    """The original's test protocol on each of MODELS (checkpoints run eagerly, or any
    artifact): prints test.py's `Accuracy: …%, ci95: …%` for each.

    \b
    Episodes are drawn as the original draws them (Python's random seeded 112). Given
    several models, every one sees the same episodes, and each is compared with the first.
    Memory: the dataset's index (a pickle split: its whole array), the models, and
    8 decoded episodes; the per-episode figures for the report add ~1 KB an episode.
    Examples:
      dmf-export evaluate 1shot.pth.tar --data miniImageNet_pickle
      dmf-export evaluate 5shot.pth.tar 5shot.onnx --data tiered_imagenet --shot 5 --threads 8
      dmf-export evaluate --server gpu1:8000 --server gpu2:8000 --clients 4 --data mini

    \b
    Checkpoints, split exports (--graph split) and servers with a split repository encode
    each distinct image once and run the head per episode on the cached features (their
    first episode is also run uncached and must give the same scores to the bit, else that
    model runs uncached and says why). Whole-episode artifacts run uncached.
    With --server, MODELS is empty: the served models are evaluated; a failure mid-run
    ends in one line, and --json still reports the episodes completed so far.
    """
    _check_server_options(servers, protocol, timeout, clients)
    report = run_evaluate(models, data_root, split=split, layout=layout, episodes=episodes, way=way,
                          shot=shot, queries_per_class=queries_per_class, seed=seed, cifar=cifar,
                          all_images=all_images, provider=provider, device=device, threads=threads,
                          workers=workers, progress=progress, image_size=image_size,
                          cache=feature_cache, cache_mb=cache_mb, cache_overflow=cache_overflow,
                          servers=servers, protocol=protocol, timeout=timeout, clients=clients,
                          log=(lambda _: None) if as_json else _log)
    figures = report.to_dict() if as_json or report_dir is not None else None
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    elif report.episode_classes:
        _print_accuracy(report)
    if report_dir is not None and report.error is None:
        _wrote_report(pages.write_evaluation_report(report_dir, figures, report.pixels))
    if report.error is not None:
        raise DMFExportError(f"{report.error} (after {len(report.episode_classes)} of "
                             f"{report.episodes} episodes)")


def _print_accuracy(report) -> None:
    width = max(len(r.path) for r in report.models)
    backend_width = max(len(r.backend) for r in report.models) + 2
    for result in report.models:
        prefix = (f"{result.path:<{width}}  {'(' + result.backend + ')':<{backend_width}}  "
                  if len(report.models) > 1 else "")
        click.echo(prefix + result.line())
    for agreement in report.agreements():
        where = (f" (episode {agreement.largest_episode})"
                 if agreement.largest_episode is not None else "")
        click.echo(f"{agreement.model} vs {agreement.reference}: predictions identical in "
                   f"{agreement.episodes_identical}/{report.episodes} episodes "
                   f"({agreement.queries_identical}/{agreement.queries} queries); accuracy "
                   f"differs by {100 * agreement.accuracy_difference:.2f} points overall, at most "
                   f"{100 * agreement.largest_episode_difference:.2f} in an episode{where}")
    run = report.wall_seconds - report.setup_seconds
    _log(f"{report.episodes} episodes in {run:.1f} s ({report.episodes / run:.2f} episodes/s; "
         f"setup {report.setup_seconds:.1f} s); decoding and preprocessing "
         f"{report.data_seconds / run:.1%} of that, waited for {report.data_wait_seconds / run:.1%}")


@main.command()
@click.argument("artifact", type=click.Path(), required=False)
@click.argument("queries", nargs=-1, type=click.Path())
@click.option("--support", "support_dir", required=True, type=click.Path(file_okay=False),
              help="Support folder: DIR/<class>/<images>, any number of images per class.")
@_runner_options
@_json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV: query, class, a score per class.")
@click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
              help="Encode the support once and each query once, and run the head per "
                   "75 queries (checkpoints, split exports, servers with a split repository).")
@_server_options
def predict(artifact, queries, support_dir, cifar, workers, image_size, provider, device, threads,
            as_json, as_csv, feature_cache, servers, protocol, timeout, clients):
    """Classify each of QUERIES (image files, or folders of them) against the classes of
    the support folder, with ARTIFACT (a checkpoint or any artifact), or with the models
    served at --server (then no ARTIFACT: every argument is a query).

    \b
    Images go through the image-folder preprocessing (Resize 92, CenterCrop 84, ImageNet
    mean/std; --cifar: CIFAR-FS's). A class's prototype is the mean of its images' features.
    Examples:
      dmf-export predict dmf.onnx --support my_classes/ photos/ extra.jpg --csv
      dmf-export predict --server gpu1:8000 --support my_classes/ photos/
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    _check_server_options(servers, protocol, timeout, clients)
    if clients > 1:
        raise DMFExportError("predict sends one request at a time: --clients applies to evaluate, "
                             "verify and bench")
    if servers and artifact is not None:
        queries = (artifact, *queries)  # with --server there is no ARTIFACT: all are queries
        artifact = None
    if not queries:
        raise click.UsageError("give the query images (files or folders) to classify")
    result = run_predict(artifact, support_dir, queries, cifar=cifar, provider=provider,
                         device=device, threads=threads, workers=workers, image_size=image_size,
                         cache=feature_cache, servers=servers, protocol=protocol, timeout=timeout,
                         log=_log)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    rows = result.rows()
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerows(rows)
        return
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                             for i, (cell, width) in enumerate(zip(row, widths))).rstrip())

@main.command()
@click.argument("repo_or_artifact", type=click.Path(exists=True))
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP/REST (KServe v2) port; 0 picks a free one.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port; 0 picks a free one.")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535),
              help="Prometheus metrics port; 0 picks a free one.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--server-env", type=click.Path(file_okay=False),
              help="Virtual environment holding nvidia-pytriton, numpy < 2 and onnxruntime, whose "
                   "Python runs the python backend (default $DMF_TRITON_ENV, else this one).")
@click.option("--model", "models", multiple=True, help="Load only this model (repeatable).")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS),
              help="onnxruntime threads per instance, when serving an .onnx artifact.")
def serve(repo_or_artifact, http_port, grpc_port, metrics_port, host, server_env, models, threads):
    """Serve a Triton model repository (or one .onnx artifact) with a real Triton server.

    \b
    The tritonserver binary and python backend of the nvidia-pytriton wheel
    (pip install 'dmf-export[serve]'); models whose backend the server lacks (the
    wheel has no onnxruntime backend) are skipped, and said so. Runs until Ctrl-C or
    SIGTERM, then stops the server and its stub processes.
    """
    path = Path(repo_or_artifact)
    with tempfile.TemporaryDirectory(prefix="dmf-serve-") as scratch:
        if path.is_file():
            repo = Path(scratch) / "repo"
            write_repository(repo, {path: formats.read_info(path)}, threads=threads)
        else:
            repo = path
        server = TritonServer(repo, http_port=http_port or None, grpc_port=grpc_port or None,
                              metrics_port=metrics_port or None, host=host, server_env=server_env,
                              models=list(models) or None)
        serve_forever(server, echo=click.echo)
