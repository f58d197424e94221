"""FLOPs per token of a whole model at a given rank, and the inverse (largest rank within a budget).

Counted per token: ``2 d_in d_out`` for every dense linear layer (the output head included),
``2 r_l (d_in + d_out)`` for every NSN layer at ``r_l = min(rank, R_l)``, and ``4 L d_attn`` per
attention layer for the score and value products against a context of ``L`` tokens.
"""

from __future__ import annotations

from torch import nn

from .layers import NSNLinear, dense_weight, is_linear
from .surgery import max_rank as model_max_rank


def attention_flops_per_token(config, context_length: int) -> int:
    """``QK^T`` and ``softmax(.)V``: ``2 * 2 * L * heads * head_dim`` per layer, per token."""
    if config is None or context_length <= 0:
        return 0
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return 4 * context_length * heads * head_dim * layers


def model_flops(model: nn.Module, rank: int | None = None, context_length: int = 0) -> int:
    """FLOPs per token at ``rank`` (``None``: the original dense model, NSN layers counted dense)."""
    total = 0
    for module in model.modules():
        if isinstance(module, NSNLinear):
            if rank is None:
                total += 2 * module.in_features * module.out_features
            else:
                total += module.flops_per_token(rank)
        elif is_linear(module):
            out_features, in_features = dense_weight(module).shape
            total += 2 * in_features * out_features
    return total + attention_flops_per_token(getattr(model, "config", None), context_length)


def flops_fraction(model: nn.Module, rank: int, context_length: int = 0) -> float:
    """FLOPs per token at ``rank`` as a fraction of the original dense model's."""
    return model_flops(model, rank, context_length) / model_flops(model, None, context_length)


def rank_for_budget(model: nn.Module, fraction: float, context_length: int = 0) -> int:
    """The largest rank whose FLOPs are within ``fraction`` of the dense model's.

    Raises ``ValueError`` when even rank 1 exceeds the budget.
    """
    if not fraction > 0:
        raise ValueError(f"FLOPs budget fraction must be > 0, got {fraction}")
    lo, hi = 1, model_max_rank(model)
    if flops_fraction(model, lo, context_length) > fraction:
        raise ValueError(
            f"even rank 1 needs {flops_fraction(model, 1, context_length):.3f} of the dense FLOPs, "
            f"above the budget {fraction}; raise the budget or factorise more layers"
        )
    while lo < hi:  # FLOPs grow monotonically with rank
        mid = (lo + hi + 1) // 2
        if flops_fraction(model, mid, context_length) <= fraction:
            lo = mid
        else:
            hi = mid - 1
    return lo
