"""Reading DMF checkpoints safely: what a checkpoint holds, its layout, the eager model.

Checkpoints are read with ``torch.load(weights_only=True)``: no pickled code ever runs,
for the PyTorch 1.4 legacy (non-zip) serialisation the released files use as well as
for the zip format. The only globals admitted beyond torch's own are numpy's scalar
reconstruction, for numbers (``safe_pickle.NUMBER_GLOBALS``: training scripts store
``acc``/``epoch`` as numpy scalars). Every failure is one ``DMFExportError`` line naming
the file. Seeded random checkpoints are written by ``dmf_export.synthetic``.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch

from dmf_export import sniff
from dmf_export.errors import DMFExportError, summarize
from dmf_export.models import DMF, check_groups_kernel
from dmf_export.safe_pickle import NUMBER_GLOBALS

CHANNELS = 640
BLOCK_WIDTHS = (64, 160, 320, 640)
WRAPPER_KEYS = ("state_dict", "acc", "epoch")
DATAPARALLEL_PREFIX = "module."
_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_LIST_LIMIT = 6


# -- the original's layout -------------------------------------------------------------

def expected_shapes(groups: int, kernel: int, classes: int) -> dict[str, tuple[int, ...]]:
    """Every entry of a DMF state dict and its shape (the int64 counters are scalars),
    in the order the original's modules produce them."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_channels = 3
    for layer, width in enumerate(BLOCK_WIDTHS, start=1):
        block = f"base.layer{layer}.0."
        shapes[f"{block}num_batches_tracked"] = ()  # the block's own buffer comes first
        batch_norm = {entry: (() if entry == "num_batches_tracked" else (width,))
                      for entry in _BN_ENTRIES}
        for index in (1, 2, 3):
            shapes[f"{block}conv{index}.weight"] = (width, width if index > 1 else in_channels,
                                                   3, 3)
            shapes.update({f"{block}bn{index}.{entry}": shape
                           for entry, shape in batch_norm.items()})
        shapes[f"{block}downsample.0.weight"] = (width, in_channels, 1, 1)
        shapes.update({f"{block}downsample.1.{entry}": shape
                       for entry, shape in batch_norm.items()})
        in_channels = width
    shapes["global_clasifier.weight"] = (classes, CHANNELS, 1, 1)
    shapes["global_clasifier.bias"] = (classes,)
    shapes["dw_gen.off_conv.weight"] = (18, 2 * CHANNELS, 5, 5)
    shapes["dw_gen.kernel_conv.weight"] = (groups * kernel * kernel, CHANNELS, 3, 3)
    return shapes


def expected_keys() -> list[str]:
    """The 104 state-dict entries of a DMF checkpoint, in the original's order."""
    return list(expected_shapes(1, 1, 1))


def _is_parameter(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def infer_groups_kernel(out_channels: int, groups: int | None = None,
                        kernel: int | None = None) -> tuple[int, int]:
    """(groups, kernel) from ``kernel_conv.weight.shape[0]`` = G·kernel², per the spec.

    K = 1 when O divides 640; K = 9 when O = 9·G with G dividing 640 (640 has no factor
    3, so never both). A given ``groups``/``kernel`` must agree with O.
    """
    check_groups_kernel(groups, kernel)
    if out_channels < 1:
        raise DMFExportError("dw_gen.kernel_conv has no output channels")
    if CHANNELS % out_channels == 0:
        inferred = (out_channels, 1)
    elif out_channels % 9 == 0 and CHANNELS % (out_channels // 9) == 0:
        inferred = (out_channels // 9, 3)
    else:
        raise DMFExportError(
            f"dw_gen.kernel_conv has {out_channels} output channels: not groups·kernel² "
            f"for any groups dividing {CHANNELS} and kernel 1 or 3")
    # O fixes both, so an override can only confirm them.
    given = {name: value for name, value in (("groups", groups), ("kernel", kernel))
             if value is not None}
    if any(given[name] != value for name, value in zip(("groups", "kernel"), inferred)
           if name in given):
        shown = ", ".join(f"{name}={value}" for name, value in given.items())
        raise DMFExportError(
            f"{shown} does not fit dw_gen.kernel_conv's {out_channels} output channels "
            f"(groups·kernel²; they mean groups={inferred[0]}, kernel={inferred[1]})")
    return inferred


# -- reading ---------------------------------------------------------------------------

def _short_list(names) -> str:
    names = list(names)
    shown = ", ".join(names[:_LIST_LIMIT])
    if len(names) > _LIST_LIMIT:
        shown += f", … and {len(names) - _LIST_LIMIT} more"
    return shown


def _sniff(path: Path) -> str:
    """'zip' or 'legacy' from the first bytes (and a zip's member names); otherwise
    DMFExportError saying what the file is instead (an artifact: which commands read it)."""
    if not path.exists():
        raise DMFExportError(f"cannot read {path}: no such file")
    if path.is_dir():
        raise DMFExportError(f"cannot read {path}: it is a directory, not a checkpoint file")
    try:
        kind = sniff.kind_of(path)
    except OSError as err:
        raise DMFExportError(f"cannot read {path}: {err.strerror or err}") from None
    if kind == sniff.EMPTY:
        raise DMFExportError(f"cannot read {path}: the file is empty")
    if kind in sniff.ARTIFACT_KINDS:
        raise DMFExportError(f"{path} is {kind} (an exported artifact), not a checkpoint: "
                             "`dmf-export inspect`, `evaluate`, `verify` and `bench` read it; "
                             "`export` and `--checkpoint` want the training checkpoint")
    if kind in (sniff.TORCH_ZIP, sniff.DAMAGED_ZIP):  # torch.load says what is damaged
        return "zip"
    if kind == sniff.PICKLE:
        return "legacy"
    if kind:
        raise DMFExportError(f"{path} is {kind}, not a PyTorch checkpoint")
    raise DMFExportError(
        f"{path} is not a PyTorch checkpoint (neither the zip nor the legacy serialisation)")


def _load_safely(path: Path, serialisation: str):
    """(content, storage locations): the file's objects on the CPU, and the devices its
    storages were saved from ('cpu', 'cuda:0', ...), without running pickled code."""
    locations: set[str] = set()

    def to_cpu(storage, location):
        locations.add(str(location))
        return storage  # read into CPU memory already; no device is touched

    try:
        with torch.serialization.safe_globals(list(NUMBER_GLOBALS)):
            content = torch.load(path, map_location=to_cpu, weights_only=True)
        return content, sorted(locations)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Weights only load failed" in message or "WeightsUnpickler" in message:
            raise DMFExportError(
                f"refusing to load {path}: it contains pickled code/objects that are not "
                f"plain tensors ({summarize(err)})") from None
        raise DMFExportError(
            f"cannot read {path}: truncated or corrupt {serialisation} checkpoint "
            f"({summarize(err)})") from None
    except Exception as err:  # whatever torch.load trips over in a damaged file
        if "Invalid magic number" in str(err):
            raise DMFExportError(f"{path} is not a PyTorch checkpoint "
                                 f"(a pickle, but not one torch.save wrote)") from None
        raise DMFExportError(
            f"cannot read {path}: truncated or corrupt {serialisation} checkpoint "
            f"({summarize(err)})") from None


def _plain_number(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # np.int64(89)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict without prefix, info): the file's tensors, read without running code.

    ``info``: path, serialisation ('legacy'/'zip'), saved_on (the devices the storages
    were saved from, sorted: ['cuda:0'] for the released files), wrapped (the original's
    {'state_dict', 'acc', 'epoch'} dict or a bare state dict), prefix ('' or
    'module.'), and epoch/acc when the wrapper holds them. Only the container is
    checked here; ``dmf_config`` checks that the entries are DMF's.
    """
    path = Path(path)
    serialisation = _sniff(path)
    content, locations = _load_safely(path, serialisation)
    info: dict = {"path": str(path), "serialisation": serialisation,
                  "saved_on": locations}
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        state_dict = content["state_dict"]
        info["wrapped"] = True
        for key in ("epoch", "acc"):
            value = _plain_number(content.get(key))
            if value is not None:
                info[key] = value
        extra = [str(key) for key in content if key not in WRAPPER_KEYS]
        if extra:
            info["extra_keys"] = extra
    elif isinstance(content, dict) and content and all(
            isinstance(value, torch.Tensor) for value in content.values()):
        state_dict = content
        info["wrapped"] = False
    else:
        kind = f"a dict with keys {_short_list(map(repr, content))}" if isinstance(content, dict) \
            else f"a {type(content).__name__}"
        raise DMFExportError(
            f"{path} is not a DMF checkpoint: expected a state dict or "
            f"{{'state_dict': …, 'acc': …, 'epoch': …}}, found {kind}")
    not_tensors = [str(key) for key, value in state_dict.items()
                   if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise DMFExportError(
            f"{path} is not a DMF checkpoint: state-dict entries that are not tensors: "
            f"{_short_list(not_tensors)}")
    prefix = ""
    while state_dict and all(key.startswith(prefix + DATAPARALLEL_PREFIX) for key in state_dict):
        prefix += DATAPARALLEL_PREFIX
    if prefix:
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    else:
        state_dict = dict(state_dict)
    info["prefix"] = prefix
    return state_dict, info


def dmf_config(state_dict: dict[str, torch.Tensor], groups: int | None = None,
               kernel: int | None = None, path="checkpoint") -> tuple[int, int, int]:
    """(groups, kernel, classes) of a DMF state dict; DMFExportError (naming ``path``)
    listing missing / unexpected entries or wrong shapes otherwise."""
    wanted = expected_keys()
    missing = [key for key in wanted if key not in state_dict]
    unexpected = [key for key in state_dict if key not in set(wanted)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_short_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_short_list(unexpected)})")
        raise DMFExportError(f"{path} is not a DMF checkpoint: entries " + "; ".join(parts))
    kernel_conv = state_dict["dw_gen.kernel_conv.weight"]
    if kernel_conv.dim() != 4:
        raise DMFExportError(
            f"{path} is not a DMF checkpoint: dw_gen.kernel_conv.weight has shape "
            f"{list(kernel_conv.shape)}, expected [groups·kernel², 640, 3, 3]")
    try:
        groups, kernel = infer_groups_kernel(kernel_conv.shape[0], groups, kernel)
    except DMFExportError as err:
        raise DMFExportError(f"{path}: {err}") from None
    classifier = state_dict["global_clasifier.weight"]
    classes = classifier.shape[0] if classifier.dim() == 4 else -1
    if classes == 0:
        raise DMFExportError(f"{path} is not a DMF checkpoint: global_clasifier has no classes")
    shapes = expected_shapes(groups, kernel, classes)
    wrong = [f"{key} {list(state_dict[key].shape)} (expected {list(shape)})"
             for key, shape in shapes.items() if tuple(state_dict[key].shape) != shape]
    if wrong:
        raise DMFExportError(
            f"{path} is not a DMF checkpoint (groups={groups}, kernel={kernel}): "
            f"{len(wrong)} entries of the wrong shape: {_short_list(wrong)}")
    bad_dtype = [key for key, value in state_dict.items()
                 if (key.endswith("num_batches_tracked") and value.is_floating_point())
                 or (not key.endswith("num_batches_tracked") and not value.is_floating_point())]
    if bad_dtype:
        raise DMFExportError(f"{path} is not a DMF checkpoint: entries of an unexpected "
                             f"dtype: {_short_list(bad_dtype)}")
    return groups, kernel, classes


def load_checkpoint(path, groups: int | None = None, kernel: int | None = None):
    """The eager ``DMF`` model of a checkpoint: eval mode, float32, CPU, no gradients.

    Reads the original ``{'state_dict', 'acc', 'epoch'}`` dict or a bare state dict,
    legacy or zip serialisation, with or without DataParallel's ``module.`` prefix.
    ``groups``/``kernel`` default to what ``dw_gen.kernel_conv`` implies.
    """
    state_dict, _ = read_checkpoint(path)
    groups, kernel, classes = dmf_config(state_dict, groups, kernel, path=path)
    model = DMF(groups=groups, kernel=kernel, num_classes=classes)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


# The training classes of the benchmarks the original was trained on (its global
# classifier has one output per class). CIFAR-FS also trains 64 classes.
DATASETS_BY_CLASSES = {64: "miniImageNet", 351: "tieredImageNet"}


def dataset_of(classes: int) -> str:
    """The benchmark a classifier of ``classes`` outputs suggests, or 'unknown'."""
    return DATASETS_BY_CLASSES.get(classes, "unknown")


def inspect_checkpoint(path) -> dict:
    """What a checkpoint is, as a JSON-serialisable dict (``dmf-export inspect``)."""
    state_dict, info = read_checkpoint(path)
    groups, kernel, classes = dmf_config(state_dict, path=path)
    dtypes = sorted({str(value.dtype).replace("torch.", "")
                     for key, value in state_dict.items() if value.is_floating_point()})
    report = {
        "path": info["path"],
        "serialisation": info["serialisation"],
        "wrapped": info["wrapped"],
        "prefix": info["prefix"],
        "groups": groups,
        "kernel": kernel,
        "classes": classes,
        "dataset": dataset_of(classes),
        "parameters": sum(value.numel() for key, value in state_dict.items() if _is_parameter(key)),
        "entries": len(state_dict),
        "dtype": ",".join(dtypes),
        "size_bytes": Path(path).stat().st_size,
        "saved_on": info["saved_on"],
    }
    for key in ("epoch", "acc", "extra_keys"):
        if key in info:
            report[key] = info[key]
    return report
