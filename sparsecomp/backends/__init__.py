"""Backends that lower a compressed graph (TVM, ONNX Runtime). None is shipped yet; the compressed
``torch.nn.Module`` returned by ``sparsecomp.compress`` runs in torch directly."""
