"""Triton python-backend model: runs the ONNX graph beside it with onnxruntime.

``dmf_export.triton`` copies this file as ``<model>/1/model.py``. It runs inside the
server's python backend stub, where dmf_export is not installed: numpy, onnxruntime and
the backend's ``triton_python_backend_utils`` only. Never imported by dmf_export itself:
the repository writer reads ``PARAMETERS`` from its source.

Besides running the graph it checks each episode against the contract, so that a bad
request gets an error response instead of NaN scores (labels for more classes than the
support holds divide by a zero count) or an out-of-memory server (the ``max_*`` bounds).
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

EPISODE_INPUTS = ("support", "support_labels", "query")  # the contract's (a test pins them)
# The config.pbtxt parameters this model reads, with their defaults: the one table of them.
# The repository writer reads it from this file's source (a plain literal, so that it can)
# and writes no other; a test pins the two together.
PARAMETERS = {
    "image_size": 84,         # the support and query images' height and width
    "max_way": None,          # the largest episode it answers (None: no bound); beyond,
    "max_shot": None,         # an error response instead of a server out of memory
    "max_queries": None,
    "intra_op_threads": 0,    # onnxruntime's intra-op threads per instance (0: all cores)
}
BOUNDS = ("way", "shot", "queries")  # each bounded by PARAMETERS["max_" + bound]


def read_parameters(config):
    """{parameter: int value or its default} from the model's configuration (Triton hands
    every parameter over as a string)."""
    given = config.get("parameters", {})
    values = {}
    for key, default in PARAMETERS.items():
        text = given.get(key, {}).get("string_value", "")
        values[key] = int(text) if text else default
    return values


def check_episode(support, labels, query, image_size, bounds):
    """None if the episode keeps the contract, else what is wrong (one line)."""
    for name, images in (("support", support), ("query", query)):
        if images.ndim != 4 or images.shape[1:] != (3, image_size, image_size):
            return f"{name} must be [N, 3, {image_size}, {image_size}] (got {list(images.shape)})"
        if images.shape[0] == 0:
            return f"{name} is empty: at least one image is needed"
        finite = np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
        if not finite.all():  # NaN pixels give NaN scores for every query, not an answer
            return f"{name} image {int(np.argmin(finite))} holds a non-finite value (NaN or ±inf)"
    if labels.ndim != 2 or labels.shape[0] != support.shape[0]:
        return (f"support_labels must be [S, way] with one row per support image "
                f"(got {list(labels.shape)} for {support.shape[0]} support images)")
    way = labels.shape[1]
    counts = labels.sum(axis=0)
    if not (np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()):
        return "support_labels must be one-hot (a single 1 per row)"
    if (counts == 0).any():
        return (f"support_labels name {way} classes but only {int((counts > 0).sum())} of them "
                f"have a support image")
    for source, name, value in (("support_labels", "way", way), ("support_labels", "shot", int(counts.max())),
                                ("query", "queries", query.shape[0])):
        if bounds[name] is not None and value > bounds[name]:
            return f"{source}: {name} = {value} is over this model's bound max_{name} = {bounds[name]}"
    return None


class TritonPythonModel:
    def initialize(self, args):
        if int(np.__version__.split(".")[0]) >= 2:
            # the stub in nvidia-pytriton 0.7 was built for numpy 1: with numpy 2 it hands
            # over arrays with wrong strides (silently wrong data), so refuse to start
            raise pb_utils.TritonModelException(
                f"numpy {np.__version__} in the python backend's environment; it needs numpy < 2")
        parameters = read_parameters(json.loads(args["model_config"]))
        self.image_size = parameters["image_size"]
        self.bounds = {name: parameters[f"max_{name}"] for name in BOUNDS}
        options = ort.SessionOptions()
        options.intra_op_num_threads = parameters["intra_op_threads"]
        options.inter_op_num_threads = 1
        folder = Path(args["model_repository"]) / args["model_version"]
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.episode = tuple(self.inputs) == EPISODE_INPUTS

    def _respond(self, request):
        feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                 for name in self.inputs}
        if self.episode:
            problem = check_episode(*(feeds[n] for n in EPISODE_INPUTS), self.image_size, self.bounds)
            if problem:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
        try:
            results = self.session.run(self.outputs, feeds)
        except Exception as err:  # onnxruntime's shape and type errors: say them, keep serving
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err).splitlines()[0]))
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(name, value) for name, value in zip(self.outputs, results)])

    def execute(self, requests):
        return [self._respond(request) for request in requests]
