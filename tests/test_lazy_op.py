"""Commands that do not run dmf::deform_conv2d never build it; those that do build it on
first use; a library already built loads at ``import dmf_export``.

Each command runs in a fresh process whose build cache ($DMF_EXPORT_CACHE) is an empty
folder, so a build would show as a library in it and a "building" line on stderr.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dmf_export import ops

ROOT = Path(__file__).resolve().parent.parent


def _run_in_empty_cache(cache: Path, *args: str) -> subprocess.CompletedProcess:
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "DMF_EXPORT_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def _libraries(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.suffix in (".so", ".pyd", ".o") or p.name == "built.ok"]


@pytest.mark.parametrize("args", [("--help",), ("inspect", "CHECKPOINT", "--json"), ("serve", "--help"),
                                  ("build-plugin", "--tensorrt-root", "EMPTY")],
                         ids=["help", "inspect", "serve-help", "build-plugin"])
def test_commands_that_do_not_run_the_op_do_not_build_it(tmp_path, checkpoint_file, args):
    checkpoint = checkpoint_file(groups=160, kernel=3)
    (tmp_path / "empty").mkdir()
    args = [str(checkpoint) if a == "CHECKPOINT" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    result = _run_in_empty_cache(tmp_path / "cache", *args)
    if args[0] == "build-plugin":  # no TensorRT headers there: one clear line, and still no op build
        assert result.returncode != 0 and "no TensorRT headers" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr, result.stderr
    assert _libraries(tmp_path / "cache") == []
    if args[0] == "inspect":  # it did read the checkpoint
        report = json.loads(result.stdout)
        assert (report["groups"], report["kernel"]) == (160, 3)


def test_require_registers_the_op_once_per_process():
    first = ops.require()
    assert ops.require() is first  # a second registration of the fake kernel would raise
    assert first.library.is_file() and hasattr(torch.ops.dmf, "deform_conv2d")


def test_a_built_library_loads_at_import_and_load_torchscript_runs_the_file(tmp_path):
    ops.require()  # built in this cache (the suite's), so a fresh process finds it

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)))

        def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
            return torch.ops.dmf.deform_conv2d(x, offset, self.weight, [1, 1], [1, 1], [1, 1], 1, 1)

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(Module()), str(path))
    # zero offsets: a plain convolution, computed by torch as the reference
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import dmf_export
        assert hasattr(torch.ops.dmf, "deform_conv2d"), "not registered at import"
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        offset = torch.zeros(2, 18, 6, 6)
        for module in (torch.jit.load({str(path)!r}), dmf_export.load_torchscript({str(path)!r})):
            expected = torch.nn.functional.conv2d(x, module.weight, padding=1)
            torch.testing.assert_close(module(x, offset), expected, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "building" not in result.stderr


def test_the_python_op_builds_the_library_on_first_call_but_scripting_skips_that(monkeypatch):
    calls = []
    real = ops.require
    monkeypatch.setattr(ops, "require", lambda: calls.append(1) or real())
    x = torch.arange(16.0).view(1, 1, 4, 4)
    weight = torch.ones(1, 1, 1, 1)
    # zero offsets and a 1×1 all-ones kernel: the op is the identity
    out = ops.deform_conv2d(x, torch.zeros(1, 2, 4, 4), weight)
    assert calls == [1] and torch.equal(out, x)
    scripted = torch.jit.script(ops.deform_conv2d)
    assert torch.equal(scripted(x, torch.zeros(1, 2, 4, 4), weight), x) and calls == [1]
