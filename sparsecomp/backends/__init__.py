"""Execution backends, reached through :func:`sparsecomp.lower` (imported lazily, one optional extra each).

* ``tvm`` (``sparsecomp[tvm]``): Relax VM with sparsecomp's own TIR kernels (``backends/tvm``).
* ``ort`` (``sparsecomp[onnx]``): ONNX export (``backends/onnx.py``) + ONNX Runtime session (``backends/ort.py``).
* ``torch.compile(model, backend="sparsecomp")``: ``backends/dynamo.py`` (registered as an entry point).
"""
