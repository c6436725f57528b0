"""What this CPU runs fast, read from its flags (``/proc/cpuinfo``).

bf16 convolutions are worth exporting only where the CPU computes them natively: AMX
tiles (``amx_bf16``) or AVX-512-BF16 dot products (``avx512_bf16``). Elsewhere oneDNN
emulates bf16 in fp32, slower than fp32 itself. Nothing here imports torch.
"""
from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _first(keys: tuple[str, ...], cpuinfo: Path | None) -> str | None:
    """The value of the first line of ``/proc/cpuinfo`` whose key is one of ``keys`` ('' if
    none is), or None where the file cannot be read."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return ""


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The flags of this CPU's first processor (``/proc/cpuinfo``), or None where the file
    cannot be read (not Linux): then nobody here knows what the CPU has."""
    value = _first(("flags", "Features"), cpuinfo)
    return None if value is None else frozenset(value.split())


def model_name(cpuinfo: Path | None = None) -> str:
    """This CPU's model name (``/proc/cpuinfo``), or '' where it does not say (what the
    benchmarks print beside their timings)."""
    return _first(("model name",), cpuinfo) or ""


def bf16_unavailable() -> str | None:
    """Why this CPU should not run bf16 artifacts (one line), or None when it has AMX or
    AVX-512-BF16."""
    flags = cpu_flags()
    if flags is None:
        return (f"bf16 artifacts need a CPU with AMX (amx_bf16) or AVX-512-BF16 (avx512_bf16), "
                f"and this system does not say what its CPU has (no readable {CPUINFO}): "
                f"use fp32, or int8 ONNX")
    if flags.isdisjoint(BF16_FLAGS):
        return ("bf16 artifacts need a CPU with AMX (amx_bf16) or AVX-512-BF16 (avx512_bf16); "
                "this one has neither: use fp32, or int8 ONNX")
    return None

