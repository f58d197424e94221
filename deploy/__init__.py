"""Device side of nsn-export: runs exported NSN graphs. Never imports torch or transformers."""

from .external_data import UnsafeModelError
from .metadata import NSNModelInfo, validate_rank
from .runtime import Generation, NonFiniteOutputWarning
from .ort.session import NSNSession
from .text import TruncationWarning

__all__ = ["NSNSession", "NSNModelInfo", "Generation", "validate_rank", "UnsafeModelError",
           "NonFiniteOutputWarning", "TruncationWarning"]
