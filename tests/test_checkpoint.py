"""Safe checkpoint loading, configuration inference, random checkpoints, ``inspect``."""
from __future__ import annotations

import builtins
import json
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dmf_export.checkpoint import (infer_groups_kernel, inspect_checkpoint, load_checkpoint,
                                   random_state_dict, read_checkpoint, write_random_checkpoint)
from dmf_export.cli import main as cli
from dmf_export.errors import DMFExportError
from reference_dmf import dmf_reference

LEGACY_HEAD = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled torch.save magic number
ZIP_HEAD = b"PK\x03\x04"


def _save(obj, path, legacy=True):
    """What the original training code (PyTorch 1.4: legacy) or a newer PyTorch does."""
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _with_kernel_conv(state_dict, out_channels):
    changed = dict(state_dict)
    changed["dw_gen.kernel_conv.weight"] = torch.zeros(out_channels, 640, 3, 3)
    return changed


def _parameter_count(groups, kernel, classes):
    """DMF_SPEC.md by hand: convs and BN affine of the backbone, then the head."""
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
    from dmf_export.models import DMF
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
    data = path.read_bytes()
    for storage in (b"FloatStorage", b"LongStorage"):
        assert b"ctorch\n" + storage + b"\n" in data
        data = data.replace(b"ctorch\n" + storage + b"\n", b"ctorch.cuda\n" + storage + b"\n")
    assert b"X\x03\x00\x00\x00cpu" in data
    path.write_bytes(data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"))
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


@pytest.mark.parametrize("classes", [64, 351])
def test_classes_come_from_the_global_classifier(classes, dmf_state_dict, tmp_path):
    state = dict(dmf_state_dict(64, 1))
    state["global_clasifier.weight"] = torch.randn(classes, 640, 1, 1)
    state["global_clasifier.bias"] = torch.randn(classes)
    path = _save({"state_dict": state, "acc": 0.7, "epoch": 3}, tmp_path / "c.pth.tar")
    assert inspect_checkpoint(path)["classes"] == classes
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
    (b"epoch 90, acc 0.64\nnot a checkpoint\n", "not a PyTorch checkpoint"),
    (pickle.dumps({"state_dict": {}}, protocol=2), "not a PyTorch checkpoint"),
], ids=["empty", "text", "plain-pickle"])
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
    from dmf_export import checkpoint
    first, other = dmf_state_dict(64, 1, seed=0), random_state_dict(64, 1, seed=1)
    checkpoint._random_backbone.cache_clear()  # regenerate, not recall
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


def test_inspect_text(checkpoint_file):
    path = checkpoint_file(groups=160, kernel=1, classes=351, legacy=False, bare=True)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert lines["serialisation"] == ["zip"] and lines["groups"] == ["160"]
    assert lines["kernel"] == ["1"] and lines["classes"] == ["351"]
    assert lines["parameters"] == [str(_parameter_count(160, 1, 351))]
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
