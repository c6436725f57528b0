"""The format registry: one surface for every format, options that apply to one format
refused for another, artifacts that are not what they claim refused in one line, and
exports that land whole or not at all."""
from __future__ import annotations

import os
import re
import shutil
import tomllib
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from cli_helpers import one_error_line
from cli_helpers import run_cli as run
from onnx import TensorProto, helper

from dmf_export import formats
from dmf_export.synthetic import write_random_checkpoint
from dmf_export.contract import EpisodeSize, make_episode
from dmf_export.errors import DMFExportError
from dmf_export.formats.base import Format, Staging
from dmf_export.formats.onnx import Onnx

PACKAGE = Path(__file__).resolve().parent.parent / "dmf_export"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("formats") / "m.pth.tar", seed=4)


# -- the registry ---------------------------------------------------------------------

def test_every_format_fills_in_the_one_surface():
    assert formats.names() == ["torchscript", "onnx", "aoti", "tensorrt", "triton"]
    suffixes = [f.suffix for f in formats.all_formats()]
    assert len(set(suffixes)) == len(suffixes)
    for fmt in formats.all_formats():
        assert isinstance(fmt, Format) and fmt.title and fmt.suffix.startswith(".")
        for method in ("read_info", "open"):
            assert getattr(type(fmt), method) is not getattr(Format, method), (fmt.name, method)
        assert type(fmt).write_graph is not Format.write_graph or type(fmt).write is not Format.write
        assert formats.for_path(Path(f"x.encoder{fmt.suffix}")) is fmt


def test_a_format_this_machine_cannot_make_says_why_and_export_refuses_before_any_work(
        checkpoint, tmp_path, monkeypatch):
    """``unavailable`` names what is missing in one line (None: nothing is), and export
    refuses with those words before it loads the checkpoint."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    for name in ("torchscript", "onnx", "triton"):  # plain files from any CPU machine
        assert formats.get(name).unavailable(purpose="export") is None, name
    for name in ("torchscript", "onnx"):
        assert formats.get(name).unavailable() is None, name
    reasons = {"aoti": formats.get("aoti").unavailable(purpose="export"),
               "tensorrt": formats.get("tensorrt").unavailable(purpose="export")}
    assert "no C++ compiler" in reasons["aoti"]
    assert re.search("TensorRT is not installed|needs a CUDA GPU", reasons["tensorrt"])
    for name, reason in reasons.items():
        assert "\n" not in reason
        fmt = formats.get(name)
        code, out = run("export", checkpoint, "-f", name, "-o", tmp_path / f"m{fmt.suffix}", "--no-verify")
        assert code == 2 and one_error_line(out) == f"Error: cannot export {fmt.title} here: {reason}"
    assert list(tmp_path.iterdir()) == []
    if shutil.which("c++"):  # with a compiler, what a CUDA package lacks here is the GPU
        monkeypatch.delenv("CXX")
        assert formats.get("aoti").unavailable(purpose="export") is None
        assert "needs a GPU" in formats.get("aoti").unavailable("cuda", purpose="export")


def test_the_command_line_offers_exactly_the_registered_formats():
    code, out = run("export", "--help")
    assert code == 0
    choices = out[out.index("--format"):].split("[", 1)[1].split("]", 1)[0]
    assert choices.replace("\n", "").replace(" ", "").split("|") == formats.names()


# -- options that belong to another format ---------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["-f", "aoti", "--onnx-flavor", "plugin"], "--onnx-flavor applies to --format onnx, not aoti"),
    (["-f", "onnx", "--max-way", "8"], "--max-way applies to --format tensorrt, not onnx"),
    (["-f", "torchscript", "--device", "cuda"], "--device applies to --format aoti, not torchscript"),
    (["-f", "aoti", "--precision", "fp16"], "fp16 AOTInductor packages are for a GPU"),
    (["-f", "tensorrt", "--graph", "split"], "--graph episode"),
])
def test_an_option_of_another_format_is_one_clear_line(checkpoint, tmp_path, args, needle):
    code, out = run("export", checkpoint, *args, "-o", tmp_path / "x")
    assert code != 0 and needle in one_error_line(out)
    assert list(tmp_path.iterdir()) == []


def test_a_run_switch_of_another_format_is_one_clear_line(exported):
    _, (path,) = exported(64, 1, "onnx")
    with pytest.raises(DMFExportError, match="--plugin applies to tensorrt artifacts, not onnx"):
        formats.open_artifact(path, plugin="/x.so")


# -- artifacts that are not what they claim ----------------------------------------------

def _bad_artifacts(kind: str, real: Path, tmp_path: Path) -> Path:
    suffix = real.suffix
    target = tmp_path / f"{kind}{suffix}"
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        target.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    elif kind == "text":
        target.write_text("not a model\n")
    elif kind == "foreign":  # a valid file of that kind, not written by dmf-export
        foreign = {".onnx": _foreign_onnx, ".ts": _foreign_torchscript, ".pt2": _foreign_zip}[suffix]
        foreign(target)
    return target


def _foreign_onnx(path):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))


def _foreign_torchscript(path):
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(path))


def _foreign_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", b"not a package")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "aoti"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "foreign"])
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_a_damaged_or_foreign_artifact_is_one_clear_line(exported, checkpoint, tmp_path, fmt, kind, command):
    if formats.get(fmt).unavailable():
        pytest.skip(formats.get(fmt).unavailable())
    _, (real,) = exported(64, 1, fmt)
    bad = _bad_artifacts(kind, real, tmp_path)
    args = ["--sizes", "2w1s1q", "--no-eager", "--no-backbone"] if command == "bench" else []
    code, out = run(command, bad, "-c", checkpoint, *args)
    assert code == 2, out
    assert str(bad) in one_error_line(out)


@pytest.mark.parametrize("kind", ["empty", "text"])
def test_a_damaged_engine_is_one_clear_line(checkpoint, tmp_path, kind):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"" if kind == "empty" else b"not an engine")
    (tmp_path / "m.engine.json").write_text("{not json" if kind == "text" else "{}")
    code, out = run("verify", engine, "-c", checkpoint)
    assert code == 2 and "m.engine" in one_error_line(out)


# -- all or nothing ----------------------------------------------------------------------

def test_an_onnx_file_that_fails_its_check_never_lands(checkpoint, tmp_path, monkeypatch):
    written = []

    def failing_check(path, *args, **kwargs):
        written.append(Path(path).stat().st_size)  # the exporter did write it, in full
        raise onnx.checker.ValidationError("bad node")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    code, out = run("export", checkpoint, "-f", "onnx", "-o", tmp_path / "m.onnx", "--image-size", 32)
    assert code == 2 and "bad node" in one_error_line(out)
    assert written and written[0] > 1_000_000
    assert list(tmp_path.iterdir()) == []


def test_a_split_export_whose_head_fails_leaves_no_encoder(checkpoint, tmp_path, monkeypatch):
    real = Onnx.write_graph

    def head_fails(self, job, graph, path, log):
        if graph == "head":
            raise RuntimeError("head exploded")
        real(self, job, graph, path, log)
        assert path.stat().st_size > 1_000_000  # the encoder was really written

    monkeypatch.setattr(Onnx, "write_graph", head_fails)
    code, out = run("export", checkpoint, "-f", "onnx", "--graph", "split", "-o", tmp_path / "m",
                    "--image-size", 32, "--no-verify")
    assert code == 2 and "head graph failed" in one_error_line(out)
    assert list(tmp_path.iterdir()) == []


def test_a_forced_export_that_fails_keeps_the_old_files(checkpoint, tmp_path, monkeypatch):
    old = {tmp_path / "m.encoder.onnx": "old encoder", tmp_path / "m.head.onnx": "old head"}
    for path, text in old.items():
        path.write_text(text)

    def fails(self, job, graph, path, log):
        raise RuntimeError("no space left")

    monkeypatch.setattr(Onnx, "write_graph", fails)
    code, out = run("export", checkpoint, "-f", "onnx", "--graph", "split", "-o", tmp_path / "m",
                    "--force", "--no-verify")
    assert code == 2 and "no space left" in one_error_line(out)
    assert {p: p.read_text() for p in tmp_path.iterdir()} == old


def test_a_rename_that_fails_midway_puts_every_old_file_back(tmp_path, monkeypatch):
    first, second = tmp_path / "a.engine", tmp_path / "a.engine.json"
    first.write_text("old engine")
    second.write_text("old json")
    staging = Staging([first, second], force=True)
    staging.temp(first).write_text("new engine")
    staging.temp(second).write_text("new json")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == second and ".tmp-" in Path(src).name:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DMFExportError, match="No space left"):
        with staging:
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.engine", "a.engine.json"]
    assert (first.read_text(), second.read_text()) == ("old engine", "old json")


def test_outputs_that_were_not_all_written_do_not_land(tmp_path):
    engine, description = tmp_path / "b.engine", tmp_path / "b.engine.json"
    with pytest.raises(DMFExportError, match="was not written"):
        with Staging([engine, description]) as staging:
            staging.temp(engine).write_bytes(b"engine")
    assert list(tmp_path.iterdir()) == []


def test_an_engine_lands_with_its_description():
    outputs = formats.get("tensorrt").outputs("m.pth.tar", _Options())
    assert [p.name for p in formats.get("tensorrt").staged(outputs)] == ["m.engine", "m.engine.json"]


class _Options:
    output = None
    precision = "fp32"
    graph = "episode"
    onnx_flavor = "standard"


# -- episodes the original would turn into garbage, at every runner ------------------------

def _bad_episodes():
    support, labels, query = make_episode(EpisodeSize(3, 1, 2), 32, seed=1)
    nan = query.clone()
    nan[1, 0, 3, 3] = float("nan")
    no_class = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])  # nobody is class 2
    return {
        "labels not one-hot": ((support, labels * 2, query), "not one-hot"),
        "a class with no support image": ((support, no_class, query), "class 2 has no support image"),
        "S != label rows": ((support[:2], labels, query), "has 3 rows but support has 2 images"),
        "NaN pixels": ((support, labels, nan), "query has NaN or Inf"),
        "wrong image size": ((support[:, :, :16, :16], labels, query[:, :, :16, :16]), "expected 32×32"),
        "wrong channel count": ((support[:, :1], labels, query[:, :1]), "1 channels, expected 3"),
    }


@pytest.mark.parametrize("case", list(_bad_episodes()))
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "aoti"])
def test_every_runner_refuses_a_garbage_episode_in_one_line(exported, fmt, case):
    if formats.get(fmt).unavailable():
        pytest.skip(formats.get(fmt).unavailable())
    _, (path,) = exported(64, 1, fmt)
    episode, needle = _bad_episodes()[case]
    with pytest.raises(DMFExportError, match=needle) as caught:
        formats.open_artifact(path)(*episode)
    assert "\n" not in str(caught.value)


def test_fp16_inputs_to_an_fp32_artifact_give_the_fp32_scores(exported, eager):
    """A documented choice: inputs of any floating type are cast to the artifact's (fp16 to
    fp32 is exact), so the scores are those of the fp16 values in fp32."""
    checkpoint, (path,) = exported(64, 1, "onnx")
    support, labels, query = make_episode(EpisodeSize(3, 1, 2), 32, seed=2)
    half = [t.half() for t in (support, labels, query)]
    with torch.inference_mode():
        expected = eager(checkpoint)(*(t.float() for t in half))
    scores = formats.open_artifact(path)(*half)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_an_installed_wheel_carries_every_subpackage():
    """pyproject lists packages by hand: a new folder of modules must be in the list."""
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
