"""Device side of nsn-export: runs exported NSN graphs. Never imports torch or transformers."""

from .metadata import NSNModelInfo, validate_rank
from .session import Generation, NSNSession

__all__ = ["NSNSession", "NSNModelInfo", "Generation", "validate_rank"]
