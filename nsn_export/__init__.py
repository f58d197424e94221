"""nsn-export: Nested Subspace Networks, from a Hugging Face model to one rank-elastic artifact.

The torch side: the NSN layer, model surgery, the multi-rank objective and trainer, checkpoints,
FLOP accounting, and (in ``nsn_export.export``) the ONNX export.
"""

import importlib

__version__ = "0.1.0"

# Names load on first use (PEP 562), so ``nsn_export.cli`` imports without torch and can answer
# "install the export extra" in one line instead of a traceback.
_EXPORTS = {
    "CheckpointError": "checkpoint", "load_nsn": "checkpoint", "save_nsn": "checkpoint", "NSNConfig": "config",
    "evaluate_ranks": "evaluate", "flops_fraction": "flops", "model_flops": "flops", "rank_for_budget": "flops",
    "NSNLinear": "layers", "MultiRankObjective": "objective", "default_rank_grid": "objective",
    "adapt": "surgery", "get_rank": "surgery", "max_rank": "surgery", "rank": "surgery", "set_rank": "surgery",
    "NSNTrainer": "trainer",  # imports transformers.Trainer (and accelerate)
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nsn_export' has no attribute {name!r}")
    from deploy.extras import require_extra

    require_extra("export", f"nsn_export.{name}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "NSNLinear", "adapt", "set_rank", "rank", "get_rank", "max_rank", "save_nsn", "load_nsn",
    "CheckpointError", "NSNConfig", "MultiRankObjective", "default_rank_grid", "NSNTrainer",
    "evaluate_ranks", "model_flops", "flops_fraction", "rank_for_budget",
]
