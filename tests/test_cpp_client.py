"""examples/cpp/dmf_client, compiled against the installed torch, runs TorchScript and
AOTInductor artifacts from C++ (libtorch only, no Python) and gets the eager scores."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from conftest import EXPORT_IMAGE

from dmf_export.contract import EpisodeSize, make_episode

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cpp"


def _compiler():
    return shutil.which((shlex.split(os.environ.get("CXX", "c++")) or [""])[0])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The example built as the README says: CMake with torch's own package config, or
    (without CMake) the README's one g++ line."""
    if _compiler() is None:
        pytest.skip("no C++ compiler (c++ or $CXX) to build examples/cpp")
    build = tmp_path_factory.mktemp("cpp")
    if shutil.which("cmake"):
        configure = ["cmake", "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
        steps = [configure, ["cmake", "--build", str(build)]]
    else:
        torch_dir = Path(torch.__file__).parent
        steps = [[_compiler(), "-std=c++17", "-O2", str(EXAMPLE / "dmf_client.cpp"), "-o", str(build / "dmf_client"),
                  f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
                  f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                  f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}",
                  "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build / "dmf_client"


@pytest.fixture(scope="module")
def op_library():
    code, out = run_cli("op-library")
    assert code == 0, out
    path = Path(out.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".so"
    return path


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
@pytest.mark.parametrize("size", [EpisodeSize(5, 1, 3), EpisodeSize(3, 2, 4), EpisodeSize(1, 1, 1)], ids=str)
def test_the_cpp_client_scores_like_the_eager_model(client, op_library, exported, eager, tmp_path, fmt, size):
    checkpoint, (artifact,) = exported(64, 1, fmt)
    support, labels, query = make_episode(size, EXPORT_IMAGE, seed=21)
    for name, tensor in (("support", support), ("support_labels", labels), ("query", query)):
        torch.save(tensor, tmp_path / f"{name}.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([str(client), str(op_library), str(artifact), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    scores = torch.load(tmp_path / "scores.pt", weights_only=True)
    with torch.inference_mode():
        expected = eager(checkpoint)(support, labels, query)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    rows = done.stdout.strip().splitlines()
    assert rows[0].startswith("query,predicted") and len(rows) == size.queries + 1
    assert [int(r.split(",")[1]) for r in rows[1:]] == expected.argmax(1).tolist()


def test_the_cpp_client_without_the_op_library_says_so(client, exported, tmp_path):
    _, (artifact,) = exported(64, 1, "torchscript")
    done = subprocess.run([str(client), str(tmp_path / "missing.so"), str(artifact), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "cannot load the op library" in done.stderr
