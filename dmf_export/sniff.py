"""What a file is, by its first bytes (and a zip's member names), before anything parses it.

A reader that meets a file of the wrong kind says "X is a gzip file, not a pickle"
instead of its parser's words ("invalid load key", "Memo value not found"). Sniffing
reads a few bytes and, for a zip, its table of contents: nothing is decoded or run.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

_HEAD = 4096
_MAGIC = (  # (first bytes, what that makes the file)
    (b"\x1f\x8b", "a gzip file"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"\x28\xb5\x2f\xfd", "a zstd file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
)
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP = b"PK\x05\x06"
PICKLE = "a pickle"
TORCHSCRIPT = "a TorchScript archive"
TORCH_ZIP = "a PyTorch zip checkpoint"
AOTI = "an AOTInductor package"
ONNX = "an ONNX model"
TEXT = "a text file"
EMPTY = "an empty file"
DAMAGED_ZIP = "a damaged zip archive"


def article(word: str) -> str:
    """'a TorchScript', 'an ONNX': the article by the first letter's sound (the format
    names all start with a letter read as it sounds)."""
    return f"{'an' if word[:1].upper() in 'AEIOU' else 'a'} {word}"


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return DAMAGED_ZIP
    # TorchScript archives carry code/ and constants.pkl; torch.save's zip only data.pkl;
    # an AOTInductor package (torch._inductor.aoti_compile_and_package) its .so/.cpp and
    # the archive_format marker
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return TORCHSCRIPT
    if any(n.endswith("archive_format") or "/aotinductor/" in n for n in names):
        return AOTI
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return TORCH_ZIP
    return "a zip archive"


def _looks_like_onnx(head: bytes) -> bool:
    # an ONNX ModelProto starts with field 1 (ir_version, a varint: tag 0x08) and names
    # its producer and opset early on
    return head[:1] == b"\x08" and (b"onnx" in head or b"pytorch" in head or b"ai.onnx" in head)


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def kind_of(path) -> str | None:
    """'a gzip file', 'a TorchScript archive', 'a pickle', 'a text file', …, or None
    when the first bytes say nothing known. OSError if the file cannot be read."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(_HEAD)
    if not head:
        return EMPTY
    if head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP):
        return _zip_kind(path)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[0] == 0x80 and len(head) > 1 and head[1] <= 5:  # PROTO opcode, protocols 2–5
        return PICKLE
    if _looks_like_onnx(head):
        return ONNX
    if _looks_like_text(head):
        return TEXT
    return None


# which command reads an artifact of each kind, for "given where a checkpoint is wanted"
ARTIFACT_KINDS = (TORCHSCRIPT, AOTI, ONNX)
