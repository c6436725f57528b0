"""bf16 artifacts (``--precision bf16``, AOTInductor and TorchScript): the backbone in
bfloat16 between fp32 inputs and fp32 scores, within bf16's tolerance of the eager fp32
original, and refused in one line on a CPU without AMX or AVX-512-BF16 (flags simulated
with a fake /proc/cpuinfo)."""
from __future__ import annotations

import pytest
import torch
from cli_helpers import one_error_line
from cli_helpers import run_cli as run

from dmf_export import bench, cli, cpu, formats
from dmf_export.contract import TOLERANCES, EpisodeSize, check_images, make_episode
from dmf_export.errors import DMFExportError
from dmf_export.export import ExportOptions
from dmf_export.synthetic import write_random_checkpoint
from dmf_export.verify import compare

NO_BF16 = ("bf16 artifacts need a CPU with AMX (amx_bf16) or AVX-512-BF16 (avx512_bf16); "
           "this one has neither: use fp32, or int8 ONNX")
# /proc/cpuinfo as Linux writes it (x86: "flags", Arm: "Features"), cut to what matters
CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 {}\nbogomips\t: 4000\n\n"


def fake_cpuinfo(monkeypatch, tmp_path, flags: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(flags) * 2)
    monkeypatch.setattr(cpu, "CPUINFO", path)


# -- the CPU's flags --------------------------------------------------------------------

@pytest.mark.parametrize("flags,reason", [
    ("avx512f amx_tile amx_bf16 amx_int8", None),
    ("avx512f avx512_vnni avx512_bf16", None),
    ("avx512f avx512_vnni avx512bw", NO_BF16),
    ("", NO_BF16),
])
def test_bf16_needs_amx_or_avx512_bf16_in_the_cpu_flags(monkeypatch, tmp_path, flags, reason):
    fake_cpuinfo(monkeypatch, tmp_path, flags)
    assert cpu.bf16_unavailable() == reason


def test_arm_features_are_read_and_an_unreadable_cpuinfo_is_unknown(monkeypatch, tmp_path):
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert cpu.cpu_flags(arm) == {"fp", "asimd", "bf16", "sve"}
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    assert cpu.cpu_flags() is None
    reason = cpu.bf16_unavailable()
    assert "does not say what its CPU has" in reason and "\n" not in reason


# -- refusals ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("bf16") / "m.pth.tar", seed=5)


@pytest.mark.parametrize("fmt", ["aoti", "torchscript"])
def test_a_bf16_export_on_a_cpu_without_the_flags_is_one_line_and_writes_nothing(
        monkeypatch, tmp_path, checkpoint, fmt):
    fake_cpuinfo(monkeypatch, tmp_path, "avx512f avx512_vnni")
    out = tmp_path / "out"
    out.mkdir()
    code, output = run("export", checkpoint, "-f", fmt, "--precision", "bf16", "-o", out / "m")
    assert code == 2 and one_error_line(output) == f"Error: {NO_BF16}"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["-f", "onnx"], "not bf16"),
    (["-f", "tensorrt"], "not bf16"),
    (["-f", "aoti", "--device", "cuda"], "bf16 artifacts are for CPUs (AMX, AVX-512-BF16); on a GPU use fp16"),
])
def test_bf16_where_it_is_not_offered_is_one_line(tmp_path, checkpoint, args, needle):
    code, output = run("export", checkpoint, *args, "--precision", "bf16", "-o", tmp_path / "m")
    assert code == 2 and needle in one_error_line(output)
    assert list(tmp_path.iterdir()) == []


def test_a_bf16_artifact_on_a_cpu_without_the_flags_is_refused_and_verify_says_why(
        monkeypatch, tmp_path, exported):
    _, (path,) = exported(64, 1, "torchscript", precision="bf16")
    fake_cpuinfo(monkeypatch, tmp_path, "avx2")
    with pytest.raises(DMFExportError) as caught:
        formats.open_artifact(path)
    assert str(caught.value) == f"{path}: {NO_BF16}"
    opts = ExportOptions(format="torchscript", precision="bf16")
    assert formats.get("torchscript").verification(opts) == (NO_BF16, {})


def test_bf16_names_its_output_and_records_its_precision(exported, checkpoint):
    opts = ExportOptions(format="torchscript", precision="bf16")
    assert formats.get("torchscript").outputs(str(checkpoint), opts)["episode"].name == "m.bf16.ts"
    _, (path,) = exported(64, 1, "torchscript", precision="bf16")
    assert formats.read_info(path).precision == "bf16"


def test_images_beyond_bfloat16_are_refused_for_a_bf16_artifact():
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, 0, 0] = 3.395e38  # finite in fp32, Inf once cast to bf16 (max 3.3895e38)
    check_images(images, image_size=8, precision="fp32")
    with pytest.raises(DMFExportError, match="beyond bf16's range"):
        check_images(images, image_size=8, precision="bf16")


# -- against the eager fp32 original -------------------------------------------------------

def _aoti_bf16_unavailable() -> str | None:
    return cpu.bf16_unavailable() or formats.get("aoti").unavailable(purpose="export")


@pytest.mark.parametrize("fmt,graph", [
    ("torchscript", "episode"),
    ("torchscript", "split"),
    pytest.param("aoti", "episode", marks=pytest.mark.skipif(
        _aoti_bf16_unavailable() is not None, reason=str(_aoti_bf16_unavailable()))),
])
def test_bf16_scores_are_the_eager_fp32_ones_within_bf16s_tolerance(exported, eager, fmt, graph):
    if fmt == "torchscript" and cpu.bf16_unavailable():
        pytest.skip(cpu.bf16_unavailable())
    checkpoint, paths = exported(64, 1, fmt, precision="bf16", graph=graph)
    runner = formats.open_artifact(paths[0])
    model = eager(checkpoint)
    tol = TOLERANCES["bf16"]
    drifts = []
    for seed, size in enumerate([EpisodeSize(5, 1, 10), EpisodeSize(5, 5, 6), EpisodeSize(3, 2, 4)]):
        support, labels, query = make_episode(size, 32, seed=seed)
        with torch.inference_mode():
            expected = model(support, labels, query)
        scores = runner(support, labels, query)
        assert scores.dtype == torch.float32  # fp32 in, fp32 out: the cast is inside the graph
        result = compare(scores, expected, tol, str(size))
        assert result.passed, result
        drifts.append(result.max_abs)
        if graph == "split":  # the encoder gives fp32 features, rounded through bf16
            features = runner.encode(query)
            assert features.dtype == torch.float32
            assert torch.equal(features, features.bfloat16().float())
    # the backbone did run in bf16: an fp32 graph would be within fp32's 1e-4
    assert max(drifts) > 10 * TOLERANCES["fp32"].atol


# -- bench --------------------------------------------------------------------------------

def test_bench_divides_a_bf16_row_by_its_fp32_twin_and_prints_it(capsys):
    """Rows as bench measures them (medians given): the bf16 package ÷ the fp32 package of
    the same format, not ÷ another format's fp32 row."""
    candidates = [bench._Candidate("artifact", f"m{suffix}", "m.pth.tar", f"m{suffix}", family)
                  for suffix, family in ((".ts", ("torchscript", "fp32")), (".pt2", ("aoti", "fp32")),
                                         (".bf16.pt2", ("aoti", "bf16")))]
    rows = [bench.Timing("5w1s75q", c.name, m, m, kind=c.kind, format=c.family[0], precision=c.family[1])
            for c, m in zip(candidates, (1.5, 2.0, 0.8))]
    bench._ratios(list(zip(candidates, rows)))
    assert [r.vs_fp32 for r in rows] == [None, None, pytest.approx(0.4)]
    cli._print_timings(rows)
    table = capsys.readouterr().out.splitlines()
    assert "÷ fp32" in table[0]
    assert table[3].split()[-2] == "0.400"
