"""dmf-export: turn DMF few-shot checkpoints into artifacts that serve.

``import dmf_export`` registers the custom op ``torch.ops.dmf.deform_conv2d`` when its
library is already built (it never compiles: commands that do not run the op stay
fast), so a saved TorchScript module loads with ``torch.jit.load`` after it once the op
was built on this machine. ``load_torchscript(path)`` also builds it first when needed,
as do ``load_checkpoint``, exports and the artifact runners (``ops.require()``).
"""
from pathlib import Path as _Path

# In a checkout (``python cli.py``, an editable install), ``models/``, ``csrc/`` and
# ``plugins/`` sit beside this package; an installed wheel carries them inside it.
_here = _Path(__file__).resolve().parent
if not (_here / "models").is_dir() and (_here.parent / "models" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821  (the package's own __path__)

from dmf_export._version import __version__  # noqa: E402
from dmf_export.errors import DMFExportError  # noqa: E402
from dmf_export import ops  # noqa: E402,F401  (registers dmf::deform_conv2d if already built)
from dmf_export.checkpoint import load_checkpoint  # noqa: E402
from dmf_export.formats import open_artifact, read_info  # noqa: E402
from dmf_export.formats.torchscript import load_torchscript  # noqa: E402

__all__ = ["DMFExportError", "load_checkpoint", "load_torchscript", "open_artifact", "read_info", "ops",
           "__version__"]
