"""Importers: third-party detector weights → an ONNX model and its card in `engines/`."""

from streamguard.inference.importers.mesonet import import_mesonet

__all__ = ["import_mesonet"]
