"""TensorRT: the project's plugin and engines.

- ``plugin``: the plugin's identity (name, version, namespace, ONNX domain), building its
  library (``dmf-export build-plugin``) and loading it into TensorRT;
- ``engine``: building an engine from the plugin-flavour ONNX graph, and its JSON;
- ``runner``: ``EngineRunner``.

TensorRT's Python package is optional: nothing here imports it before it is needed, and
each place that does says clearly when it is missing. ``formats.tensorrt`` is the
``Format`` that puts this behind ``export``, ``verify`` and ``bench``.
"""
