"""A Triton server the user runs (or several, as a fleet): ``open_server(urls)`` is a
``formats.base.Runner`` over the models our repository names (``dmf``; with a split
repository ``dmf_encoder`` and ``dmf_head`` too), checked against the server's model
metadata, safe to call from several threads at once."""
from __future__ import annotations

from typing import Sequence

from dmf_export.errors import DMFExportError
from dmf_export.formats.base import Runner

PROTOCOLS = ("http", "grpc")
DEFAULT_TIMEOUT = 60.0  # seconds a request may take before the run ends in one line
MAX_CLIENTS = 64        # concurrent requests: each holds an episode in flight


def open_server(urls: Sequence[str], *, protocol: str = "http",
                timeout: float = DEFAULT_TIMEOUT) -> Runner:
    """A runner over the dmf-export models served at ``urls`` ('host:port', one or
    several: requests are spread over them). Its ``graphs`` hold ``episode`` and, when the
    server has them, ``encoder`` and ``head``; ``info`` is the served models' metadata."""
    raise DMFExportError("--server is not implemented yet")
