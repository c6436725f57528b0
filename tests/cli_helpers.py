"""Running the command line in-process, and what a user-facing error must look like."""
from __future__ import annotations

from click.testing import CliRunner

from dmf_export.cli import main


def run_cli(*args, env=None):
    """(exit code, stdout + stderr) of ``dmf-export ARGS``."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    """Progress lines may come first; the error is one line, the last, with no traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert "Traceback" not in output
    return errors[0]
