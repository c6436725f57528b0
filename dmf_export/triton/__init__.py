"""Triton Inference Server: model repositories written from the artifacts
(``repository``), a client runner (``client``), and a real server from the
``nvidia-pytriton`` wheel on this machine (``server``).

``python_model.py`` is not a module of dmf_export: it is shipped into each repository as
the python-backend model's ``model.py`` and runs inside the server, where dmf_export is
not installed.
"""
from dmf_export.triton.client import TritonRunner, perf_analyzer_data, write_perf_analyzer_data
from dmf_export.triton.repository import (BACKENDS, DEFAULT_BOUNDS, DEFAULT_INSTANCES, DEFAULT_THREADS,
                                          EPISODE_MODEL, FORMAT_BACKENDS,
                                          MODEL_NAMES, PLATFORM_BACKENDS, PYTHON_PARAMETERS, Backend,
                                          config_text, model_name, model_path, repository_models,
                                          write_repository)
from dmf_export.triton.server import (TritonServer, find_distribution, free_ports, glibc_version,
                                      group_members, serve_forever)

__all__ = ["BACKENDS", "DEFAULT_BOUNDS", "DEFAULT_INSTANCES", "DEFAULT_THREADS", "EPISODE_MODEL", "FORMAT_BACKENDS", "MODEL_NAMES",
           "PLATFORM_BACKENDS", "PYTHON_PARAMETERS", "Backend", "TritonRunner", "TritonServer",
           "config_text", "find_distribution", "free_ports", "glibc_version", "group_members",
           "model_name", "model_path", "perf_analyzer_data", "repository_models", "serve_forever",
           "write_perf_analyzer_data", "write_repository"]
