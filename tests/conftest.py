"""Shared fixtures: seeded DMF weights, episodes and checkpoint files.

Kept general (no test module's specifics) so every test file can use them. Tests run
from a checkout without installation: the repository root goes on ``sys.path``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The Triton server's own environment (numpy < 2), which .ci/run builds beside .venv
if not os.environ.get("DMF_TRITON_ENV") and (ROOT / ".venv-triton" / "bin" / "python").exists():
    os.environ["DMF_TRITON_ENV"] = str(ROOT / ".venv-triton")

# this checkout's package, from ROOT above
from dmf_export import load_checkpoint, ops  # noqa: E402
from dmf_export.export import ExportOptions, export_checkpoint  # noqa: E402
from dmf_export.formats import read_info  # noqa: E402
from dmf_export.synthetic import random_state_dict, write_random_checkpoint, write_synthetic_split  # noqa: E402
from dmf_export.triton import write_repository  # noqa: E402


_STATE_DICTS: dict = {}
EXPORT_IMAGE = 32  # 32 → 4×4 features: the whole graph, cheaply


@pytest.fixture(scope="session")
def dmf_state_dict():
    """``dmf_state_dict(groups=64, kernel=1, classes=64, seed=0)`` → a seeded random DMF
    state dict (original layout, float32), cached for the session; do not modify it."""
    def make(groups=64, kernel=1, classes=64, seed=0):
        key = (groups, kernel, classes, seed)
        if key not in _STATE_DICTS:
            _STATE_DICTS[key] = random_state_dict(groups, kernel, classes, seed)
        return _STATE_DICTS[key]

    return make


@pytest.fixture(scope="session")
def make_episode():
    """``make_episode(way=5, shot=1, queries=3, size=32, seed=0, shuffle=True,
    dtype=torch.float32, query_noise=None)`` → (support [S,3,size,size], one-hot labels
    [S,way], query [Q,3,size,size]) of unit-variance noise images. With ``shuffle`` the
    support is not in class order; with ``query_noise`` = σ each query is a random support
    image mixed with noise, √(1-σ²)·image + σ·noise (so scores have a clearer winner)."""

    def make(way=5, shot=1, queries=3, size=32, seed=0, shuffle=True, dtype=torch.float32,
             query_noise=None):
        generator = torch.Generator().manual_seed(seed)
        classes = torch.arange(way).repeat(shot)
        if shuffle:
            classes = classes[torch.randperm(classes.numel(), generator=generator)]
        labels = torch.nn.functional.one_hot(classes, way).to(dtype)
        support = torch.randn(classes.numel(), 3, size, size, generator=generator, dtype=dtype)
        query = torch.randn(queries, 3, size, size, generator=generator, dtype=dtype)
        if query_noise is not None:
            pick = torch.randint(0, classes.numel(), (queries,), generator=generator)
            query = support[pick] * (1 - query_noise ** 2) ** 0.5 + query * query_noise
        return support, labels, query

    return make


@pytest.fixture
def checkpoint_file(tmp_path):
    """``checkpoint_file(name="dmf.pth.tar", **write_random_checkpoint kwargs)`` → a path
    in this test's temporary folder holding a seeded random checkpoint."""
    def make(name="dmf.pth.tar", **kwargs):
        return write_random_checkpoint(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(groups, kernel, format, **options) → (checkpoint, [paths]): a seeded
    checkpoint exported at EXPORT_IMAGE × EXPORT_IMAGE, once per session. Every test that
    needs an artifact (not the act of exporting) takes it from here: an export costs
    seconds (AOTInductor tens of seconds), so each configuration is made once. One
    checkpoint per (groups, kernel), so artifacts of one configuration share it."""
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(groups, kernel, fmt, **options):
        key = (groups, kernel, fmt, tuple(sorted(options.items())))
        if key not in cache:
            checkpoint = root / f"g{groups}k{kernel}.pth.tar"
            if not checkpoint.exists():
                write_random_checkpoint(checkpoint, groups=groups, kernel=kernel, seed=groups + kernel)
            # a path option (--calibrate) is named by its last part
            name = "_".join([f"g{groups}k{kernel}", fmt] + [f"{k}-{Path(str(v)).name}"
                                                            for k, v in sorted(options.items())])
            opts = ExportOptions(format=fmt, output=str(root / name), image_size=EXPORT_IMAGE,
                                 way=5, shot=1, queries=4, **options)
            cache[key] = (checkpoint, [w.path for w in export_checkpoint(str(checkpoint), opts)])
        return cache[key]

    return get


@pytest.fixture(scope="session")
def triton_split_repository(exported, tmp_path_factory):
    """(checkpoint, repository): a split Triton repository (dmf, dmf_encoder, dmf_head, each
    for the onnxruntime and python backends) of ``exported``'s ONNX episode and split
    exports of (64, 1), written as plain copies (no export of its own)."""
    checkpoint, (episode,) = exported(64, 1, "onnx")
    _, split = exported(64, 1, "onnx", graph="split")
    repo = tmp_path_factory.mktemp("triton-split") / "repo"
    write_repository(repo, {path: read_info(path) for path in (episode, *split)})
    return checkpoint, repo


@pytest.fixture(scope="session")
def calibration_split(tmp_path_factory):
    """A synthetic image-folder dataset (test split: 5 classes × 16 pictures of
    EXPORT_IMAGE × EXPORT_IMAGE, as CIFAR-FS's transform keeps them) to calibrate int8
    exports on: `exported(..., precision="int8", calibrate=str(calibration_split),
    calib_transform="cifar-fs")`."""
    return write_synthetic_split(tmp_path_factory.mktemp("calibration"), classes=5, images=16,
                                 size=EXPORT_IMAGE)


@pytest.fixture(scope="session")
def eager():
    """eager(checkpoint) → the eager model of a checkpoint file, cached."""
    models = {}

    def get(checkpoint):
        if checkpoint not in models:
            models[checkpoint] = load_checkpoint(checkpoint)
        return models[checkpoint]

    return get


# -- the one CUDA condition -------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU and dmf::deform_conv2d built with CUDA (else skipped)")


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA tests cannot run here, or None when they can: a GPU AND the op built
    with CUDA (a GPU machine without nvcc, or with a CPU-only torch, skips them)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    build_info = ops.require()  # builds the op if needed: the CUDA tests run it anyway
    if not build_info.with_cuda:
        return f"dmf::deform_conv2d built without CUDA ({build_info.without_cuda_reason})"
    return None


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("cuda")]
    reason = cuda_unavailable_reason() if marked else None
    for item in marked if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def two_threads():
    """torch on 2 threads for the module (as CI's 2 cores), restored after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)
