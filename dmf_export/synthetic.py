"""Seeded DMF checkpoints with random weights, in the original's layout.

For the demo, the tests and the benchmarks: files that ``dmf_export.checkpoint`` reads
like a released one (legacy or zip serialisation, wrapped or bare, with or without a
prefix), whose weights keep activations, offsets and meta-filter logits of order one.
They classify nothing. And small image-folder splits of seeded pictures, to calibrate an
int8 export on when no dataset is at hand (``write_synthetic_split``).
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmf_export.checkpoint import CHANNELS, expected_shapes, infer_groups_kernel
from dmf_export.errors import DMFExportError
from dmf_export.models import ResNet12

def random_state_dict(groups: int = 64, kernel: int = 1, classes: int = 64,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded float32 DMF state dict (original layout) with random, non-degenerate weights.

    Convolutions are kaiming-normal (fan-in, LeakyReLU(0.1) gain); BN affine parameters
    are random around the identity, and the running statistics are those of seeded
    normalised-image noise, perturbed (as a trained network's would be: activations stay
    of order one). The head is scaled to the features' RMS: offsets of about a pixel,
    meta-filter logits of order one (sigmoid not saturated). The backbone depends on
    ``seed`` only, not on groups/kernel/classes.
    """
    infer_groups_kernel(groups * kernel * kernel, groups, kernel)
    if classes < 1:
        raise DMFExportError(f"classes must be positive, got {classes}")
    backbone, feature_rms, generator_state = _random_backbone(seed)
    generator = torch.Generator()
    generator.set_state(generator_state)
    state_dict = {key: value.clone() for key, value in backbone.items()}
    shapes = expected_shapes(groups, kernel, classes)
    fan_in = {key: math.prod(shapes[key][1:]) for key in shapes}
    # each offset / filter logit sums fan_in terms weight × feature (RMS feature_rms)
    state_dict["global_clasifier.weight"] = _normal(
        shapes["global_clasifier.weight"], generator, 1.0 / math.sqrt(CHANNELS))
    state_dict["global_clasifier.bias"] = _normal(shapes["global_clasifier.bias"], generator, 0.01)
    for key, target in (("dw_gen.off_conv.weight", _OFFSET_RMS),
                        ("dw_gen.kernel_conv.weight", _FILTER_LOGIT_RMS)):
        std = target / (feature_rms * math.sqrt(fan_in[key]))
        state_dict[key] = _normal(shapes[key], generator, std)
    return state_dict


# Targets for random heads: offsets of this RMS (pixels) and meta-filter logits of this
# RMS (sigmoid' is still 0.2 at |logit| = 1).
_OFFSET_RMS = 1.0
_FILTER_LOGIT_RMS = 1.0
_CALIBRATION_IMAGES = (8, 3, 32, 32)
_LEAKY_GAIN = math.sqrt(2.0 / (1 + 0.1 ** 2))


def _normal(shape, generator, std):
    return torch.randn(shape, generator=generator) * std


@functools.lru_cache(maxsize=1)
def _random_backbone(seed: int):
    """(backbone entries, feature RMS, generator state after them) for a seed; cached
    because BN calibration costs a few backbone passes (callers get clones)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in expected_shapes(64, 1, 1).items():
        if not key.startswith("base."):
            continue
        name = key.rsplit(".", 1)[-1]
        if name == "num_batches_tracked":
            value = torch.randint(1, 100_000, (), generator=generator)
        elif name == "weight" and len(shape) == 4:
            value = _normal(shape, generator, _LEAKY_GAIN / math.sqrt(math.prod(shape[1:])))
        elif name == "weight":
            value = torch.rand(shape, generator=generator) + 0.5  # BN gamma in [0.5, 1.5)
        elif name == "bias":
            value = _normal(shape, generator, 0.1)
        elif name == "running_mean":
            value = torch.zeros(shape)  # set by the calibration
        elif name == "running_var":
            value = torch.ones(shape)
        else:  # pragma: no cover - expected_shapes lists nothing else
            raise AssertionError(key)
        state_dict[key] = value.to(torch.long if name == "num_batches_tracked" else torch.float32)
    feature_rms = _calibrate_batch_norm(state_dict, generator)
    return state_dict, feature_rms, generator.get_state()


def _calibrate_batch_norm(state_dict, generator) -> float:
    """Set every BN's running statistics from seeded noise images, block by block; return
    the RMS of the resulting backbone features."""
    backbone = ResNet12()
    prefix = "base."
    backbone.load_state_dict({key[len(prefix):]: value for key, value in state_dict.items()})
    features = torch.randn(_CALIBRATION_IMAGES, generator=generator)

    class _Captured(Exception):
        pass

    def capture(module, inputs, output):
        raise _Captured(output)

    for layer in range(1, 5):
        block = getattr(backbone, f"layer{layer}")[0]
        for conv, bn, name in ((block.conv1, block.bn1, "bn1"), (block.conv2, block.bn2, "bn2"),
                               (block.conv3, block.bn3, "bn3"),
                               (block.downsample[0], block.downsample[1], "downsample.1")):
            handle = conv.register_forward_hook(capture)
            try:
                with torch.no_grad():
                    block(features)
                raise AssertionError("calibration hook did not fire")  # pragma: no cover
            except _Captured as captured:
                conv_output = captured.args[0]
            finally:
                handle.remove()
            mean = conv_output.mean(dim=(0, 2, 3))
            var = conv_output.var(dim=(0, 2, 3))
            jitter_mean = torch.randn(mean.shape, generator=generator) * 0.1
            jitter_var = torch.rand(var.shape, generator=generator) * 0.45 + 0.8
            key = f"{prefix}layer{layer}.0.{name}."
            state_dict[key + "running_mean"] = mean + jitter_mean * var.sqrt()
            state_dict[key + "running_var"] = (var * jitter_var).clamp_min(1e-3)
            bn.running_mean.copy_(state_dict[key + "running_mean"])
            bn.running_var.copy_(state_dict[key + "running_var"])
        with torch.no_grad():
            features = block(features)
    return float(features.pow(2).mean().sqrt())


def write_random_checkpoint(path, groups: int = 64, kernel: int = 1, classes: int = 64,
                            seed: int = 0, legacy: bool = True, bare: bool = False,
                            prefix: str = "") -> Path:
    """Write a seeded checkpoint in the original layout with random weights (atomically).

    ``legacy`` uses the PyTorch 1.4 (non-zip) serialisation the released files have;
    ``bare`` saves the state dict alone instead of ``{'state_dict', 'acc', 'epoch'}``;
    ``prefix`` (e.g. ``'module.'``) is prepended to every key. ``acc`` and ``epoch`` are 0:
    nothing was trained.
    """
    path = Path(path)
    state_dict = {prefix + key: value
                  for key, value in random_state_dict(groups, kernel, classes, seed).items()}
    content = state_dict if bare else {"state_dict": state_dict, "acc": 0.0, "epoch": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(content, handle, _use_new_zipfile_serialization=not legacy)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        try:
            os.unlink(handle.name)
        except OSError:
            pass
        raise
    return path


def write_synthetic_split(root, split: str = "test", classes: int = 5, images: int = 16,
                          size: int = 84, seed: int = 0) -> Path:
    """``ROOT/SPLIT/class_XX/img_YYY.jpg``: ``classes`` × ``images`` seeded pictures of
    ``size``×``size`` (smooth colour fields, a tint per class, plus fine noise: pixel
    statistics closer to photographs' than white noise). Returns ``root``."""
    if min(classes, images, size) < 1:
        raise DMFExportError(f"classes, images and size must be positive, got {classes}, {images}, {size}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(classes):
        folder = root / split / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.uniform(40, 215, size=3)
        for i in range(images):
            coarse = rng.normal(0, 50, size=(4, 4, 3)) + tint
            field = np.asarray(Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize(
                (size, size), Image.Resampling.BICUBIC), dtype=np.float64)
            pixels = (field + rng.normal(0, 12, size=field.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg", quality=90)
    return root
