"""Input statistics of linear layers on calibration data, for data-aware initialisation.

For each target layer, ``X^T X`` (the second moment of the tokens it sees) accumulated in float64
over at most ``max_tokens`` real (unpadded) tokens, streamed batch by batch through forward
pre-hooks that are removed afterwards. Memory is bounded: the layers are processed in groups whose
``d_in x d_in`` float64 matrices fit in ``memory_bytes``, one pass over the data per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layers import dense_weight


@dataclass
class InputMoment:
    """``sum over tokens of x x^T`` (float64, ``d_in x d_in``) and the token count."""

    xtx: torch.Tensor
    tokens: int

    @property
    def covariance(self) -> torch.Tensor:
        return self.xtx / max(self.tokens, 1)


def layer_groups(sizes: dict[str, int], memory_bytes: int) -> list[list[str]]:
    """Layer names in groups whose float64 ``d_in^2`` matrices fit in ``memory_bytes`` together
    (a layer larger than the budget gets a group of its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, d_in in sizes.items():
        need = d_in * d_in * 8
        if groups[-1] and used + need > memory_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return [g for g in groups if g]


def input_moments(model: nn.Module, names: list[str], batches: list[dict], max_tokens: int,
                  memory_bytes: int = 1 << 30, progress: Callable[[int, int], None] | None = None
                  ) -> dict[str, InputMoment]:
    """``InputMoment`` of each layer in ``names`` over the first ``max_tokens`` unpadded tokens.

    ``progress(done, total)`` is called after each batch (``total``: batches over all passes)."""
    sizes = {name: dense_weight(model.get_submodule(name)).shape[1] for name in names}
    groups = layer_groups(sizes, memory_bytes)
    batches = batches[:batches_needed(batches, max_tokens)]
    moments: dict[str, InputMoment] = {}
    model.eval()
    done = 0
    for group in groups:
        stats = {name: InputMoment(torch.zeros(sizes[name], sizes[name], dtype=torch.float64), 0) for name in group}
        state: dict = {}

        def hook(name):
            def record(module, inputs):
                x = inputs[0].detach().reshape(-1, sizes[name])
                mask = state.get("mask")
                if mask is not None and mask.numel() == x.shape[0]:
                    x = x[mask]
                x = x.to(torch.float64)
                stats[name].xtx += x.T @ x
                stats[name].tokens += x.shape[0]
            return record

        handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in group]
        try:
            with torch.no_grad():
                for batch in batches:
                    mask = batch.get("attention_mask")
                    state["mask"] = mask.reshape(-1).bool() if mask is not None else None
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                    done += 1
                    if progress is not None:
                        progress(done, len(groups) * len(batches))
        finally:
            for handle in handles:
                handle.remove()
        moments.update(stats)
    return moments


def batch_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def batches_needed(batches: list[dict], max_tokens: int) -> int:
    """How many leading batches hold ``max_tokens`` real tokens (all of them if they hold fewer)."""
    seen = 0
    for count, batch in enumerate(batches, 1):
        seen += batch_tokens(batch)
        if seen >= max_tokens:
            return count
    return len(batches)
