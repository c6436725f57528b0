"""What both native builds share: the PyTorch op (``_build``, ``csrc/``) and the TensorRT
plugin (``tensorrt.plugin``, ``plugins/`` over ``csrc/kernels/``).

One cache folder, one way to find the CUDA toolkit, ninja and the C++ compiler, one list
of GPU architectures, one way to key a build by everything its binary depends on, one
lock per build folder. Nothing here imports torch or TensorRT.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

from dmf_export.errors import DMFExportError

try:
    import fcntl
except ImportError:  # Windows: no flock; the op's build keeps PyTorch's own lock file there
    fcntl = None
try:
    import ninja as ninja_package  # the PyPI package (a dependency): its binary when PATH has none
except ImportError:
    ninja_package = None

CACHE_ENV = "DMF_EXPORT_CACHE"
CUDA_ARCHS_ENV = "DMF_EXPORT_CUDA_ARCHS"
# One list for the op and the plugin, which compile the same kernel for the same GPUs:
# sm_75 is the T4 (a common inference and TensorRT target), sm_80 code also runs on
# 8.6/8.9 (A10, L4, RTX 30/40), sm_90 is the H100/H200, and compute_90 PTX (added for the
# last entry) is JIT-compiled by the driver for GPUs newer than all of them.
DEFAULT_CUDA_ARCHS = ("75", "80", "90")


def cache_root() -> Path:
    """Where every build (and TensorRT's timing cache) goes: $DMF_EXPORT_CACHE, else
    ~/.cache/dmf_export."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dmf_export"


# ------------------------------------------------------------------------- CUDA

@dataclasses.dataclass(frozen=True)
class CudaToolkit:
    home: Path
    version: str  # "13.0" (from include/cuda.h), or "unknown"

    @property
    def nvcc(self) -> Path:
        return self.home / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")

    @property
    def library_dir(self) -> Path:
        """The folder holding the static CUDA runtime (libcudart_static.a)."""
        for name in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (self.home / name / "libcudart_static.a").is_file():
                return self.home / name
        return self.home / "lib64"


def _is_cuda_toolkit(home: str | os.PathLike | None) -> bool:
    # nvcc on PATH may be a wrapper script (/usr/local/bin/nvcc → exec …/cuda-13.0/bin/nvcc),
    # and torch's own guess then takes /usr/local: only a folder with bin/nvcc *and*
    # include/cuda_runtime.h counts as a toolkit.
    if not home:
        return False
    nvcc = Path(home) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    return nvcc.is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file()


def _cuda_version(home: Path) -> str:
    header = home / "include" / "cuda.h"
    match = re.search(r"^\s*#\s*define\s+CUDA_VERSION\s+(\d+)",
                      header.read_text(errors="replace") if header.is_file() else "", flags=re.MULTILINE)
    return f"{int(match.group(1)) // 1000}.{int(match.group(1)) % 1000 // 10}" if match else "unknown"


def find_cuda() -> CudaToolkit | None:
    """The CUDA toolkit to build with, or None: the first of $CUDA_HOME, $CUDA_PATH, the
    toolkit around the nvcc on PATH and /usr/local/cuda that is a toolkit."""
    nvcc = shutil.which("nvcc")
    candidates = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  Path(nvcc).resolve().parent.parent if nvcc else None, "/usr/local/cuda")
    home = next((Path(h).resolve() for h in candidates if _is_cuda_toolkit(h)), None)
    return CudaToolkit(home, _cuda_version(home)) if home else None


def require_cuda() -> CudaToolkit:
    """``find_cuda``, or one line saying what is missing. A $CUDA_HOME or $CUDA_PATH the user
    set must be a toolkit: it is named rather than silently passed over."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            if not _is_cuda_toolkit(os.environ[variable]):
                raise DMFExportError(f"nvcc (the CUDA compiler) not found in {variable}={os.environ[variable]} "
                                     "(expected bin/nvcc and include/cuda_runtime.h there)")
            break
    toolkit = find_cuda()
    if toolkit is None:
        raise DMFExportError("nvcc (the CUDA compiler) not found: set CUDA_HOME to a CUDA toolkit folder "
                             "(one with bin/nvcc and include/cuda_runtime.h)")
    return toolkit


def cuda_archs() -> list[str]:
    """The GPU architectures to compile for: $DMF_EXPORT_CUDA_ARCHS ("80;90", "8.0 9.0",
    "sm_80,sm_90"), else ``DEFAULT_CUDA_ARCHS``."""
    text = os.environ.get(CUDA_ARCHS_ENV, "")
    archs = [a.strip().replace(".", "").removeprefix("sm_") for a in re.split(r"[;, ]+", text) if a.strip()]
    if not all(a.isdigit() for a in archs):
        raise DMFExportError(f"{CUDA_ARCHS_ENV}={text!r}: expected e.g. '80;90'")
    return archs or list(DEFAULT_CUDA_ARCHS)


def cuda_arch_flags() -> list[str]:
    """nvcc's -gencode flags: SASS for every architecture, PTX of the last for newer GPUs."""
    archs = cuda_archs()
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


# ------------------------------------------------------------------------- tools

def cxx() -> str:
    """The C++ compiler command: $CXX, else c++ (DMFExportError when it is not found)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which((shlex.split(compiler) or [""])[0]) is None:
        raise DMFExportError(f"no C++ compiler found ('{compiler}'): install g++ (or clang) or point CXX at one")
    return compiler


def ninja() -> str:
    """The ninja executable: on PATH, beside this Python, or the PyPI package's."""
    found = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if found:
        return found
    if ninja_package is not None and (Path(ninja_package.BIN_DIR) / "ninja").is_file():
        return str(Path(ninja_package.BIN_DIR) / "ninja")
    raise DMFExportError("ninja not found: pip install ninja")


# ------------------------------------------------------------------------- builds

def build_key(parts: Iterable[str], files: Iterable[tuple[str, Path]]) -> str:
    """A short hash of everything a binary depends on: ``parts`` (versions, compiler, flags)
    and each ``(name, file)``'s name and contents. Equal keys, interchangeable binaries."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode() + b"\0")
    for name, path in files:
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One build at a time per build folder, across processes (several may want the same
    cache entry at once); the lock goes with the process, so a killed build leaves none."""
    if fcntl is None:
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
