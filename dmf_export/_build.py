"""Builds and loads the dmf::deform_conv2d library (csrc/) on first use.

The library is compiled with ninja through ``torch.utils.cpp_extension.load`` into a cache
folder (``$DMF_EXPORT_CACHE``, else ``~/.cache/dmf_export``) whose name is a hash of
everything the binary depends on: the torch version and its CUDA version, the Python
ABI, the platform, the compiler, the flags, whether the CUDA sources are included and the
contents of every source file. A library built for another PyTorch, or from other
sources, is therefore never loaded; a matching one loads without running the build.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from dmf_export.errors import DMFExportError
from dmf_export.paths import source_dir

_SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
_CXX_FLAGS = ["-O3"]
_CUDA_FLAGS = ["-O3"]
# sm_80 code also runs on 8.6/8.9; PTX of 9.0 is JIT-compiled for newer GPUs.
# TORCH_CUDA_ARCH_LIST, when set, replaces this (PyTorch's own handling).
_DEFAULT_CUDA_ARCHS = ("80", "90")
_STALE_LOCK_SECONDS = 15 * 60  # a build takes about a minute


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    library: Path
    with_cuda: bool
    without_cuda_reason: str | None  # why the CUDA sources were left out (None with CUDA)


def _cache_root() -> Path:
    root = os.environ.get("DMF_EXPORT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dmf_export"


def _is_cuda_toolkit(home: str | os.PathLike | None) -> bool:
    if not home:
        return False
    nvcc = Path(home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    return nvcc.is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file()


def _cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME / $CUDA_PATH, the one around the nvcc on
    PATH, or /usr/local/cuda; the first that has bin/nvcc and include/cuda_runtime.h. (Not
    torch's own guess, which takes /usr/local when /usr/local/bin/nvcc is a wrapper script,
    and which logs a warning on import when no GPU is present.)"""
    nvcc = shutil.which("nvcc")
    candidates = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  Path(nvcc).resolve().parent.parent if nvcc else None, "/usr/local/cuda")
    return next((str(home) for home in candidates if _is_cuda_toolkit(home)), None)


def _cuda_decision() -> tuple[bool, str | None]:
    """Whether to compile the CUDA sources, and if not, why."""
    if os.environ.get("DMF_EXPORT_NO_CUDA", "") not in ("", "0"):
        return False, "DMF_EXPORT_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if _cuda_home() is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)"
    return True, None


def _cuda_arch_flags() -> list[str]:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # PyTorch turns the list into -gencode flags
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in _DEFAULT_CUDA_ARCHS]
    last = _DEFAULT_CUDA_ARCHS[-1]
    return flags + [f"-gencode=arch=compute_{last},code=compute_{last}"]


def _sources(csrc: Path, with_cuda: bool) -> tuple[list[Path], list[Path]]:
    """(files to compile, every file whose contents the binary depends on)."""
    every = sorted(p for p in csrc.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file())
    compiled = [p for p in every if p.parent.name in ("kernels", "torch")
                and (p.suffix == ".cpp" or (with_cuda and p.suffix == ".cu"))]
    return compiled, every


def _build_key(csrc: Path, every: list[Path], with_cuda: bool, cuda_flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (
        torch.__version__, str(torch.version.cuda), sys.version, sys.abiflags,
        str(sysconfig.get_config_var("SOABI")), sys.implementation.cache_tag,
        platform.system(), platform.machine(), f"cuda={with_cuda}",
        os.environ.get("CXX", "c++"), os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
        str(_cuda_home()) if with_cuda else "",
        " ".join(_CXX_FLAGS), " ".join(_CUDA_FLAGS + cuda_flags),
    ):
        h.update(part.encode() + b"\0")
    for path in every:
        h.update(path.relative_to(csrc).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def load() -> BuildInfo:
    """Load the op library for this torch, building it first when no cached build matches."""
    with_cuda, reason = _cuda_decision()
    csrc = source_dir("csrc")
    compiled, every = _sources(csrc, with_cuda)
    cuda_flags = _cuda_arch_flags() if with_cuda else []
    name = f"dmf_ops_{_build_key(csrc, every, with_cuda, cuda_flags)}"
    build_dir = _cache_root() / name
    library = build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    stamp = build_dir / "built.ok"  # written only after a complete build, so a partial one is never loaded
    info = BuildInfo(library, with_cuda, reason)

    if stamp.is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return info

    compiler = os.environ.get("CXX", "c++")
    if shutil.which((shlex.split(compiler) or [""])[0]) is None:
        raise DMFExportError(
            f"no C++ compiler found ('{compiler}'); dmf::deform_conv2d is compiled on first "
            "use: install g++ (or clang) or point CXX at one")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise DMFExportError("ninja not found; dmf::deform_conv2d is compiled on first use: "
                             "pip install ninja")
    print(f"building dmf::deform_conv2d for torch {torch.__version__}"
          f"{' with CUDA' if with_cuda else ''} (first use, about a minute)…",
          file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"  # PyTorch's build lock; one left by a killed build would block forever
    if lock.is_file() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    torch_cuda_home = cpp_extension.CUDA_HOME
    if with_cuda:
        cpp_extension.CUDA_HOME = _cuda_home()  # where the build looks for nvcc and headers
    try:
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in compiled],
            extra_cflags=list(_CXX_FLAGS),
            extra_cuda_cflags=list(_CUDA_FLAGS) + cuda_flags,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=bool(os.environ.get("DMF_EXPORT_BUILD_VERBOSE")),
        )
    except (RuntimeError, OSError, ImportError) as error:
        log = build_dir / "build.log"
        log.write_text(str(error))
        raise DMFExportError(f"building dmf::deform_conv2d failed in {build_dir} "
                             f"(compiler output in {log})") from error
    finally:
        cpp_extension.CUDA_HOME = torch_cuda_home
    stamp.write_text(f"{torch.__version__}\n")
    return info
