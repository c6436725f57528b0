"""Builds and loads the dmf::deform_conv2d library (csrc/).

The library is compiled with ninja through ``torch.utils.cpp_extension.load`` into a
folder of the build cache (``toolchain.cache_root()``) whose name is a hash of everything
the binary depends on: the torch version and its CUDA version, the Python ABI, the
platform, the compiler, the flags (GPU architectures included), whether the CUDA sources
are included and the contents of every source file. A library built for another
PyTorch, or from other sources, is therefore never loaded; a matching one loads without
running the build.

``load_built`` loads a matching library if one is there and never compiles (what
``import dmf_export`` does); ``load`` builds it first when needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import sys
import sysconfig
from pathlib import Path

import torch

from dmf_export import toolchain
from dmf_export.errors import DMFExportError
from dmf_export.paths import source_dir

_SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
_CXX_FLAGS = ["-O3"]
_CUDA_FLAGS = ["-O3"]


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    library: Path
    with_cuda: bool
    without_cuda_reason: str | None  # why the CUDA sources were left out (None with CUDA)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a build for this torch and these sources is, before anything is compiled."""

    info: BuildInfo
    name: str
    compiled: list[Path]
    cuda: toolchain.CudaToolkit | None
    cuda_flags: list[str]

    @property
    def build_dir(self) -> Path:
        return self.info.library.parent

    @property
    def stamp(self) -> Path:  # written only after a complete build, so a partial one is never loaded
        return self.build_dir / "built.ok"

    def is_built(self) -> bool:
        return self.stamp.is_file() and self.info.library.is_file()


def _cuda_decision() -> tuple[toolchain.CudaToolkit | None, str | None]:
    """The toolkit to compile the CUDA sources with, or (None, why not)."""
    if os.environ.get("DMF_EXPORT_NO_CUDA", "") not in ("", "0"):
        return None, "DMF_EXPORT_NO_CUDA is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    cuda = toolchain.find_cuda()
    if cuda is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)"
    return cuda, None


def _sources(csrc: Path, with_cuda: bool) -> tuple[list[Path], list[Path]]:
    """(files to compile, every file whose contents the binary depends on)."""
    every = sorted(p for p in csrc.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file())
    compiled = [p for p in every if p.parent.name in ("kernels", "torch")
                and (p.suffix == ".cpp" or (with_cuda and p.suffix == ".cu"))]
    return compiled, every


def _build_key(csrc: Path, every: list[Path], cuda: toolchain.CudaToolkit | None,
               cuda_flags: list[str]) -> str:
    parts = (torch.__version__, str(torch.version.cuda), sys.version, sys.abiflags,
             str(sysconfig.get_config_var("SOABI")), sys.implementation.cache_tag,
             platform.system(), platform.machine(), f"cuda={cuda is not None}",
             os.environ.get("CXX", "c++"), str(cuda.home) if cuda else "",
             " ".join(_CXX_FLAGS), " ".join(_CUDA_FLAGS + cuda_flags))
    return toolchain.build_key(parts, ((p.relative_to(csrc).as_posix(), p) for p in every))


def _plan() -> _Plan:
    cuda, reason = _cuda_decision()
    csrc = source_dir("csrc")
    compiled, every = _sources(csrc, cuda is not None)
    cuda_flags = toolchain.cuda_arch_flags() if cuda else []
    name = f"dmf_ops_{_build_key(csrc, every, cuda, cuda_flags)}"
    library = toolchain.cache_root() / name / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    return _Plan(BuildInfo(library, cuda is not None, reason), name, compiled, cuda, cuda_flags)


def load_built() -> BuildInfo | None:
    """Load the library built for this torch and these sources, if the cache holds one;
    None (and nothing compiled) otherwise."""
    try:
        plan = _plan()
    except DMFExportError:  # e.g. a malformed $DMF_EXPORT_CUDA_ARCHS: said in one line by load(), not at import
        return None
    if not plan.is_built():
        return None
    torch.ops.load_library(str(plan.info.library))
    return plan.info


@contextlib.contextmanager
def _on_path(folder: Path):
    """``folder`` first on PATH: cpp_extension runs whatever ``ninja`` PATH gives it."""
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{folder}{os.pathsep}{before}"
    try:
        yield
    finally:
        os.environ["PATH"] = before


def load() -> BuildInfo:
    """Load the op library for this torch, building it first when no cached build matches."""
    plan = _plan()
    if plan.is_built():
        torch.ops.load_library(str(plan.info.library))
        return plan.info
    toolchain.cxx()  # one clear line when there is no compiler, before the build's traceback
    ninja = toolchain.ninja()
    # deferred on purpose: cpp_extension imports setuptools, a second or so nothing else needs
    from torch.utils import cpp_extension

    plan.build_dir.mkdir(parents=True, exist_ok=True)
    with toolchain.locked(plan.build_dir):
        if plan.is_built():  # another process built it while this one waited
            torch.ops.load_library(str(plan.info.library))
            return plan.info
        print(f"building dmf::deform_conv2d for torch {torch.__version__}"
              f"{' with CUDA' if plan.cuda else ''} (first use, about a minute)…",
              file=sys.stderr, flush=True)
        # PyTorch's own build lock; with ours held, one left there is a killed build's and would block forever
        (plan.build_dir / "lock").unlink(missing_ok=True)
        torch_cuda_home = cpp_extension.CUDA_HOME
        if plan.cuda:
            cpp_extension.CUDA_HOME = str(plan.cuda.home)  # where the build looks for nvcc and headers
        try:
            with _on_path(Path(ninja).parent):
                cpp_extension.load(
                    name=plan.name,
                    sources=[str(p) for p in plan.compiled],
                    extra_cflags=list(_CXX_FLAGS),
                    # explicit -gencode flags: PyTorch then adds none of its own (TORCH_CUDA_ARCH_LIST)
                    extra_cuda_cflags=list(_CUDA_FLAGS) + plan.cuda_flags,
                    build_directory=str(plan.build_dir),
                    with_cuda=plan.cuda is not None,
                    is_python_module=False,
                    verbose=bool(os.environ.get("DMF_EXPORT_BUILD_VERBOSE")),
                )
        except (RuntimeError, OSError, ImportError) as error:
            log = plan.build_dir / "build.log"
            log.write_text(str(error))
            raise DMFExportError(f"building dmf::deform_conv2d failed in {plan.build_dir} "
                                 f"(compiler output in {log})") from error
        finally:
            cpp_extension.CUDA_HOME = torch_cuda_home
        plan.stamp.write_text(f"{torch.__version__}\n")
    return plan.info
