"""nsn-export: Nested Subspace Networks, from a Hugging Face model to one rank-elastic artifact.

The torch side: the NSN layer, model surgery, the multi-rank objective and trainer, checkpoints,
FLOP accounting, and (in ``nsn_export.export``) the ONNX export.
"""

from .checkpoint import CheckpointError, load_nsn, save_nsn
from .config import NSNConfig
from .evaluate import evaluate_ranks
from .flops import flops_fraction, model_flops, rank_for_budget
from .layers import NSNLinear
from .objective import MultiRankObjective, default_rank_grid
from .surgery import adapt, get_rank, max_rank, rank, set_rank

__version__ = "0.1.0"


def __getattr__(name):
    # The trainer imports transformers.Trainer (and accelerate); load it only when asked for.
    if name == "NSNTrainer":
        from .trainer import NSNTrainer
        return NSNTrainer
    raise AttributeError(name)


__all__ = [
    "NSNLinear", "adapt", "set_rank", "rank", "get_rank", "max_rank", "save_nsn", "load_nsn",
    "CheckpointError", "NSNConfig", "MultiRankObjective", "default_rank_grid", "NSNTrainer",
    "evaluate_ranks", "model_flops", "flops_fraction", "rank_for_budget",
]
