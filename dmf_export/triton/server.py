"""A real Triton Inference Server on this machine, from the ``nvidia-pytriton`` wheel.

The wheel ships ``tritonserver`` (2.51 in nvidia-pytriton 0.7.0), its shared libraries
(``nvidia_pytriton.libs``) and the python backend with one stub binary per Python minor
version; no onnxruntime, TensorRT or PyTorch backend. We launch it as pytriton does: the
backend folder laid out afresh with the stub for the environment's Python, the libraries
on ``LD_LIBRARY_PATH``, and the environment's ``bin`` first on ``PATH``, since the stub
embeds whichever Python it finds there (that interpreter's numpy and onnxruntime run the
models). That environment needs numpy < 2 (the stub was built for numpy 1) and
onnxruntime ≥ 1.25; it may be another virtual environment than dmf-export's own
(``server_env``, ``$DMF_TRITON_ENV``).

Only loopback by default; the server runs in its own process group, so that stopping it
also stops its stub processes, whatever happened to the server.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dmf_export.errors import DMFExportError
from dmf_export.triton.repository import repository_models

MIN_GLIBC = (2, 35)
MIN_ONNXRUNTIME = (1, 25)
ENV_VARIABLE = "DMF_TRITON_ENV"


@dataclass(frozen=True)
class Distribution:
    """The server's files and the Python environment its python backend runs."""

    tritonserver: Path
    libraries: Path
    backends: Path
    stub: Path
    python: Path          # the environment's interpreter (its bin goes first on PATH)
    python_libdir: Path   # where its libpython lives (the stub links it)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def glibc_version() -> tuple[int, ...] | None:
    text = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    return _version(text.split()[1]) if text and text.startswith("glibc") else None


def _probe(python: Path) -> dict[str, str]:
    """Facts about an interpreter, asked in a subprocess (it may be another environment)."""
    script = ("import sys, sysconfig\n"
              "print(f'{sys.version_info[0]}.{sys.version_info[1]}')\n"
              "print(sysconfig.get_config_var('LIBDIR') or '')\n"
              "print(sysconfig.get_config_var('LDLIBRARY') or '')\n"
              "import importlib.util as u, importlib.metadata as m\n"
              "for name in ('numpy', 'onnxruntime', 'nvidia-pytriton'):\n"
              "    try: print(m.version(name))\n"
              "    except m.PackageNotFoundError: print('')\n"
              "spec = u.find_spec('pytriton')\n"
              "print(spec.submodule_search_locations[0] if spec else '')\n")
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise DMFExportError(f"cannot run {python}: {result.stderr.strip().splitlines()[-1:]}")
    keys = ("python", "libdir", "ldlibrary", "numpy", "onnxruntime", "pytriton", "package")
    return dict(zip(keys, result.stdout.splitlines()))


def find_distribution(server_env: str | os.PathLike | None = None) -> Distribution:
    """The tritonserver of the nvidia-pytriton wheel installed in ``server_env`` (a virtual
    environment; default ``$DMF_TRITON_ENV``, else this interpreter's), checked to run here."""
    glibc = glibc_version()
    if glibc is None or glibc < MIN_GLIBC:
        raise DMFExportError(f"the nvidia-pytriton server needs glibc ≥ 2.35 "
                             f"(this machine has {'.'.join(map(str, glibc)) if glibc else 'none'})")
    server_env = server_env or os.environ.get(ENV_VARIABLE)
    python = Path(server_env) / "bin" / "python" if server_env else Path(sys.executable)
    if not python.exists():
        raise DMFExportError(f"{server_env} is not a Python environment (no bin/python)")
    facts = _probe(python)
    where = f"the environment of {python}"
    if not facts["package"]:
        raise DMFExportError(f"nvidia-pytriton is not installed in {where} "
                             "(pip install 'dmf-export[serve]', or name another environment "
                             f"with --server-env / ${ENV_VARIABLE})")
    if not facts["numpy"] or _version(facts["numpy"]) >= (2, 0):
        raise DMFExportError(f"the python backend needs numpy < 2 in {where} "
                             f"(found {facts['numpy'] or 'none'}); its stub reads numpy 2 arrays wrongly")
    if not facts["onnxruntime"] or _version(facts["onnxruntime"]) < MIN_ONNXRUNTIME:
        raise DMFExportError(f"the python backend needs onnxruntime ≥ 1.25 (DeformConv) in {where} "
                             f"(found {facts['onnxruntime'] or 'none'})")
    root = Path(facts["package"]) / "tritonserver"
    stub = root / "python_backend_stubs" / facts["python"] / "triton_python_backend_stub"
    libdir = Path(facts["libdir"])
    if not stub.exists():
        raise DMFExportError(f"nvidia-pytriton {facts['pytriton']} has no python backend stub for "
                             f"Python {facts['python']}")
    if not (libdir / f"libpython{facts['python']}.so.1.0").exists():
        raise DMFExportError(f"the python backend stub links libpython{facts['python']}.so, which "
                             f"{python} lacks (a Python built with --enable-shared is needed)")
    # an installed wheel keeps its libraries beside the package; an editable one inside it
    libraries = next((p for p in (root.parent.parent / "nvidia_pytriton.libs", root / "external_libs")
                      if p.is_dir()), None)
    if libraries is None:
        raise DMFExportError(f"cannot find the libraries of nvidia-pytriton beside {root}")
    return Distribution(root / "bin" / "tritonserver", libraries, root / "backends", stub,
                        python, libdir)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel has just handed out as free (all open at once, so distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


class TritonServer:
    """A tritonserver process serving ``repo``; a context manager (stops on exit).

    It loads the models whose backend this server has (the wheel: python) and says which
    it skipped (``skipped``: {name: backend}). Ports default to free loopback ports.
    """

    def __init__(self, repo, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, host: str = "127.0.0.1", server_env=None,
                 models: list[str] | None = None, startup_timeout: float = 120.0,
                 exit_timeout: int = 10, python_shm_mb: int = 16):
        if importlib.util.find_spec("tritonclient") is None:  # readiness is asked through it
            raise DMFExportError("tritonclient is not installed (pip install 'dmf-export[client]')")
        self.repo = Path(repo).resolve()
        available = repository_models(self.repo)
        self.distribution = find_distribution(server_env)
        have = {p.name for p in self.distribution.backends.iterdir() if p.is_dir()}
        wanted = models or list(available)
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise DMFExportError(f"no model {', '.join(unknown)} in {self.repo}")
        self.models = [m for m in wanted if available[m] in have]
        self.skipped = {m: available[m] for m in wanted if available[m] not in have}
        if not self.models:
            raise DMFExportError(f"this server has none of the backends {self.repo} needs "
                                 f"({', '.join(sorted(set(self.skipped.values())))}; it has {', '.join(sorted(have))})")
        ports = iter(free_ports(3, host if host != "0.0.0.0" else "127.0.0.1"))
        self.ports = {"http": http_port or next(ports), "grpc": grpc_port or next(ports),
                      "metrics": metrics_port or next(ports)}
        self.host, self.startup_timeout, self.exit_timeout = host, startup_timeout, exit_timeout
        self.python_shm_mb = python_shm_mb
        self.process: subprocess.Popen | None = None
        self._workspace: Path | None = None

    def url(self, protocol: str = "http") -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"{host}:{self.ports[protocol]}"

    @property
    def log_path(self) -> Path:
        return self._workspace / "tritonserver.log"

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError, TypeError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _backend_folder(self) -> Path:
        """The wheel's backends, with the stub for this environment's Python beside the
        python backend (where the backend looks for it)."""
        backends = self._workspace / "backends"
        shutil.copytree(self.distribution.backends, backends)
        shutil.copy2(self.distribution.stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def _command(self, backends: Path) -> list[str]:
        shm = self.python_shm_mb << 20
        command = [str(self.distribution.tritonserver), f"--model-repository={self.repo}",
                   f"--backend-directory={backends}",
                   f"--cache-directory={self.distribution.backends.parent / 'caches'}",
                   "--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models),
                   "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout}",
                   "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
                   f"--backend-config=python,shm-default-byte-size={shm}",
                   f"--backend-config=python,shm-growth-byte-size={shm}"]
        for protocol in ("http", "grpc", "metrics"):
            command += [f"--{protocol}-address={self.host}", f"--{protocol}-port={self.ports[protocol]}"]
        return command

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libraries = [str(self.distribution.libraries), str(self.distribution.python_libdir)]
        if env.get("LD_LIBRARY_PATH"):
            libraries.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libraries)
        env["PATH"] = f"{self.distribution.python.parent}:{env.get('PATH', '')}"
        env.pop("PYTHONHOME", None)
        return env

    def start(self) -> "TritonServer":
        self._workspace = Path(tempfile.mkdtemp(prefix="dmf-tritonserver-"))
        command = self._command(self._backend_folder())
        with open(self.log_path, "wb") as log:
            # its own process group: stop() signals the server and its stubs together
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self._environment(),
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import tritonclient.http as http  # optional (dmf-export[client]); __init__ checked it is there

        client = http.InferenceServerClient(self.url("http"), connection_timeout=2, network_timeout=2)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise DMFExportError(f"tritonserver exited ({self.process.returncode}) while "
                                         f"starting: {self._last_error()}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready():
                        return
                time.sleep(0.2)
        finally:
            client.close()
        raise DMFExportError(f"tritonserver not ready after {self.startup_timeout:.0f} s: {self._last_error()}")

    def _last_error(self) -> str:
        lines = [line for line in self.log_tail(200).splitlines()
                 if line.startswith("E") or "rror" in line]
        return lines[-1].strip() if lines else f"see {self.log_path}"

    def stub_pids(self) -> list[int]:
        """Process ids of the server's python backend stubs."""
        return [pid for pid, name in group_members(self.process.pid) if "stub" in name] \
            if self.process else []

    def stop(self) -> None:
        """SIGTERM (the server unloads its models, its stubs exit), then after the exit
        timeout SIGKILL to whatever of its process group is left; frees the workspace."""
        if self.process is not None:
            group = self.process.pid
            stubs = self.stub_pids()
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(self.exit_timeout + 5)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(group)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            _kill_pids(stubs)  # in case one left the group
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def group_members(group: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live processes in process group ``group``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == group and fields[0] != "Z":
                # the command line, not stat's name: that is cut at 15 characters
                command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                members.append((int(entry.name), Path(command).name))
    return members


def _kill_group(group: int, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while group_members(group) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_pids(pids, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def serve_forever(server: TritonServer, echo=print) -> None:
    """Start ``server``, print its endpoints, and run until SIGINT/SIGTERM or until the
    server itself exits; always stops it (and its stubs) before returning."""
    stop_requested = []

    def request_stop(signum, _frame):
        stop_requested.append(signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        echo(f"serving {server.repo}")
        for protocol in ("http", "grpc", "metrics"):
            echo(f"  {protocol:<8}{server.url(protocol)}")
        echo(f"  models  {', '.join(server.models)}")
        for name, backend in server.skipped.items():
            echo(f"  skipped {name} (this server has no {backend} backend)")
        echo("Ctrl-C or SIGTERM stops it.")
        while not stop_requested and server.process.poll() is None:
            time.sleep(0.2)
        if not stop_requested:
            raise DMFExportError(f"tritonserver exited ({server.process.returncode}): {server._last_error()}")
        echo("stopping")
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
