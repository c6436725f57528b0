"""All-or-nothing writes: every file (or folder) of one export lands, or none does."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

from dmf_export.errors import DMFExportError


class Staging:
    """All-or-nothing writes: every output is first written under a temporary name beside
    its final one; ``commit`` renames them all into place, or none lands.

    An existing output is refused unless ``force``; with ``force`` it is moved aside
    first and restored if any rename fails, so a failed export never leaves a mix of old
    and new files. Outputs may be files or folders (a Triton model repository).
    """

    def __init__(self, finals: Iterable[Path], force: bool = False):
        self.finals = [Path(p) for p in finals]
        self.force = force
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._temps: dict[Path, Path] = {}
        for path in self.finals:
            self._check_writable(path)

    def _check_writable(self, path: Path) -> None:
        if path.exists() and not self.force:
            raise DMFExportError(f"{path} exists; pass --force to overwrite it")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise DMFExportError(f"cannot write {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise DMFExportError(f"cannot write {path}: folder {parent} is not writable")

    def temp(self, final: Path) -> Path:
        """The temporary name ``final``'s contents are written to (it does not exist yet)."""
        final = Path(final)
        if final not in self.finals:
            raise ValueError(f"{final} is not one of this export's outputs")
        # the final name last: some writers insist on a suffix (AOTInductor's .pt2)
        return self._temps.setdefault(final, final.with_name(f".tmp-{self._token}.{final.name}"))

    def commit(self) -> None:
        missing = [f for f in self.finals if f not in self._temps or not self._temps[f].exists()]
        if missing:
            raise DMFExportError(f"internal error: {missing[0]} was not written")
        moved: list[tuple[Path, Path]] = []   # (final, its old contents moved aside)
        placed: list[Path] = []
        try:
            for final in self.finals:
                if final.exists() or final.is_symlink():
                    aside = final.with_name(f".{final.name}.old-{self._token}")
                    os.replace(final, aside)
                    moved.append((final, aside))
            for final in self.finals:
                os.replace(self._temps[final], final)
                placed.append(final)
        except OSError as err:
            for final in placed:
                _remove(final)
            for final, aside in moved:
                os.replace(aside, final)
            raise DMFExportError(f"cannot write {final}: {err.strerror or err}") from err
        for _, aside in moved:
            _remove(aside)

    def discard(self) -> None:
        for temp in self._temps.values():
            _remove(temp)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            try:
                self.commit()
            finally:
                self.discard()
        else:
            self.discard()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
