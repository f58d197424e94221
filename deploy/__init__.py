"""Device side of nsn-export: runs exported NSN graphs. Never imports torch or transformers.

``NSNSession`` (ONNX Runtime) loads on first use, so the parts that do not need ONNX Runtime (the
TensorRT path, the governor and its simulator) work on an install without the ``cpu``/``gpu`` extra.
"""

from .external_data import UnsafeModelError
from .metadata import NSNModelInfo, validate_rank
from .runtime import Generation, NonFiniteOutputWarning
from .text import TruncationWarning


def __getattr__(name):
    if name == "NSNSession":
        from .ort.session import NSNSession

        return NSNSession
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")


__all__ = ["NSNSession", "NSNModelInfo", "Generation", "validate_rank", "UnsafeModelError",
           "NonFiniteOutputWarning", "TruncationWarning"]
