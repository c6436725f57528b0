"""Running a dmf-export TensorRT engine (``EngineRunner``).

The deformable convolution runs in the project's plugin (``plugins/``), which the engine
does not contain: the library must be loaded into TensorRT's plugin registry before the
engine is deserialised. ``EngineRunner`` loads the one it is given, or
``$DMF_EXPORT_TRT_PLUGIN``, or the one the engine's JSON names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from dmf_export.contract import AXIS_WORDS, EPISODE_INPUTS, EPISODE_OUTPUTS, TENSORS
from dmf_export.errors import DMFExportError
from dmf_export.formats.base import Runner
from dmf_export.tensorrt.engine import make_logger, read_engine_info, read_engine_meta, require_tensorrt
from dmf_export.tensorrt.plugin import PLUGIN_ENV, load_plugin_library

ALIGNMENT = 256  # bytes: TensorRT requires every tensor address to be a multiple of it


def require_gpu(what: str) -> None:
    if not torch.cuda.is_available():
        raise DMFExportError(f"{what} needs a CUDA GPU, and torch sees none here")


class EngineRunner(Runner):
    """Runs a dmf-export engine: ``runner(support, support_labels, query) -> scores``.

    Inputs are NumPy arrays or torch tensors (CPU ones are copied to the GPU); the
    scores are a CUDA torch tensor of the engine's precision. Work is queued on the
    runner's own CUDA stream, which is synchronised before the call returns. One call
    at a time per runner (it owns one execution context).
    """

    def __init__(self, path, plugin: str | os.PathLike | None = None, device: int | None = None,
                 log: Callable[[str], None] = lambda _: None):
        path = Path(path)
        meta = read_engine_meta(path)
        super().__init__(path, read_engine_info(path), "tensorrt", {"episode": self._execute})
        trt = require_tensorrt()
        require_gpu(f"running the TensorRT engine {path}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        library = plugin or os.environ.get(PLUGIN_ENV) or meta.get("plugin_library")
        if not library:
            raise DMFExportError(f"{path}: no plugin library recorded; pass plugin= or set {PLUGIN_ENV}")
        load_plugin_library(trt, library, log)
        self._logger = make_logger(trt, log)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)  # kept: the engine must not outlive it
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise DMFExportError(f"TensorRT could not load {path}: {self._logger.last_error()}")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise DMFExportError(f"TensorRT could not create an execution context for {path}: "
                                     f"{self._logger.last_error()}")
            self.stream = torch.cuda.Stream(self.device)
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = [n for n in (*EPISODE_INPUTS, *EPISODE_OUTPUTS) if n not in names]
        if missing:
            raise DMFExportError(f"{path}: the engine has no tensor(s) {', '.join(missing)}")
        self._dtypes = {name: _torch_dtype(trt, self.engine.get_tensor_dtype(name))
                        for name in (*EPISODE_INPUTS, *EPISODE_OUTPUTS)}
        self.profile = {name: [tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, 0)]
                        for name in EPISODE_INPUTS}

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        """The episode's sizes against the profile's bounds (``Runner.__call__`` has checked
        the episode itself: tensors, ranks, channels, image size, labels matching the support)."""
        low, _, high = self.profile[name]
        for axis, (size, lo, hi) in enumerate(zip(shape, low, high)):
            if not lo <= size <= hi:
                allowed = f"exactly {lo}" if lo == hi else \
                    f"{lo}..{hi} (rebuild the engine with larger --max-way/--max-shot/--max-queries)"
                raise DMFExportError(f"{name} has {size} {AXIS_WORDS.get(TENSORS['episode'][name][axis], 'elements')} on axis {axis}; "
                                     f"this engine's profile allows {allowed}")

    def _execute(self, support, support_labels, query):
        inputs = {}
        # GPU inputs may still be being written on the caller's stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for name, tensor in zip(EPISODE_INPUTS, (support, support_labels, query)):
                self._check_profile(name, tuple(tensor.shape))
                tensor = tensor.to(self.device, self._dtypes[name]).contiguous()
                if tensor.data_ptr() % ALIGNMENT:  # a slice such as support[1:]: a fresh block is aligned
                    tensor = tensor.clone()
                inputs[name] = tensor
            for name, tensor in inputs.items():
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise DMFExportError(f"TensorRT refused the shape {list(tensor.shape)} for {name}: "
                                         f"{self._logger.last_error()}")
                self._set_address(name, tensor)
            out_name = EPISODE_OUTPUTS[0]
            shape = tuple(int(d) for d in self.context.get_tensor_shape(out_name))
            if any(d < 0 for d in shape):
                raise DMFExportError(f"TensorRT could not infer the shape of {out_name}: {self._logger.last_error()}")
            scores = torch.empty(shape, dtype=self._dtypes[out_name], device=self.device)
            self._set_address(out_name, scores)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise DMFExportError(f"TensorRT failed to run {self.path.name}: {self._logger.last_error()}")
        self.stream.synchronize()  # the inputs made on this stream stay alive until here
        return scores

    def _set_address(self, name, tensor) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise DMFExportError(f"TensorRT refused the address of {name} ({tensor.data_ptr():#x}): "
                                 f"{self._logger.last_error()}")


def _torch_dtype(trt, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
    if dtype not in table:
        raise DMFExportError(f"unexpected engine tensor type {dtype}")
    return table[dtype]
