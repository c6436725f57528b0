"""``python -m dmf_export`` runs the ``dmf-export`` command (from a checkout, too)."""
from dmf_export.cli import main

main(prog_name="dmf-export")
