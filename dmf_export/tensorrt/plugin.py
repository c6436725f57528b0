"""The TensorRT plugin ``DMFDeformConv2d``: who it is, building its library, loading it.

Identity: the creator's name, version and namespace, which are also the op type,
``plugin_version`` and ``plugin_namespace`` of the ONNX node ``onnx_ops`` writes (in
domain ``ONNX_DOMAIN``); TensorRT's ONNX parser finds the plugin in its registry by
them. Defined here once; importing this module imports neither TensorRT nor torch.

Building (``build_plugin``, ``dmf-export build-plugin``): ``plugins/`` over
``csrc/kernels/`` with ninja. No PyTorch and no TensorRT *libraries* are needed: only
TensorRT's headers, a CUDA toolkit (nvcc) and a C++ compiler. The library links the
CUDA runtime statically and nothing of TensorRT (TensorRT finds the plugin through its
two exported entry points, ``getCreators`` and ``setLoggerFinder``), so it loads into
whatever TensorRT process has the same major version as the headers it was compiled
against.

Where things are found:
- TensorRT headers: ``--tensorrt-root`` (``tensorrt_root``), else ``$TENSORRT_ROOT``;
  either may be an install folder (with ``include/``) or the include folder itself, and
  when one is given it must hold the headers. Else the usual installs:
  ``/usr/include/x86_64-linux-gnu`` (NVIDIA's Debian/Ubuntu packages),
  ``/usr/local/tensorrt``, ``/opt/tensorrt``, …
- CUDA, the C++ compiler, ninja, the GPU architectures and the cache folder: as for the
  op, ``dmf_export.toolchain``.

The build goes to ``<cache>/plugin/<key>``, where the key hashes the sources, the
TensorRT and CUDA versions, the compiler and the flags, so a library is never reused for
other sources or another TensorRT.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from dmf_export import toolchain
from dmf_export.errors import DMFExportError
from dmf_export.paths import source_dir

# -- identity (plugins/DMFDeformConv2dPlugin/DMFDeformConv2dPlugin.h says the same in C++)
PLUGIN_NAME = "DMFDeformConv2d"  # = the ONNX node's op type
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
ONNX_DOMAIN = "dmf"

PLUGIN_ENV = "DMF_EXPORT_TRT_PLUGIN"  # a library to load instead of the one an engine names
LIBRARY_NAME = "libdmf_trt_plugin.so"
EXPORTED_SYMBOLS = ("getCreators", "setLoggerFinder")
# Searched, in order, when neither --tensorrt-root nor TENSORRT_ROOT is given.
SYSTEM_TENSORRT = (
    "/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/local/tensorrt",
    "/opt/tensorrt", "/usr/local/TensorRT", "/opt/TensorRT", "/usr/include", "/usr/local/include",
)
MIN_TENSORRT_MAJOR = 10  # IPluginV3 and the ONNX parser's IPluginV3 fallback
_KERNEL_SOURCES = ("deform_conv_cuda.cu", "deform_conv_cuda.h", "deform_conv_shape.h", "deform_sampler.h")
_CXX_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
              "-Wall", "-Wextra")
_NVCC_FLAGS = ("-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden")


# ------------------------------------------------------------------------- TensorRT headers

@dataclasses.dataclass(frozen=True)
class TensorRTHeaders:
    include: Path
    version: str  # "major.minor.patch" from NvInferVersion.h

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _headers_in(folder: Path) -> Path | None:
    for include in (folder / "include", folder):
        if (include / "NvInferRuntime.h").is_file() and (include / "NvInferVersion.h").is_file():
            return include
    return None


def tensorrt_version(include: Path) -> str:
    """'major.minor.patch' from NvInferVersion.h (10.x and 11.x define it through aliases)."""
    defines = dict(re.findall(r"^\s*#\s*define\s+(\w+)\s+(\w+)", (include / "NvInferVersion.h").read_text(),
                              flags=re.MULTILINE))

    def value(name: str) -> str:
        seen = set()
        while name in defines and name not in seen:
            seen.add(name)
            name = defines[name]
        return name

    parts = [value(f"NV_TENSORRT_{p}") for p in ("MAJOR", "MINOR", "PATCH")]
    if not all(p.isdigit() for p in parts):
        raise DMFExportError(f"{include / 'NvInferVersion.h'}: cannot read TensorRT's version from it")
    return ".".join(parts)


def find_tensorrt(tensorrt_root: str | os.PathLike | None = None) -> TensorRTHeaders:
    """TensorRT's include folder: the argument, else $TENSORRT_ROOT, else a usual install."""
    given = [(str(tensorrt_root), "--tensorrt-root")] if tensorrt_root else []
    if not given and os.environ.get("TENSORRT_ROOT"):
        given = [(os.environ["TENSORRT_ROOT"], "TENSORRT_ROOT")]
    if given:  # the user named a folder: use it or say what is wrong with it, never guess past it
        folder, source = given[0]
        include = _headers_in(Path(folder).expanduser())
        if include is None:
            raise DMFExportError(f"no TensorRT headers in {source}={folder} (expected include/NvInferRuntime.h "
                                 "and include/NvInferVersion.h)")
    else:
        include = next(filter(None, (_headers_in(Path(p)) for p in SYSTEM_TENSORRT)), None)
        if include is None:
            raise DMFExportError("TensorRT headers not found (NvInferRuntime.h): pass --tensorrt-root DIR or set "
                                 "TENSORRT_ROOT to a TensorRT install (looked in " + ", ".join(SYSTEM_TENSORRT) + ")")
    headers = TensorRTHeaders(include.resolve(), tensorrt_version(include))
    if headers.major < MIN_TENSORRT_MAJOR:
        raise DMFExportError(f"TensorRT {headers.version} headers in {include}: the plugin (IPluginV3) needs "
                             f"TensorRT ≥ {MIN_TENSORRT_MAJOR}")
    return headers


# ------------------------------------------------------------------------- building

def plugin_sources() -> tuple[list[Path], list[Path]]:
    """(C++ files of plugins/: the library's entry points and every plugin folder's files,
    the CUDA launcher's files of csrc/kernels/)."""
    plugins, kernels = source_dir("plugins"), source_dir("csrc") / "kernels"
    cpp = sorted(p for p in plugins.rglob("*") if p.suffix in (".cpp", ".h") and p.is_file())
    return cpp, [kernels / name for name in _KERNEL_SOURCES]


def _build_key(files: list[Path], trt: TensorRTHeaders, cuda: toolchain.CudaToolkit, cxx: str,
               arch_flags: list[str]) -> str:
    parts = (trt.version, str(trt.include), cuda.version, str(cuda.home), cxx, " ".join(_CXX_FLAGS),
             " ".join(_NVCC_FLAGS), " ".join(arch_flags), sys.platform)
    return toolchain.build_key(parts, ((f"{p.parent.name}/{p.name}", p) for p in files))


def _ninja_path(path: Path | str) -> str:
    """A path as a ninja build-line token."""
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _command(args) -> str:
    """Arguments as a ninja command variable (shell-quoted, ninja-escaped)."""
    return " ".join(shlex.quote(str(a)) for a in args).replace("$", "$$")


def write_build_files(build_dir: Path, trt: TensorRTHeaders, cuda: toolchain.CudaToolkit, cxx: str,
                      arch_flags: list[str]) -> Path:
    """Write build.ninja (and the linker's export list) into ``build_dir``; returns build.ninja."""
    cpp, kernels = plugin_sources()
    kernel_dir = kernels[0].parent
    exports = build_dir / "exports.map"
    exports.write_text("{\n  global:\n" + "".join(f"    {s};\n" for s in EXPORTED_SYMBOLS)
                       + "  local:\n    *;\n};\n")
    # plugin headers are included by their path from the including file; the kernels' by name
    cxx_flags = [*_CXX_FLAGS, "-I", kernel_dir, "-isystem", trt.include, "-isystem", cuda.home / "include"]
    nvcc_flags = [*_NVCC_FLAGS, *arch_flags, "-I", kernel_dir]
    if os.environ.get("CXX"):
        nvcc_flags += ["-ccbin", cxx]
    # Link the CUDA runtime statically (nvcc's own default): the library then needs no
    # libcudart.so at run time, only the driver; nothing of TensorRT is linked.
    link_flags = ["-shared", f"-Wl,--version-script={exports}", "-Wl,--no-undefined", f"-Wl,-soname,{LIBRARY_NAME}",
                  "-L", cuda.library_dir, "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    objects = []
    lines = [
        "# Written by dmf-export build-plugin; rerun that command rather than editing this file.",
        "ninja_required_version = 1.3",
        f"cxx = {_command([cxx])}",
        f"nvcc = {_command([cuda.nvcc])}",
        f"cxxflags = {_command(cxx_flags)}",
        f"nvccflags = {_command(nvcc_flags)}",
        f"ldflags = {_command(link_flags)}",
        "",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $cxxflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = C++ $out",
        "rule cuda",
        "  command = $nvcc -MD -MF $out.d $nvccflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CUDA $out",
        "rule link",
        "  command = $cxx $in -o $out $ldflags",
        "  description = LINK $out",
        "",
    ]
    for source in [p for p in cpp if p.suffix == ".cpp"]:
        obj = f"{source.stem}.o"
        lines.append(f"build {obj}: cxx {_ninja_path(source)}")
        objects.append(obj)
    cu = kernels[0]
    lines.append(f"build {cu.stem}.cu.o: cuda {_ninja_path(cu)}")
    objects.append(f"{cu.stem}.cu.o")
    lines += [f"build {LIBRARY_NAME}: link {' '.join(objects)} | exports.map", f"default {LIBRARY_NAME}", ""]
    ninja_file = build_dir / "build.ninja"
    ninja_file.write_text("\n".join(lines))
    return ninja_file


def build_plugin(tensorrt_root: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] = lambda _: None) -> Path:
    """Build (or find already built) the plugin library; returns its path."""
    trt = find_tensorrt(tensorrt_root)
    cuda = toolchain.require_cuda()
    cxx = toolchain.cxx()
    arch_flags = toolchain.cuda_arch_flags()
    cpp, kernels = plugin_sources()
    key = _build_key(cpp + kernels, trt, cuda, cxx, arch_flags)
    build_dir = Path(out_dir).expanduser() if out_dir else toolchain.cache_root() / "plugin" / key
    library = build_dir / LIBRARY_NAME
    stamp = build_dir / "built.ok"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DMFExportError(f"cannot create the build folder {build_dir}: {err.strerror}") from err
    with toolchain.locked(build_dir):
        if stamp.is_file() and library.is_file() and stamp.read_text().strip() == key:
            log(f"TensorRT plugin already built for TensorRT {trt.version}, CUDA {cuda.version}: {library}")
            return library
        ninja = toolchain.ninja()
        write_build_files(build_dir, trt, cuda, cxx, arch_flags)
        stamp.unlink(missing_ok=True)
        log(f"building the TensorRT plugin for TensorRT {trt.version} ({trt.include}) with CUDA {cuda.version} "
            f"({cuda.home}) in {build_dir} …")
        jobs = str(max(1, min(os.cpu_count() or 1, 4)))
        result = subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        (build_dir / "build.log").write_text(result.stdout)
        if result.returncode != 0 or not library.is_file():
            for line in result.stdout.strip().splitlines()[-15:]:
                log(f"  {line}")
            raise DMFExportError(f"building the TensorRT plugin failed (compiler output in {build_dir / 'build.log'})")
        stamp.write_text(key + "\n")
        runtime_version_file(library).write_text(cuda.version + "\n")
    check_driver(cuda.version, f"the plugin built in {build_dir}", log=log)
    return library


# ------------------------------------------------------------------------- the driver

def runtime_version_file(library: Path) -> Path:
    """Beside the library: the CUDA runtime version it links statically (the driver must support it)."""
    return Path(f"{library}.cuda")


def driver_cuda_version() -> str | None:
    """The newest CUDA version this machine's driver supports ("13.0"), or None without a driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if driver.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def check_driver(runtime_version: str, what: str, *, strict: bool = False,
                 log: Callable[[str], None] = lambda _: None) -> None:
    """Say in one line when the driver here is older than the CUDA runtime ``what`` links
    statically (its kernels would fail to launch): an error when ``strict`` (loading it to
    run), a warning otherwise (building for another machine is fine). No driver: nothing
    to check."""
    driver = driver_cuda_version()
    if driver is None or runtime_version == "unknown" or \
            _version_tuple(driver) >= _version_tuple(runtime_version):
        return
    message = (f"{what} links the CUDA {runtime_version} runtime, but this machine's driver supports CUDA "
               f"{driver} at most: update the driver, or rebuild the plugin with an older CUDA toolkit "
               "(CUDA_HOME)")
    if strict:
        raise DMFExportError(message)
    log(f"warning: {message}")


# ------------------------------------------------------------------------- loading into TensorRT

_LOADED: dict[str, object] = {}  # library path → registry handle, per process
_LOAD_LOCK = threading.Lock()


def load_plugin_library(trt, library: str | os.PathLike, log: Callable[[str], None] = lambda _: None) -> None:
    """Put the plugin's creator into TensorRT's global plugin registry (once per process).
    ``trt`` is the imported ``tensorrt`` module (``engine.require_tensorrt()``)."""
    library = str(Path(library).resolve())
    if not Path(library).is_file():
        raise DMFExportError(f"TensorRT plugin library {library} does not exist (build it with "
                             f"`dmf-export build-plugin`, or point {PLUGIN_ENV} at one)")
    version_file = runtime_version_file(Path(library))
    if version_file.is_file():
        check_driver(version_file.read_text().strip(), f"the TensorRT plugin {library}", strict=True)
    registry = trt.get_plugin_registry()
    with _LOAD_LOCK:
        if library in _LOADED:
            return
        # Load first and look the creator up after: asking the registry for a creator it
        # does not hold makes TensorRT log an error that is not one.
        handle = registry.load_library(library)
        if handle is None:
            # loadLibrary refuses a library whose plugins another one registered already
            if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:
                log(f"plugin {PLUGIN_NAME} v{PLUGIN_VERSION} is already registered in this process; "
                    f"not loading {library}")
                _LOADED[library] = None
                return
            raise DMFExportError(f"TensorRT could not load the plugin library {library} (built for another "
                                 "TensorRT or CUDA? rebuild it with `dmf-export build-plugin`)")
        if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise DMFExportError(f"{library} loaded, but it registers no {PLUGIN_NAME} v{PLUGIN_VERSION} plugin")
        _LOADED[library] = handle
