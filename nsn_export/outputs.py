"""What a Hugging Face model's output means for NSN training and evaluation."""

from __future__ import annotations

import torch


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings: the mean of the token states where the attention mask is 1."""
    if attention_mask is None:
        return last_hidden_state.mean(1)
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def hf_forward(model, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run ``model`` on ``batch``: ``(loss, logits)`` for models with a head, else
    ``(None, mean-pooled sentence embeddings)`` for bare encoders."""
    outputs = model(**batch)
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return getattr(outputs, "loss", None), logits
    return None, mean_pool(outputs.last_hidden_state, batch.get("attention_mask"))


def hidden_states_forward(model, batch: dict) -> tuple[None, torch.Tensor]:
    """Run an encoder on ``batch``: ``(None, every layer's output state at every real token)``,
    shaped ``(layers, tokens, hidden)``: a distillation target layer by layer and token by token,
    rather than the pooled embedding alone."""
    outputs = model(**batch, output_hidden_states=True)
    states = torch.stack(outputs.hidden_states[1:])
    mask = batch.get("attention_mask")
    return None, states[:, mask.bool()] if mask is not None else states.flatten(1, 2)
