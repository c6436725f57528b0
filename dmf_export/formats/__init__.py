"""The artifact formats: one module each, listed once here.

``export``, ``verify``, ``bench``, ``evaluate`` and ``demo`` read this registry only;
adding a format is one module with a ``FORMAT`` (a ``base.Format``, declaring its options
and verify policy) and one line in ``_MODULES``.
"""
from __future__ import annotations

from pathlib import Path

from dmf_export import sniff
from dmf_export.contract import ArtifactInfo
from dmf_export.errors import DMFExportError, summarize
from dmf_export.formats import aoti, onnx, tensorrt, torchscript, triton
from dmf_export.formats.base import Format, Runner, RunOptions, Staging, Written  # noqa: F401

# in the order summaries list them
_MODULES = (torchscript, onnx, aoti, tensorrt, triton)
_REGISTRY: dict[str, Format] = {module.FORMAT.name: module.FORMAT for module in _MODULES}


def names() -> list[str]:
    return list(_REGISTRY)


def all_formats() -> list[Format]:
    return list(_REGISTRY.values())


def get(name: str) -> Format:
    fmt = _REGISTRY.get(name)
    if fmt is None:
        raise DMFExportError(f"unknown format {name!r}; choose from {', '.join(names())}")
    return fmt


def for_path(path: Path) -> Format:
    """The format a file is, by its name (``x.onnx``, ``x.encoder.pt2``, …)."""
    path = Path(path)
    for fmt in _REGISTRY.values():
        if fmt.claims(path):
            return fmt
    known = sorted({s for f in _REGISTRY.values() for s in (f.suffix, *f.read_suffixes)})
    raise DMFExportError(f"{path}: unknown artifact type {path.suffix or '(no suffix)'!r} "
                         f"(expected {', '.join(known)}, or a Triton model repository folder)")


# what the first bytes of each format's file may look like (sniff.kind_of); a file
# sniffed as anything else is named as what it is
_KINDS_OF = {"torchscript": (sniff.TORCHSCRIPT, sniff.TORCH_ZIP), "aoti": (sniff.AOTI,),
             "onnx": (sniff.ONNX,), "tensorrt": ()}


def _content_kind(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return sniff.kind_of(path)
    except OSError:
        return None


def read_info(path) -> ArtifactInfo:
    """What an artifact says about itself, or one line saying why it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise DMFExportError(f"{path}: no such file")
    fmt = for_path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DMFExportError(f"{path}: the file is empty")
    try:
        info = fmt.read_info(path)
    except DMFExportError:
        raise
    except Exception as err:  # truncated, foreign or damaged: say what it is, else the library's words
        kind = _content_kind(path)
        if kind is not None and kind not in _KINDS_OF.get(fmt.name, ()):
            raise DMFExportError(f"{path} is {kind}, not {sniff.article(fmt.title)} artifact "
                                 f"(its name says {fmt.name})") from err
        raise DMFExportError(f"{path}: cannot read it as {sniff.article(fmt.title)} artifact "
                             f"({summarize(err)})") from err
    if info.format != fmt.name:
        raise DMFExportError(f"{path}: says it is a {info.format!r} artifact, but its name says {fmt.name}")
    return info


def open_artifact(path, provider: str = "cpu", device: str = "cpu", threads: int | None = None, *,
                  cuda_graph: bool = False, tf32: bool = False, plugin: str | None = None) -> Runner:
    """A runner for the artifact at ``path``: ``runner(support, support_labels, query) -> scores``.

    A split export is opened by its encoder's path (the head is found beside it).
    ``cuda_graph``/``tf32`` apply to torch-based formats on a GPU, ``plugin`` to TensorRT.
    """
    path = Path(path)
    info = read_info(path)
    fmt = get(info.format)
    run = RunOptions(provider=provider, device=device, threads=threads, cuda_graph=cuda_graph,
                     tf32=tf32, plugin=plugin)
    for flag in ("cuda_graph", "tf32", "plugin"):
        if getattr(run, flag) and flag not in fmt.run_flags:
            users = [f.name for f in all_formats() if flag in f.run_flags]
            raise DMFExportError(f"{path}: --{flag.replace('_', '-')} applies to {' and '.join(users)} "
                                 f"artifacts, not {fmt.name}")
    try:
        return fmt.open(path, info, run)
    except DMFExportError:
        raise
    except Exception as err:
        raise DMFExportError(f"{path}: cannot load it as {sniff.article(fmt.title)} artifact ({summarize(err)})") from err
