"""The TensorRT plugin, the engine builder and the engine runner.

Three tiers, each skipped with its reason where the machine lacks what it needs:
- the plugin library compiles against TensorRT's headers ($TENSORRT_ROOT), exports only
  its entry points, and behaves as TensorRT expects when driven through them by
  tests/trt_plugin_probe.cpp (no TensorRT library, no GPU needed);
- without TensorRT or headers, the commands fail with one clear line;
- with TensorRT's Python package and a CUDA GPU: fp32/fp16 engines of a small random
  checkpoint against the eager model, the profile's limits, and the plugin's fields
  through engine serialisation against the independent DCN reference.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_error_line, run_cli
from dmf_export import _build, load_checkpoint, ops, toolchain
from dmf_export.contract import TOLERANCES, EpisodeSize, make_episode
from dmf_export.errors import DMFExportError
from dmf_export.export import ExportOptions, export_checkpoint
from dmf_export.formats import open_artifact, read_info
from dmf_export.onnx_ops import _plugin_schema
from dmf_export.ops import deform_conv2d
from dmf_export.synthetic import write_random_checkpoint
from dmf_export.tensorrt import plugin as trt_plugin
from dmf_export.tensorrt.plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dmf_export.tensorrt.runner import EngineRunner
from dmf_export.verify import compare, verify_artifact
from reference_dcn import deform_conv2d_reference

ROOT = Path(__file__).resolve().parent.parent
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _cuda_toolkit_or_skip():
    try:
        return toolchain.require_cuda()
    except DMFExportError as err:
        pytest.skip(f"no CUDA toolkit to compile the plugin: {err}")


# --------------------------------------------------------------------------- the library

@pytest.fixture(scope="module")
def tensorrt_include():
    root = os.environ.get("TENSORRT_ROOT")
    if not root:
        pytest.skip("TENSORRT_ROOT is not set: point it at TensorRT's headers to compile the plugin")
    return trt_plugin.find_tensorrt(root).include


@pytest.fixture(scope="module")
def plugin_library(tensorrt_include, tmp_path_factory):
    """Compiled in this run (not taken from the cache) through the command line."""
    _cuda_toolkit_or_skip()
    out = tmp_path_factory.mktemp("plugin")
    code, output = run_cli("build-plugin", "--tensorrt-root", tensorrt_include, "-o", out)
    assert code == 0, output
    library = Path(output.strip().splitlines()[-1])
    assert library.parent == out and library.is_file()
    return library


def test_plugin_library_compiles_and_its_path_is_the_last_line(plugin_library):
    assert plugin_library.name == "libdmf_trt_plugin.so" and plugin_library.stat().st_size > 0
    assert (plugin_library.parent / "build.ninja").is_file()


def test_plugin_library_exports_only_the_entry_points_tensorrt_looks_for(plugin_library):
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    listing = subprocess.run(["nm", "-D", "--defined-only", str(plugin_library)], capture_output=True,
                             text=True, check=True).stdout
    exported = {line.split()[-1] for line in listing.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == {"getCreators", "setLoggerFinder"}, listing


def test_plugin_library_links_neither_tensorrt_nor_a_shared_cuda_runtime(plugin_library):
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run(["readelf", "-d", str(plugin_library)], capture_output=True, text=True,
                             check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic)
    assert needed and not [n for n in needed if "nvinfer" in n or "cudart" in n], needed


@pytest.fixture(scope="module")
def probe(plugin_library, tensorrt_include, tmp_path_factory):
    """Runs tests/trt_plugin_probe.cpp on the library: {key: rest of the line}."""
    cuda = _cuda_toolkit_or_skip()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler})")
    binary = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run([compiler, "-std=c++17", "-isystem", str(tensorrt_include), "-isystem",
                    str(cuda.home / "include"), str(ROOT / "tests" / "trt_plugin_probe.cpp"), "-o", str(binary),
                    "-ldl"], check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary), str(plugin_library)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("done"), result.stdout + result.stderr
    return dict(line.split(" ", 1) if " " in line else (line, "") for line in result.stdout.splitlines())


def _fields(text: str) -> dict[str, list[int]]:
    """'stride:5:2=2,1 groups:5:1=2' → {'stride': [2, 1], 'groups': [2]} (type 5 = INT32)."""
    fields = {}
    for item in text.split():
        name, kind, rest = item.split(":", 2)
        assert kind == "5", f"{name} is not INT32"
        fields[name] = [int(v) for v in rest.split("=", 1)[1].split(",")] if "=" in rest else int(rest)
    return fields


def test_creator_is_found_under_the_onnx_nodes_name_version_and_namespace(probe):
    assert probe["entry_points"] == "1 1" and probe["creators"] == "1"
    assert probe["creator_kind"] == "PLUGIN CREATOR_V3ONE 1.0"
    assert probe["creator_id"] == f"{PLUGIN_NAME}|{PLUGIN_VERSION}|{PLUGIN_NAMESPACE}"
    assert probe["plugin_id"] == probe["creator_id"]
    assert probe["capability_kinds"] == "PLUGIN_V3ONE_CORE PLUGIN_V3ONE_BUILD PLUGIN_V3ONE_RUNTIME"
    assert probe["nb_outputs"] == "1"


def test_creator_asks_for_the_onnx_nodes_attributes_as_int32(probe):
    expected = {name for name in _plugin_schema().attributes if not name.startswith("plugin_")}
    fields = _fields(probe["field_names"])
    assert set(fields) == expected == {"stride", "padding", "dilation", "groups", "offset_groups"}
    assert fields == {"stride": 2, "padding": 2, "dilation": 2, "groups": 1, "offset_groups": 1}


def test_plugin_fields_round_trip_through_serialisation_clone_and_runtime_creation(probe):
    given = {"stride": [2, 1], "padding": [1, 0], "dilation": [1, 2], "groups": [2], "offset_groups": [2]}
    assert probe["create_build"] == "1 -"  # plugin_version / plugin_namespace fields are accepted
    assert probe["create_runtime"] == "1" and probe["attached"] == "1"
    for stage in ("serialized", "restored", "cloned"):
        assert _fields(probe[stage]) == given, stage


def test_fields_missing_take_the_ops_defaults_and_one_value_serves_both_axes(probe):
    defaults = {name: p.default for name, p in inspect.signature(deform_conv2d).parameters.items()
                if p.default is not inspect.Parameter.empty}
    expected = {name: [value, value] if name in ("stride", "padding", "dilation") else [value]
                for name, value in defaults.items()}
    assert _fields(probe["defaults"]) == expected
    variant = _fields(probe["variant"])  # padding [3] (INT32), dilation [2, 3] (INT64)
    assert variant["padding"] == [3, 3] and variant["dilation"] == [2, 3]


@pytest.mark.parametrize("case, field", [
    ("refuse_zero_stride", "stride"), ("refuse_negative_padding", "padding"), ("refuse_zero_groups", "groups"),
    ("refuse_float_stride", "stride"), ("refuse_three_dilation", "dilation"), ("refuse_unknown", "strides")])
def test_bad_fields_are_refused_with_a_message_through_tensorrts_logger(probe, case, field):
    refused, message = probe[case].split(" ", 1)
    assert refused == "1" and message.startswith("DMFDeformConv2d plugin:") and field in message


def test_formats_are_linear_float32_or_float16_all_alike(probe):
    assert probe["formats"] == "fp32=1 fp16=1 mixed=0 int32=0 chw32=0 out_mixed=0"
    assert probe["output_type_fp16"] == "0 1"  # DataType::kHALF = 1
    assert probe["output_type_mixed"].startswith("1 ")


def test_no_workspace_is_asked_for(probe):
    assert probe["workspace"] == "0" and probe["configure"] == "0"


def test_runtime_shapes_follow_the_convolution_formula(probe):
    # input [2,4,7,9], weight [6,2,3,3], stride (2,1), padding (1,0), dilation (1,2),
    # 2 offset groups: out_h = (7 + 2 - 3) // 2 + 1 = 4, out_w = (9 + 0 - 5) // 1 + 1 = 5,
    # offset channels 2·2·3·3 = 36, output [2, 6, 4, 5]
    assert probe["shape_good"] == "0 -"
    assert probe["shape_bad_offset"] == "1 DMFDeformConv2d plugin: offset is [2, 18, 4, 5], expected [2, 36, 4, 5]"
    assert probe["shape_bad_output"] == "1 DMFDeformConv2d plugin: output must be [2, 6, 4, 5]"
    assert probe["enqueue_bad_shape"].startswith("1 DMFDeformConv2d plugin: offset is")


# --------------------------------------------------------------------------- clear errors

def test_build_plugin_with_an_empty_tensorrt_root_is_one_clear_line(tmp_path):
    code, output = run_cli("build-plugin", env={"TENSORRT_ROOT": str(tmp_path)})
    assert code != 0
    line = one_error_line(output)
    assert "TENSORRT_ROOT" in line and str(tmp_path) in line and "NvInferRuntime.h" in line


def test_build_plugin_without_any_headers_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_plugin, "SYSTEM_TENSORRT", (str(tmp_path),))  # "no system install"
    code, output = run_cli("build-plugin", env={"TENSORRT_ROOT": None})
    assert code != 0
    line = one_error_line(output)
    assert "TensorRT headers not found" in line and "--tensorrt-root" in line and "TENSORRT_ROOT" in line


def test_build_plugin_without_nvcc_is_one_clear_line(tmp_path):
    headers = tmp_path / "trt" / "include"  # enough headers for the search to pass
    headers.mkdir(parents=True)
    (headers / "NvInferRuntime.h").write_text("")
    (headers / "NvInferVersion.h").write_text("#define NV_TENSORRT_MAJOR 10\n#define NV_TENSORRT_MINOR 16\n"
                                              "#define NV_TENSORRT_PATCH 1\n")
    empty = tmp_path / "no-cuda"
    empty.mkdir()
    code, output = run_cli("build-plugin", "--tensorrt-root", headers.parent, env={"CUDA_HOME": str(empty)})
    assert code != 0
    line = one_error_line(output)
    assert "nvcc" in line and "CUDA_HOME" in line


def test_build_plugin_refuses_tensorrt_8_headers(tmp_path):
    (tmp_path / "NvInferRuntime.h").write_text("")
    (tmp_path / "NvInferVersion.h").write_text("#define NV_TENSORRT_MAJOR 8\n#define NV_TENSORRT_MINOR 6\n"
                                               "#define NV_TENSORRT_PATCH 1\n")
    code, output = run_cli("build-plugin", "--tensorrt-root", tmp_path)
    assert code != 0 and "8.6.1" in one_error_line(output)


# --------------------------------------------------------------------------- the build, without TensorRT

def _fake_headers(folder: Path) -> trt_plugin.TensorRTHeaders:
    folder.mkdir(parents=True)
    (folder / "NvInferRuntime.h").write_text("")
    (folder / "NvInferVersion.h").write_text("#define TRT_MAJOR_ENTERPRISE 10\n#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE\n"
                                             "#define NV_TENSORRT_MINOR 16\n#define NV_TENSORRT_PATCH 1\n")
    return trt_plugin.find_tensorrt(folder)


# sm_75, sm_80, sm_90 code and compute_90 PTX, unless DMF_EXPORT_CUDA_ARCHS says otherwise
DEFAULT_GENCODE = ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_80,code=sm_80",
                   "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]


def test_build_files_compile_every_plugin_source_and_the_shared_kernel(tmp_path, monkeypatch):
    monkeypatch.delenv(toolchain.CUDA_ARCHS_ENV, raising=False)
    headers = _fake_headers(tmp_path / "trt" / "include")
    assert headers.version == "10.16.1"  # read through NvInferVersion.h's aliases
    cuda = toolchain.CudaToolkit(tmp_path / "cuda", "13.0")
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    ninja_file = trt_plugin.write_build_files(build_dir, headers, cuda, "c++", toolchain.cuda_arch_flags())
    text = ninja_file.read_text()
    compiled = {Path(line.split()[-1]).relative_to(ROOT).as_posix()
                for line in text.splitlines() if line.startswith("build ") and (": cxx " in line or ": cuda " in line)}
    assert compiled == {"plugins/pluginEntry.cpp", "plugins/DMFDeformConv2dPlugin/DMFDeformConv2dPlugin.cpp",
                        "csrc/kernels/deform_conv_cuda.cu"}
    nvcc_flags = next(line for line in text.splitlines() if line.startswith("nvccflags = ")).split()
    assert [f for f in nvcc_flags if f.startswith("-gencode")] == DEFAULT_GENCODE
    assert f"build {trt_plugin.LIBRARY_NAME}: link" in text
    exported = re.findall(r"^\s+(\w+);", (build_dir / "exports.map").read_text(), flags=re.MULTILINE)
    assert exported == ["getCreators", "setLoggerFinder"]


def test_the_op_and_the_plugin_compile_for_the_same_gpus(tmp_path, monkeypatch):
    cuda = toolchain.CudaToolkit(tmp_path / "cuda", "13.0")
    monkeypatch.setattr(toolchain, "find_cuda", lambda: cuda)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # as a CUDA build of torch would
    monkeypatch.delenv("DMF_EXPORT_NO_CUDA", raising=False)
    monkeypatch.delenv(toolchain.CUDA_ARCHS_ENV, raising=False)
    assert _build._plan().cuda_flags == DEFAULT_GENCODE
    monkeypatch.setenv(toolchain.CUDA_ARCHS_ENV, "8.6;sm_90")
    assert _build._plan().cuda_flags == toolchain.cuda_arch_flags() == [
        "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv(toolchain.CUDA_ARCHS_ENV, "ampere")
    with pytest.raises(DMFExportError, match="DMF_EXPORT_CUDA_ARCHS='ampere'"):
        toolchain.cuda_arch_flags()


def test_a_cuda_home_that_is_not_a_toolkit_is_named_not_passed_over(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(DMFExportError, match=f"CUDA_HOME={tmp_path}"):
        toolchain.require_cuda()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    (tmp_path / "include" / "cuda.h").write_text("#define CUDA_VERSION 12080\n")
    assert toolchain.require_cuda() == toolchain.CudaToolkit(tmp_path.resolve(), "12.8")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("trt") / "m.pth.tar", seed=5)


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_export_tensorrt_without_tensorrt_is_one_clear_line(checkpoint, tmp_path):
    code, output = run_cli("export", checkpoint, "-f", "tensorrt", "-o", tmp_path / "m.engine")
    assert code != 0
    assert "TensorRT is not installed" in one_error_line(output)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_verify_of_an_engine_without_tensorrt_is_one_clear_line(checkpoint, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not read")
    (tmp_path / "m.engine.json").write_text('{"artifact": {"format": "tensorrt", "image_size": 32}, '
                                            '"plugin_library": "/nowhere/libdmf_trt_plugin.so"}')
    code, output = run_cli("verify", engine, "--checkpoint", checkpoint)
    assert code != 0
    assert "TensorRT is not installed" in one_error_line(output)


def test_engine_description_is_read_without_tensorrt(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not read")
    (tmp_path / "m.engine.json").write_text('{"artifact": {"format": "tensorrt", "precision": "fp16", '
                                            '"image_size": 32, "groups": 160, "kernel": 3}}')
    info = read_info(engine)
    assert (info.format, info.precision, info.image_size, info.groups, info.kernel) == ("tensorrt", "fp16", 32, 160, 3)


def test_an_engine_without_its_description_is_one_clear_line(tmp_path, checkpoint):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"an engine")
    code, output = run_cli("verify", engine, "--checkpoint", checkpoint)
    assert code != 0 and "m.engine.json" in one_error_line(output)


def test_profile_bounds_below_the_example_size_are_one_clear_line(checkpoint, tmp_path):
    code, output = run_cli("export", checkpoint, "-f", "tensorrt", "--queries", 20, "--max-queries", 10,
                           "-o", tmp_path / "m.engine")
    assert code != 0 and "--max-queries" in one_error_line(output)


def test_export_help_teaches_the_tensorrt_switches():
    code, output = run_cli("export", "--help")
    assert code == 0
    for switch in ("--max-way", "--max-shot", "--max-queries", "--plugin", "--workspace", "--timing-cache",
                   "--tensorrt-root"):
        assert switch in output
    code, output = run_cli("--help")
    assert code == 0 and "build-plugin" in output


# --------------------------------------------------------------------------- with TensorRT and a GPU

IMAGE = 32
MAX = {"max_way": 10, "max_shot": 5, "max_queries": 16}


@pytest.fixture(scope="module")
def gpu_plugin():
    if not HAVE_TENSORRT:
        pytest.skip("TensorRT's Python package is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    library = os.environ.get("DMF_EXPORT_TRT_PLUGIN")
    if library:
        return Path(library)
    try:
        return trt_plugin.build_plugin()
    except DMFExportError as err:
        pytest.skip(f"cannot build the plugin here ({err}); set DMF_EXPORT_TRT_PLUGIN or TENSORRT_ROOT")


@pytest.fixture(scope="module")
def engines(gpu_plugin, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    built = {}
    for precision in ("fp32", "fp16"):
        opts = ExportOptions(format="tensorrt", precision=precision, image_size=IMAGE, way=5, shot=1, queries=4,
                             plugin=str(gpu_plugin), output=str(out / f"m.{precision}.engine"),
                             timing_cache=str(out / "timing.cache"), **MAX)
        (written,) = export_checkpoint(str(checkpoint), opts)
        built[precision] = written.path
    return built


@pytest.fixture(scope="module")
def eager(checkpoint):
    return load_checkpoint(checkpoint)


SIZES = [(5, 1, 4), (5, 5, 3), (3, 2, 2), (10, 1, 2), (1, 1, 1), (10, 5, 16)]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_the_eager_model_inside_the_profile(engines, eager, precision):
    runner = EngineRunner(engines[precision])
    assert runner.backend == "tensorrt" and runner.info.format == "tensorrt" and runner.info.precision == precision
    for seed, (way, shot, queries) in enumerate(SIZES):
        support, labels, query = make_episode(EpisodeSize(way, shot, queries), IMAGE, seed=seed)
        with torch.inference_mode():
            expected = eager(support, labels, query)
        # NumPy in for one size, CPU tensors for the rest
        args = (support.numpy(), labels.numpy(), query.numpy()) if seed == 0 else (support, labels, query)
        scores = runner(*args)
        assert scores.is_cuda and scores.dtype == (torch.float16 if precision == "fp16" else torch.float32)
        assert scores.shape == (queries, way)
        # verify's own rule: within atol + rtol·|score|, and the arg-max agreeing on every
        # query (fp16: 99 %) except where the eager model itself ties within that tolerance
        result = compare(scores, expected, TOLERANCES[precision], f"{way}w{shot}s{queries}q")
        assert result.passed, result


def test_engine_description_says_what_it_is(engines):
    import tensorrt  # optional: only this tier has it

    meta = json.loads(Path(f"{engines['fp16']}.json").read_text())
    assert meta["tensorrt_version"] == tensorrt.__version__ and meta["precision"] == "fp16"
    assert meta["profile"]["max"] == {"way": 10, "shot": 5, "queries": 16}
    assert meta["profile"]["opt"] == {"way": 5, "shot": 1, "queries": 4}
    assert Path(meta["plugin_library"]).is_file()
    assert meta["artifact"]["format"] == "tensorrt" and meta["artifact"]["image_size"] == IMAGE


def test_shape_outside_the_profile_names_the_axis_and_the_range(engines):
    runner = EngineRunner(engines["fp32"])
    with pytest.raises(DMFExportError, match=r"query has 17 queries \(Q\) on axis 0; .*allows 1\.\.16"):
        runner(*make_episode(EpisodeSize(5, 1, 17), IMAGE))
    with pytest.raises(DMFExportError, match=r"support_labels has 11 classes \(way\) on axis 1; .*allows 1\.\.10"):
        runner(*make_episode(EpisodeSize(11, 1, 2), IMAGE))
    # the image size is the episode check's, before the engine (Runner.__call__)
    with pytest.raises(DMFExportError, match=r"support is 48×48, expected 32×32"):
        runner(*make_episode(EpisodeSize(2, 1, 2), 48))


def test_verify_accepts_the_engine_through_open_artifact(engines, checkpoint):
    assert type(open_artifact(engines["fp32"])).__name__ == "EngineRunner"
    report = verify_artifact(str(engines["fp32"]), str(checkpoint))
    assert report.backend == "tensorrt" and report.passed, report.to_dict()


def test_plugin_fields_survive_engine_serialisation(gpu_plugin):
    """A lone plugin layer with non-default fields: build, serialise, deserialise in a new
    runtime, run, and compare with the independent reference and the PyTorch op."""
    import tensorrt as trt  # optional: only this tier has it

    ops.require()  # the PyTorch op is the second reference
    trt_plugin.load_plugin_library(trt, gpu_plugin)
    stride, padding, dilation, groups, offset_groups = (2, 1), (1, 2), (2, 1), 2, 2
    # H = 9: (9 + 2 - 5) // 2 + 1 = 4; W = 11: (11 + 4 - 3) // 1 + 1 = 13; offsets 2·2·9 = 36
    out_h, out_w, offset_channels = 4, 13, 36
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    strongly_typed = int(trt.__version__.split(".")[0]) < 11
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    x = network.add_input("input", trt.float32, (-1, 4, 9, 11))
    off = network.add_input("offset", trt.float32, (-1, offset_channels, out_h, out_w))
    w = network.add_input("weight", trt.float32, (6, 2, 3, 3))
    creator = trt.get_plugin_registry().get_creator("DMFDeformConv2d", "1", "")  # the node's, as the C++ says
    field = lambda name, values: trt.PluginField(name, np.array(values, dtype=np.int32),  # noqa: E731
                                                 trt.PluginFieldType.INT32)
    fields = trt.PluginFieldCollection([field("stride", stride), field("padding", padding),
                                        field("dilation", dilation), field("groups", [groups]),
                                        field("offset_groups", [offset_groups])])
    plugin = creator.create_plugin("dcn", fields, trt.TensorRTPhase.BUILD)
    layer = network.add_plugin_v3([x, off, w], [], plugin)
    layer.get_output(0).name = "output"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 4, 9, 11), (2, 4, 9, 11), (3, 4, 9, 11))
    profile.set_shape("offset", (1, offset_channels, out_h, out_w), (2, offset_channels, out_h, out_w),
                      (3, offset_channels, out_h, out_w))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None
    del plugin, layer, network, builder

    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    assert engine is not None
    context = engine.create_execution_context()
    gen = torch.Generator().manual_seed(0)
    tensors = {"input": torch.randn(3, 4, 9, 11, generator=gen),
               "offset": torch.randn(3, offset_channels, out_h, out_w, generator=gen) * 2,
               "weight": torch.randn(6, 2, 3, 3, generator=gen)}
    device = {name: t.cuda() for name, t in tensors.items()}
    output = torch.empty(3, 6, out_h, out_w, device="cuda")
    assert tuple(engine.get_tensor_shape("output"))[1:] == (6, out_h, out_w)
    for name, t in device.items():
        assert context.set_input_shape(name, tuple(t.shape))
        assert context.set_tensor_address(name, t.data_ptr())
    context.set_tensor_address("output", output.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()

    reference = deform_conv2d_reference(*(t.double() for t in tensors.values()), stride=stride, padding=padding,
                                        dilation=dilation, groups=groups, offset_groups=offset_groups)
    torch.testing.assert_close(output.double().cpu(), reference, rtol=1e-4, atol=1e-4)
    op = deform_conv2d(*device.values(), stride=stride, padding=padding, dilation=dilation, groups=groups,
                       offset_groups=offset_groups)
    torch.testing.assert_close(output, op, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("driver,runtime,refused", [("12.4", "13.0", True), ("13.0", "13.0", False),
                                                    ("13.1", "12.8", False), (None, "13.0", False)])
def test_a_driver_older_than_the_plugins_cuda_runtime_is_one_clear_line(monkeypatch, driver, runtime, refused):
    monkeypatch.setattr(trt_plugin, "driver_cuda_version", lambda: driver)
    warnings = []
    if refused:
        with pytest.raises(DMFExportError, match=f"links the CUDA {runtime} runtime.*supports CUDA {driver}"):
            trt_plugin.check_driver(runtime, "the plugin", strict=True)
    else:
        trt_plugin.check_driver(runtime, "the plugin", strict=True)
    trt_plugin.check_driver(runtime, "the plugin", log=warnings.append)  # building: a warning at most
    assert len(warnings) == int(refused)
