"""ONNX Runtime for exported NSN graphs: ``NSNSession`` and the zero-copy rank weight views."""

from .session import NSNSession

__all__ = ["NSNSession"]
