"""Where the shipped sources live: inside the package when installed, beside it in a checkout."""
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def source_dir(name: str) -> Path:
    """``csrc`` or ``plugins``: the folder of sources that builds compile."""
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"dmf_export: cannot find the '{name}' sources next to {_PKG}")
