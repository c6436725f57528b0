"""The command line: what a user sees for good and bad input."""
from __future__ import annotations

import json
import os

import onnxruntime
import pytest
from cli_helpers import one_error_line
from cli_helpers import run_cli as run

from dmf_export.formats import base
from dmf_export.formats.torchscript import TorchScript
from dmf_export.synthetic import write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("cli") / "m.pth.tar", seed=3)


def test_help_lists_every_command():
    code, out = run("--help")
    assert code == 0
    for command in ("inspect", "export", "verify", "bench", "demo"):
        assert command in out


def test_export_help_teaches_the_main_switches():
    code, out = run("export", "--help")
    assert code == 0
    for switch in ("--format", "--solver", "--steps", "--precision", "--graph", "--onnx-flavor",
                   "--groups", "--kernel", "--way", "--shot", "--queries", "--force", "--no-verify"):
        assert switch in out


def test_export_writes_verifies_and_reports(checkpoint, tmp_path):
    target = tmp_path / "m.onnx"
    code, out = run("export", checkpoint, "-f", "onnx", "-o", target, "--image-size", 32)
    assert code == 0, out
    assert target.is_file() and f"wrote {target}" in out and "PASS" in out
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporaries left


def test_export_refuses_to_overwrite_without_force(checkpoint, tmp_path):
    target = tmp_path / "m.ts"
    target.write_text("precious")
    code, out = run("export", checkpoint, "-f", "torchscript", "-o", target, "--no-verify")
    assert code != 0 and "--force" in one_error_line(out)
    assert target.read_text() == "precious"
    code, out = run("export", checkpoint, "-f", "torchscript", "-o", target, "--no-verify", "--force")
    assert code == 0, out
    assert target.stat().st_size > 1_000_000


@pytest.mark.parametrize("args,needle", [
    (["export", "{missing}", "-f", "onnx"], "no such file"),
    (["export", "{ckpt}", "-f", "onnx", "-o", "/nonexistent-dir/x.onnx"], "does not exist"),
    (["export", "{text}", "-f", "onnx", "-o", "{tmp}/x.onnx"], "not a PyTorch checkpoint"),
    (["verify", "{missing}", "-c", "{ckpt}"], "no such file"),
    (["verify", "{text}", "-c", "{ckpt}"], "unknown artifact type"),
    (["inspect", "{text}"], "not a PyTorch checkpoint"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(checkpoint, tmp_path, args, needle):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    fill = {"missing": tmp_path / "missing.pth.tar", "ckpt": checkpoint, "text": text, "tmp": tmp_path}
    code, out = run(*[a.format(**fill) for a in args])
    assert code != 0
    line = one_error_line(out)
    assert needle and needle.lower() in line.lower()
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("args", [
    ["export", "{ckpt}", "-f", "keras"],
    ["export", "{ckpt}", "-f", "onnx", "--way", "0"],
    ["export", "{ckpt}", "-f", "onnx", "--steps", "0"],
    ["verify", "{ckpt}", "-c", "{ckpt}", "--sizes", "5w1s"],
    ["bench", "-c", "{ckpt}", "--sizes", "five"],
])
def test_bad_options_are_usage_errors(checkpoint, args):
    code, out = run(*[a.format(ckpt=checkpoint) for a in args])
    assert code == 2 and "Traceback" not in out and "Error" in out


@pytest.mark.parametrize("command", [["evaluate", "{ckpt}", "--data", "{tmp}"], ["bench", "-c", "{ckpt}"],
                                     ["predict", "{ckpt}", "{ckpt}", "--support", "{tmp}"], ["serve", "{tmp}"]])
def test_a_thread_count_past_256_is_refused_before_any_work(checkpoint, tmp_path, command):
    # each thread holds a stack and an arena: a count past the largest machines only grows memory
    args = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in command]
    code, out = run(*args, "--threads", str(10**9))
    assert code == 2 and "'--threads': 1000000000 is not in the range 1<=x<=256" in out, out


def test_unwritable_folder_is_refused(checkpoint, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; the permission check cannot be exercised")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, out = run("export", checkpoint, "-f", "onnx", "-o", locked / "x.onnx")
    assert code != 0 and "not writable" in one_error_line(out)


def test_a_failed_export_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch):
    def broken(self, job, graph, path, log):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(TorchScript, "write_graph", broken)
    code, out = run("export", checkpoint, "-f", "torchscript", "-o", tmp_path / "x.ts", "--no-verify")
    assert code != 0 and "disk full" in one_error_line(out)
    assert list(tmp_path.iterdir()) == []


def test_verify_json_reports_every_size(exported):
    checkpoint, (target,) = exported(64, 1, "torchscript")
    code, out = run("verify", target, "-c", checkpoint, "--sizes", "3w1s2q,2w2s1q", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["passed"] is True and [r["size"] for r in report["results"]] == ["3w1s2q", "2w2s1q"]
    assert all(r["max_abs"] < 1e-4 and r["agreement"] == 1.0 for r in report["results"])


def test_verify_fails_with_exit_1_when_the_artifact_disagrees(checkpoint, exported):
    exported_from, (target,) = exported(64, 1, "torchscript")
    assert exported_from != checkpoint  # another seed: other weights
    code, out = run("verify", target, "-c", checkpoint, "--sizes", "3w1s2q")
    assert code == 1 and "FAIL" in out


def test_tensorrt_without_tensorrt_is_one_clear_line(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code, out = run("export", checkpoint, "-f", "tensorrt", "-o", tmp_path / "m.engine")
    assert code != 0 and "TensorRT" in one_error_line(out)


def test_bench_json_times_eager_backbone_and_each_artifact_on_the_same_episode(exported):
    checkpoint, (episode,) = exported(64, 1, "torchscript")
    _, (encoder, _) = exported(64, 1, "onnx", graph="split")  # the same checkpoint
    code, out = run("bench", episode, encoder, "-c", checkpoint, "--sizes", "2w1s1q,3w1s2q",
                    "--repeats", 1, "--json")
    assert code == 0, out
    rows = json.loads(out)
    names = ["eager", "eager backbone", str(episode), f"{encoder} (encoder only)", str(encoder)]
    assert [r["name"] for r in rows] == names * 2
    assert [r["size"] for r in rows] == ["2w1s1q"] * 5 + ["3w1s2q"] * 5
    for group in (rows[:5], rows[5:]):
        eager_median, backbone_median = group[0]["median_s"], group[1]["median_s"]
        for row in group[1:]:
            assert row["speedup"] == pytest.approx(eager_median / row["median_s"])
            assert 0 < row["min_s"] <= row["median_s"]
        for row in group[2:]:
            assert row["vs_backbone"] == pytest.approx(row["median_s"] / backbone_median)
        # the split ONNX episode against the ONNX encoder alone; nothing to hold TorchScript to
        assert group[4]["vs_encoder"] == pytest.approx(group[4]["median_s"] / group[3]["median_s"])
        assert group[2]["vs_encoder"] is None and group[3]["vs_encoder"] is None
    code, out = run("bench", episode, encoder, "-c", checkpoint, "--sizes", "2w1s1q", "--repeats", 1)
    assert code == 0 and "÷ backbone" in out and "÷ encoder" in out


def test_fp16_onnx_export_skips_verify_when_onnxruntime_has_no_cuda_provider(checkpoint, tmp_path,
                                                                             monkeypatch):
    # a torch that sees a GPU beside an onnxruntime without the CUDA provider
    monkeypatch.setattr(base, "gpu_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    target = tmp_path / "m.fp16.onnx"
    code, out = run("export", checkpoint, "-f", "onnx", "--precision", "fp16", "-o", target,
                    "--image-size", 32)
    assert code == 0, out
    assert target.is_file() and "skipping verify" in out and "CUDA provider" in out


def test_bench_cuda_graph_without_a_gpu_device_is_one_clear_line(exported):
    checkpoint, (target,) = exported(64, 1, "torchscript")
    code, out = run("bench", target, "-c", checkpoint, "--cuda-graph", "--sizes", "2w1s1q")
    assert code != 0 and "--device cuda" in one_error_line(out)


def test_bench_refuses_an_fp16_torchscript_on_a_cpu_before_timing_anything(exported):
    checkpoint, (target,) = exported(64, 1, "torchscript", precision="fp16")
    code, out = run("bench", target, "-c", checkpoint, "--sizes", "2w1s1q")
    assert code != 0 and "on a GPU" in one_error_line(out)
    assert "eager" not in out  # refused up front, nothing was timed
