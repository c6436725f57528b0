"""Safe checkpoint loading, configuration inference, random checkpoints, ``inspect``."""
from __future__ import annotations

import builtins
import gzip
import importlib
import io
import json
import os
import pickle
import pickletools
import zipfile
from collections import OrderedDict

import numpy as np

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dmf_export import synthetic
from dmf_export.checkpoint import infer_groups_kernel, inspect_checkpoint, load_checkpoint, read_checkpoint
from dmf_export.cli import main as cli
from dmf_export.errors import DMFExportError
from dmf_export.models import DMF
from dmf_export.synthetic import random_state_dict, write_random_checkpoint
from reference_dmf import dmf_reference

LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled torch.save magic number
ZIP_HEAD = b"PK\x03\x04"


def _save(obj, path, legacy=True):
    """What the original training code (PyTorch 1.4: legacy) or a newer PyTorch does."""
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _rewrite_zip_entry(path, suffix, change):
    """Rewrite the entry of a zip checkpoint whose name ends with `suffix` by `change`
    (bytes -> bytes), every other entry kept, uncompressed as torch writes them."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    assert any(name.endswith(suffix) for name, _ in entries), suffix
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries:
            archive.writestr(name, change(content) if name.endswith(suffix) else content)
    return path


def _rewrite_pickles(path, replacements):
    """Replace bytes in a checkpoint's pickles: the whole file (legacy: its pickles are read
    one after another, nothing points into them) or a zip's data.pkl."""
    def change(data):
        for old, new in replacements:
            assert old in data, old
            data = data.replace(old, new)
        return data

    if path.read_bytes()[:4] == ZIP_HEAD:
        return _rewrite_zip_entry(path, "/data.pkl", change)
    path.write_bytes(change(path.read_bytes()))
    return path


# the pickled location string of a storage torch.save found on the CPU, and a GPU's
_CPU_LOCATION = (b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")


def _with_kernel_conv(state_dict, out_channels):
    changed = dict(state_dict)
    changed["dw_gen.kernel_conv.weight"] = torch.zeros(out_channels, 640, 3, 3)
    return changed


def _parameter_count(groups, kernel, classes):
    """The original layout by hand: convs and BN affine of the backbone, then the head."""
    total, cin = 0, 3
    for width in (64, 160, 320, 640):
        total += 9 * cin * width + 2 * 9 * width * width + cin * width + 4 * 2 * width
        cin = width
    return total + classes * 640 + classes + 18 * 1280 * 25 + groups * kernel ** 2 * 640 * 9


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("layout", ["wrapped", "bare", "dataparallel"])
def test_round_trip_gives_identical_tensors(legacy, layout, dmf_state_dict, tmp_path):
    state = dmf_state_dict(64, 1)
    saved = OrderedDict(("module." + k if layout == "dataparallel" else k, v)
                        for k, v in state.items())
    content = saved if layout == "bare" else {"state_dict": saved, "acc": 0.61, "epoch": 87}
    path = _save(content, tmp_path / "model.pth.tar", legacy=legacy)
    assert path.read_bytes()[:4] == (LEGACY_HEAD[:4] if legacy else ZIP_HEAD)

    model = load_checkpoint(path)
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert (model.groups, model.kernel, model.num_classes) == (64, 1, 64)


def test_model_state_dict_with_metadata_loads(tmp_path):
    # torch's own OrderedDict state dicts carry a `_metadata` attribute in the pickle
    source = DMF(64, 3, num_classes=64)
    for legacy in (True, False):
        path = _save({"state_dict": source.state_dict(), "acc": 0.5, "epoch": 1},
                     tmp_path / f"m{legacy}.pth.tar", legacy)
        loaded = load_checkpoint(path).state_dict()
        for key, value in source.state_dict().items():
            assert torch.equal(loaded[key], value), key


def test_legacy_checkpoint_of_a_cuda_model_loads_on_cpu(dmf_state_dict, tmp_path):
    # What training on a GPU with PyTorch 1.4 writes: legacy storages typed
    # torch.cuda.*Storage at location 'cuda:0' (rewritten here from a CPU save).
    state = dmf_state_dict(64, 1)
    path = _save({"state_dict": state, "acc": 0.6, "epoch": 9}, tmp_path / "gpu.pth.tar")
    _rewrite_pickles(path, [(b"ctorch\n" + storage + b"\n", b"ctorch.cuda\n" + storage + b"\n")
                            for storage in (b"FloatStorage", b"LongStorage")] + [_CPU_LOCATION])
    loaded = load_checkpoint(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert loaded["dw_gen.off_conv.weight"].device.type == "cpu"


def test_read_checkpoint_reports_the_container(dmf_state_dict, tmp_path):
    state = {"module." + k: v for k, v in dmf_state_dict(64, 1).items()}
    path = _save({"state_dict": state, "acc": 0.64, "epoch": 90}, tmp_path / "x.pth.tar")
    tensors, info = read_checkpoint(path)
    assert set(tensors) == set(dmf_state_dict(64, 1))
    assert info["serialisation"] == "legacy" and info["wrapped"] is True
    assert info["prefix"] == "module." and info["epoch"] == 90 and info["acc"] == 0.64


@pytest.mark.parametrize("numpy_name", [b"numpy._core.multiarray", b"numpy.core.multiarray"],
                         ids=["numpy2", "numpy1"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_numpy_scalar_metadata_loads(legacy, numpy_name, dmf_state_dict, tmp_path):
    # what many training scripts write: the metrics as numpy scalars (numpy 1.x pickles
    # their reconstruction as numpy.core..., 2.x as numpy._core...)
    path = _save({"state_dict": dmf_state_dict(64, 1), "acc": np.float64(0.68),
                  "epoch": np.int64(89)}, tmp_path / "np.pth.tar", legacy)
    written = b"c" + np.float64(0).__reduce__()[0].__module__.encode() + b"\nscalar\n"
    _rewrite_pickles(path, [(written, b"c" + numpy_name + b"\nscalar\n")])
    info = inspect_checkpoint(path)
    assert info["epoch"] == 89 and type(info["epoch"]) is int
    assert info["acc"] == 0.68 and type(info["acc"]) is float
    assert load_checkpoint(path).num_classes == 64


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("extra,found", [
    (np.array([0.5, 0.6]), "_reconstruct"),       # an array: more than a scalar
    (np.float64(0.5), "not a plain number"),      # a scalar whose dtype says 'object'
    (np.dtype("float64").type, "float64"),        # a numpy class itself
], ids=["array", "object_scalar", "class"])
def test_numpy_beyond_plain_scalars_is_refused(legacy, extra, found, tmp_path):
    path = _save({"state_dict": {"w": torch.zeros(2)}, "acc": 0.5, "history": extra},
                 tmp_path / "np.pth.tar", legacy)
    if found == "not a plain number":
        _rewrite_pickles(path, [(b"X\x02\x00\x00\x00f8", b"X\x02\x00\x00\x00O8")])
    with pytest.raises(DMFExportError, match=f"refusing to load .*{found}") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_inspect_says_where_the_storages_were_saved(legacy, dmf_state_dict, tmp_path):
    path = _save({"state_dict": dmf_state_dict(64, 1), "acc": 0.6, "epoch": 9},
                 tmp_path / "c.pth.tar", legacy)
    assert inspect_checkpoint(path)["saved_on"] == ["cpu"]
    _rewrite_pickles(path, [_CPU_LOCATION])  # as the released files, written on a GPU
    assert inspect_checkpoint(path)["saved_on"] == ["cuda:0"]
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert lines["saved_on"] == ["cuda:0"]


# -- groups / kernel / classes -----------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_64_3(tmp_path_factory, dmf_state_dict):
    """One legacy {'state_dict', 'acc', 'epoch'} file, G = 64, K = 3, shared read-only."""
    path = tmp_path_factory.mktemp("shared") / "dmf_64_3.pth.tar"
    return _save({"state_dict": dmf_state_dict(64, 3), "acc": 0.5, "epoch": 2}, path)


@pytest.mark.parametrize("out_channels,groups,kernel", [
    (64, 64, 1), (160, 160, 1), (640, 640, 1), (5, 5, 1), (1, 1, 1),
    (576, 64, 3), (1440, 160, 3), (5760, 640, 3), (90, 10, 3),
])
def test_groups_and_kernel_follow_from_kernel_conv_channels(out_channels, groups, kernel):
    assert infer_groups_kernel(out_channels) == (groups, kernel)


@pytest.mark.parametrize("out_channels,groups,kernel", [(160, 160, 1), (90, 10, 3)])
def test_inspect_infers_groups_and_kernel(out_channels, groups, kernel, dmf_state_dict, tmp_path):
    path = _save(_with_kernel_conv(dmf_state_dict(64, 1), out_channels), tmp_path / "c.pth")
    info = inspect_checkpoint(path)
    assert (info["groups"], info["kernel"]) == (groups, kernel)


def test_loaded_model_has_inferred_configuration(dmf_state_dict, tmp_path):
    path = _save(dmf_state_dict(160, 3), tmp_path / "c.pth", legacy=False)
    model = load_checkpoint(path)
    assert (model.groups, model.kernel) == (160, 3)
    assert model.dw_gen.kernel_conv.weight.shape == (1440, 640, 3, 3)


def test_consistent_override_is_accepted(saved_64_3):
    model = load_checkpoint(saved_64_3, groups=64, kernel=3)
    assert (model.groups, model.kernel) == (64, 3)
    assert load_checkpoint(saved_64_3, kernel=3).groups == 64


@pytest.mark.parametrize("override,message", [
    (dict(kernel=1), r"kernel=1 does not fit dw_gen.kernel_conv's 576 output channels "
                     r"\(groups·kernel²; they mean groups=64, kernel=3\)"),
    (dict(groups=32), "groups=32 does not fit"),
    (dict(groups=64, kernel=1), "groups=64, kernel=1 does not fit"),
    (dict(kernel=2), "kernel must be 1 or 3"),
    (dict(groups=100), "groups must divide 640"),
])
def test_inconsistent_override_is_refused(override, message, saved_64_3):
    with pytest.raises(DMFExportError, match=message) as err:
        load_checkpoint(saved_64_3, **override)
    assert str(saved_64_3) in str(err.value)


@pytest.mark.parametrize("out_channels", [100, 27, 7, 1280, 0])
def test_kernel_conv_channels_that_are_not_dmf(out_channels):
    with pytest.raises(DMFExportError, match=f"{out_channels} output channels|no output"):
        infer_groups_kernel(out_channels)


def test_checkpoint_whose_kernel_conv_is_not_dmf_is_refused(dmf_state_dict, tmp_path):
    path = _save(_with_kernel_conv(dmf_state_dict(64, 1), 100), tmp_path / "c.pth")
    with pytest.raises(DMFExportError, match="100 output channels") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("classes", [64, 351, 100])
def test_classes_come_from_the_global_classifier(classes, dmf_state_dict, tmp_path):
    state = dict(dmf_state_dict(64, 1))
    state["global_clasifier.weight"] = torch.randn(classes, 640, 1, 1)
    state["global_clasifier.bias"] = torch.randn(classes)
    path = _save({"state_dict": state, "acc": 0.7, "epoch": 3}, tmp_path / "c.pth.tar")
    assert inspect_checkpoint(path)["classes"] == classes
    assert inspect_checkpoint(path)["dataset"] == {64: "miniImageNet", 351: "tieredImageNet",
                                                   100: "unknown"}[classes]
    model = load_checkpoint(path)
    assert model.num_classes == classes and model.global_clasifier.out_channels == classes
    assert torch.equal(model.global_clasifier.bias, state["global_clasifier.bias"])


# -- refusing bad files ------------------------------------------------------------------------

class _CreatesAFile:
    """Unpickling this (with plain pickle) opens, i.e. creates, ``target``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_pickle_payload_is_refused_and_never_runs(legacy, tmp_path):
    target = tmp_path / "created-by-unpickling"
    path = _save({"state_dict": {"dw_gen.off_conv.weight": torch.zeros(18, 1280, 5, 5)},
                  "acc": 0.5, "epoch": 1, "payload": _CreatesAFile(target)},
                 tmp_path / "evil.pth.tar", legacy)
    with pytest.raises(DMFExportError, match="refusing to load .*pickled code") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DMFExportError, match="refusing to load"):
        inspect_checkpoint(path)
    assert not target.exists()
    # the payload is live: an unsafe load does create the file
    torch.load(path, weights_only=False)
    assert target.exists()


def _call_pickle(module, name, *args):
    """A protocol-2 pickle of module.name(*args), written by hand (GLOBAL, args, REDUCE) as
    a hostile file would hold it, whatever the function's own __module__ says."""
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, protocol=2)[2:-1]
            + b"R.")


def _payloads(target):
    """Pickles that each create `target` when unpickled (with plain pickle)."""
    quoted = repr(str(target))
    return {
        "builtins.open": _call_pickle("builtins", "open", str(target), "w"),
        "os.system": _call_pickle("os", "system", f"touch {quoted}"),
        "posix.system": _call_pickle("posix", "system", f"touch {quoted}"),
        "eval": _call_pickle("builtins", "eval", f"open({quoted}, 'w')"),
        "exec": _call_pickle("builtins", "exec", f"open({quoted}, 'w').close()"),
        "subprocess.run": _call_pickle("subprocess", "run", ["touch", str(target)]),
    }


PAYLOAD_NAMES = list(_payloads("x"))


@pytest.mark.parametrize("payload", PAYLOAD_NAMES)
def test_the_hostile_payloads_are_live(payload, tmp_path):
    # each would create its file: so a test that it did not proves the loader refused it
    target = tmp_path / "created"
    pickle.loads(_payloads(target)[payload])
    assert target.exists()


def _legacy_pickles(data):
    """A legacy file's five pickles (magic number, protocol, sys_info, the object, storage
    keys) and the raw storage bytes after them; walked with pickletools, nothing runs."""
    stream, pieces = io.BytesIO(data), []
    for _ in range(5):
        start = stream.tell()
        for opcode, _, _ in pickletools.genops(stream):
            if opcode.name == "STOP":
                break
        pieces.append(data[start:stream.tell()])
    return pieces, data[stream.tell():]


LEGACY_PICKLES = ["magic_number", "protocol", "sys_info", "object", "storage_keys"]


def _in_a_list(payload):
    return b"\x80\x02](" + payload[2:-1] + b"e."  # [payload], as storage keys are a list


def _hostile_file(where, payload, tmp_path):
    path = tmp_path / "hostile.pth.tar"
    content = {"state_dict": {"w": torch.zeros(3)}, "acc": 0.5, "epoch": 1}
    if where == "zip_data.pkl":
        return _rewrite_zip_entry(_save(content, path, legacy=False), "/data.pkl",
                                  lambda _: payload)
    pieces, storages = _legacy_pickles(_save(content, path).read_bytes())
    index = LEGACY_PICKLES.index(where)
    pieces[index] = _in_a_list(payload) if where == "storage_keys" else payload
    path.write_bytes(b"".join(pieces) + storages)
    return path


@pytest.mark.parametrize("payload", PAYLOAD_NAMES)
@pytest.mark.parametrize("where", LEGACY_PICKLES + ["zip_data.pkl"])
def test_hostile_pickle_anywhere_is_refused_and_never_runs(where, payload, tmp_path):
    target = tmp_path / "created-by-unpickling"
    path = _hostile_file(where, _payloads(target)[payload], tmp_path)
    for read in (read_checkpoint, load_checkpoint, inspect_checkpoint):
        with pytest.raises(DMFExportError, match="refusing to load .*pickled code") as err:
            read(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert payload.removeprefix("builtins.") in str(err.value)  # names what it refused
    assert not target.exists()


class _Calls:
    """Pickled (by torch.save, i.e. plain pickle) as a call of module.name(*args)."""

    def __init__(self, module, name, *args):
        self.function, self.args = getattr(importlib.import_module(module), name), args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("call", [("builtins", "eval"), ("os", "system"),
                                  ("subprocess", "run")], ids=["eval", "os.system", "subprocess"])
def test_payload_deep_inside_the_state_dict_is_refused_and_never_runs(legacy, call, tmp_path):
    target = tmp_path / "created-by-unpickling"
    argument = {"eval": f"open({str(target)!r}, 'w')", "system": f"touch {str(target)!r}",
                "run": ["touch", str(target)]}[call[1]]
    state = {"base.layer1.0.conv1.weight": torch.zeros(2),
             "deep": {"a": [{"b": (1, OrderedDict(c=_Calls(*call, argument)))}]}}
    path = _save({"state_dict": state, "acc": 0.5, "epoch": 1}, tmp_path / "deep.pth", legacy)
    with pytest.raises(DMFExportError, match="refusing to load .*pickled code") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
    assert not target.exists()


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_truncated_file_is_one_clear_error(legacy, dmf_state_dict, tmp_path):
    whole = _save(dmf_state_dict(64, 1), tmp_path / "whole.pth", legacy).read_bytes()
    for cut in (len(whole) - 10, len(whole) // 2, 100):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(whole[:cut])
        with pytest.raises(DMFExportError, match="truncated or corrupt") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"epoch 90, acc 0.64\nnot a checkpoint\n", "is a text file, not a PyTorch checkpoint"),
    (pickle.dumps({"state_dict": {}}, protocol=2), "not a PyTorch checkpoint"),
    (gzip.compress(b"\x80\x02}q\x00."), "is a gzip file, not a PyTorch checkpoint"),
    (b"PK\x05\x06" + bytes(18), "is a zip archive, not a PyTorch checkpoint"),
], ids=["empty", "text", "plain-pickle", "gzip", "other-zip"])
def test_files_that_are_not_checkpoints(content, message, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(DMFExportError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DMFExportError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(DMFExportError, match="directory"):
        load_checkpoint(tmp_path)


def test_other_model_lists_missing_and_unexpected(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    path = _save({"state_dict": other.state_dict(), "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(DMFExportError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "is not a DMF checkpoint" in message
    assert "104 missing (base.layer1.0.num_batches_tracked, base.layer1.0.conv1.weight" in message
    assert "… and 98 more" in message  # long lists are truncated
    assert "9 unexpected (0.weight, 0.bias" in message
    assert "\n" not in message


def test_one_missing_and_one_unexpected_entry_are_named(dmf_state_dict, tmp_path):
    state = dict(dmf_state_dict(64, 1))
    state["dw_gen.offset_conv.weight"] = state.pop("dw_gen.off_conv.weight")
    path = _save(state, tmp_path / "c.pth")
    with pytest.raises(DMFExportError, match=r"1 missing \(dw_gen.off_conv.weight\); "
                                             r"1 unexpected \(dw_gen.offset_conv.weight\)"):
        load_checkpoint(path)


def test_entry_of_the_wrong_shape_is_named(dmf_state_dict, tmp_path):
    state = dict(dmf_state_dict(64, 1))
    state["dw_gen.off_conv.weight"] = torch.zeros(18, 1280, 3, 3)
    path = _save(state, tmp_path / "c.pth")
    with pytest.raises(DMFExportError, match=r"dw_gen.off_conv.weight \[18, 1280, 3, 3\] "
                                             r"\(expected \[18, 1280, 5, 5\]\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [torch.zeros(3), [1, 2], {"acc": 0.5}, {}])
def test_other_contents_are_refused(content, tmp_path):
    path = _save(content, tmp_path / "c.pth")
    with pytest.raises(DMFExportError, match="not a DMF checkpoint"):
        load_checkpoint(path)


# -- random checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_random_checkpoint_has_the_original_layout(legacy, checkpoint_file, tmp_path):
    path = checkpoint_file(groups=64, kernel=3, classes=351, seed=0, legacy=legacy)
    assert path.read_bytes()[:len(LEGACY_HEAD) if legacy else 4] == (
        LEGACY_HEAD if legacy else ZIP_HEAD)
    content = torch.load(path, weights_only=True)
    assert set(content) == {"state_dict", "acc", "epoch"}
    state = content["state_dict"]
    assert len(state) == 104
    assert state["dw_gen.kernel_conv.weight"].shape == (576, 640, 3, 3)
    assert state["global_clasifier.weight"].shape == (351, 640, 1, 1)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64 and value.shape == ()
        else:
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
        if key.endswith("running_var"):
            assert (value > 0).all(), key
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary left behind


def test_random_checkpoint_bare_and_prefixed(checkpoint_file):
    path = checkpoint_file(bare=True, prefix="module.", legacy=False)
    content = torch.load(path, weights_only=True)
    assert len(content) == 104 and all(k.startswith("module.base.") or k.startswith(
        ("module.global_clasifier.", "module.dw_gen.")) for k in content)
    info = inspect_checkpoint(path)
    assert (info["wrapped"], info["prefix"], info["serialisation"]) == (False, "module.", "zip")


def test_random_weights_are_seeded(dmf_state_dict):
    first, other = dmf_state_dict(64, 1, seed=0), random_state_dict(64, 1, seed=1)
    synthetic._random_backbone.cache_clear()  # regenerate, not recall
    again = random_state_dict(64, 1, seed=0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["dw_gen.off_conv.weight"], other["dw_gen.off_conv.weight"])
    assert not torch.equal(first["base.layer1.0.conv1.weight"], other["base.layer1.0.conv1.weight"])


def test_random_checkpoint_replaces_an_existing_file(tmp_path):
    path = tmp_path / "dmf.pth.tar"
    path.write_bytes(b"old contents")
    write_random_checkpoint(path, groups=640, kernel=1, seed=0, legacy=False)
    assert inspect_checkpoint(path)["groups"] == 640
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_random_weights_are_not_degenerate(dmf_state_dict, make_episode):
    # measured with the independent reference, on an 84×84 episode (11×11 features)
    state = dmf_state_dict(64, 3)
    support, labels, query = make_episode(way=3, shot=1, queries=2, size=84, seed=1)
    scores, parts = dmf_reference(state, support, labels, query, 64, 3, details=True)
    assert 0.3 < parts["features"].pow(2).mean().sqrt() < 5
    offsets = parts["offsets"].abs()
    assert 0.3 < offsets.pow(2).mean().sqrt() < 3  # of order a pixel
    assert (offsets > 0.5).float().mean() > 0.2
    filters = parts["filters"]
    assert 0.3 < filters.mean() < 0.7 and filters.std() > 0.08
    assert ((filters < 0.01) | (filters > 0.99)).float().mean() < 0.05  # not saturated
    assert torch.isfinite(scores).all()
    spread = scores.max(1).values - scores.min(1).values
    assert (spread / scores.abs().mean(1) > 2e-3).all()  # classes clearly different


# -- dmf-export inspect -------------------------------------------------------------------------

def test_inspect_json(dmf_state_dict, tmp_path):
    state = {"module." + k: v for k, v in dmf_state_dict(64, 3).items()}
    path = _save({"state_dict": state, "acc": 0.6543, "epoch": 42}, tmp_path / "m.pth.tar")
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["path"] == str(path)
    assert info["serialisation"] == "legacy"
    assert info["wrapped"] is True and info["prefix"] == "module."
    assert (info["groups"], info["kernel"], info["classes"]) == (64, 3, 64)
    assert info["entries"] == 104
    assert info["parameters"] == _parameter_count(64, 3, 64)
    assert info["epoch"] == 42 and info["acc"] == pytest.approx(0.6543)
    assert info["dataset"] == "miniImageNet" and info["saved_on"] == ["cpu"]


def test_inspect_text_says_an_unknown_class_count(dmf_state_dict, tmp_path):
    state = dict(dmf_state_dict(64, 1))
    state["global_clasifier.weight"] = torch.zeros(100, 640, 1, 1)
    state["global_clasifier.bias"] = torch.zeros(100)
    result = CliRunner().invoke(cli, ["inspect", str(_save(state, tmp_path / "c.pth"))])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith("dataset")] == [
        "dataset        unknown (100 classes: not miniImageNet's 64 nor tieredImageNet's 351)"]


def test_inspect_text(checkpoint_file):
    path = checkpoint_file(groups=160, kernel=1, classes=351, legacy=False, bare=True)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert lines["serialisation"] == ["zip"] and lines["groups"] == ["160"]
    assert lines["kernel"] == ["1"] and lines["classes"] == ["351"]
    assert lines["parameters"] == [str(_parameter_count(160, 1, 351))]
    assert lines["dataset"] == ["tieredImageNet", "(by", "its", "351", "classes)"]
    assert lines["saved_on"] == ["cpu"]
    assert "epoch" not in lines


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_error_is_one_line_and_nonzero(as_json, tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    result = CliRunner().invoke(cli, ["inspect", str(path)] + (["--json"] if as_json else []))
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "empty" in lines[0]
    assert "Traceback" not in result.output
