"""Statistics of linear layers on calibration data, for data-aware initialisation.

For each target layer, ``X^T X`` (the second moment of the tokens it sees) accumulated in float64
over at most ``max_tokens`` real (unpadded) tokens, streamed batch by batch through forward
pre-hooks that are removed afterwards; and, for the two-sided ("fisher") initialisation, ``G^T G``:
the second moment of the distillation loss's gradients at the layer's output, sampled so that its
expectation is the loss's Gauss-Newton matrix at the dense model (``output_moments``). Memory is
bounded: the layers are processed in groups whose ``d x d`` float64 matrices fit in
``memory_bytes``, one pass over the data per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layers import dense_weight


@dataclass
class InputMoment:
    """``sum over tokens of x x^T`` (float64, ``d x d``) and the token count: of a layer's inputs, or
    (``output_moments``) of the loss's gradients at its outputs."""

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

    def run(index: int, batch: dict, hooks: dict[str, Callable[[torch.Tensor], None]]) -> None:
        handles = [model.get_submodule(name).register_forward_pre_hook(
            lambda module, inputs, record=record: record(inputs[0])) for name, record in hooks.items()]
        try:
            with torch.no_grad():
                model(**model_inputs(batch))
        finally:
            for handle in handles:
                handle.remove()

    return accumulate(model, sizes, batches, max_tokens, memory_bytes, progress, run)


def output_moments(model: nn.Module, names: list[str], batches: list[dict], max_tokens: int,
                   memory_bytes: int = 1 << 30, progress: Callable[[int, int], None] | None = None,
                   seed: int = 0) -> dict[str, InputMoment]:
    """For each layer in ``names``: the second moment of ``g = J^T v``, the gradient at the layer's
    output of ``<output, v>``, over the first ``max_tokens`` unpadded tokens, where ``v`` is drawn
    so that ``E[v v^T]`` is the Gauss-Newton matrix of the distillation loss at the dense model:

    - a sentence embedding (a bare encoder, mean-pooled; cosine distillation):
      ``v = (I - e e^T / |e|^2) z / |e|`` with ``z ~ N(0, I)``, the Hessian of ``1 - cos``;
    - logits (a language model or a classifier; KL distillation): ``v = onehot(y) - p`` with
      ``y ~ p = softmax(logits)``, the Fisher information of the output distribution.

    So ``E[g g^T]`` is the output factor of a Kronecker-factored (K-FAC) estimate of how much the
    loss grows when the layer's output moves. Only activations get gradients (the parameters are
    frozen for the pass and restored after); batch ``i`` draws with seed ``seed + i``, so every
    group of layers sees the same draws."""
    from .outputs import mean_pool

    sizes = {name: dense_weight(model.get_submodule(name)).shape[0] for name in names}
    embeddings = model.get_input_embeddings()

    def run(index: int, batch: dict, hooks: dict[str, Callable[[torch.Tensor], None]]) -> None:
        generator = torch.Generator().manual_seed(seed + index)

        def watch(record):
            def hook(module, inputs, output):
                output.register_hook(record)  # called with the gradient at this output
            return hook

        handles = [model.get_submodule(name).register_forward_hook(watch(record)) for name, record in hooks.items()]
        handles.append(embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_()))
        try:
            with torch.enable_grad():
                outputs = model(**model_inputs(batch))
                logits = getattr(outputs, "logits", None)
                mask = batch.get("attention_mask")
                output = logits if logits is not None else mean_pool(outputs.last_hidden_state, mask)
                (output * gauss_newton_probe(output, logits is not None, generator, mask)).sum().backward()
        finally:
            for handle in handles:
                handle.remove()

    frozen = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in frozen:
            parameter.requires_grad_(False)
        return accumulate(model, sizes, batches, max_tokens, memory_bytes, progress, run)
    finally:
        for parameter, requires_grad in frozen.items():
            parameter.requires_grad_(requires_grad)


def gauss_newton_probe(output: torch.Tensor, logits: bool, generator: torch.Generator,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """A random ``v`` shaped like ``output`` with ``E[v v^T]`` the distillation loss's Gauss-Newton
    matrix at ``output`` (see ``output_moments``): ``logits`` or a sentence embedding; zero where a
    token's ``mask`` is 0."""
    output = output.detach().float()
    if not logits:  # the tangent of the cosine at e, scaled by 1/|e|
        norm = output.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        unit = output / norm
        z = torch.randn(output.shape, generator=generator)
        return (z - (z * unit).sum(-1, keepdim=True) * unit) / norm
    rows = output.reshape(-1, output.shape[-1])
    probabilities = rows.softmax(-1)
    labels = torch.multinomial(probabilities, 1, generator=generator)
    probe = (torch.zeros_like(probabilities).scatter_(1, labels, 1.0) - probabilities).reshape(output.shape)
    if mask is not None and output.dim() == 3:
        probe = probe * mask.unsqueeze(-1).to(probe.dtype)
    return probe


def accumulate(model: nn.Module, sizes: dict[str, int], batches: list[dict], max_tokens: int, memory_bytes: int,
               progress: Callable[[int, int], None] | None, run: Callable) -> dict[str, InputMoment]:
    """Sum ``v v^T`` of the ``(..., d)`` tensors each layer's recorder is given, over the first
    ``max_tokens`` unpadded tokens, in groups of layers whose matrices fit in ``memory_bytes``;
    ``run(index, batch, {name: recorder})`` runs batch ``index`` with the recorders attached."""
    groups = layer_groups(sizes, memory_bytes)
    batches = batches[:batches_needed(batches, max_tokens)]
    moments: dict[str, InputMoment] = {}
    model.eval()
    done = 0
    for group in groups:
        stats = {name: InputMoment(torch.zeros(sizes[name], sizes[name], dtype=torch.float64), 0) for name in group}
        for index, batch in enumerate(batches):
            mask = batch.get("attention_mask")
            mask = mask.reshape(-1).bool() if mask is not None else None

            def recorder(name):
                def record(tensor: torch.Tensor) -> None:
                    x = tensor.detach().reshape(-1, sizes[name])
                    if mask is not None and mask.numel() == x.shape[0]:
                        x = x[mask]
                    x = x.to(torch.float64)
                    stats[name].xtx += x.T @ x
                    stats[name].tokens += x.shape[0]
                return record

            run(index, batch, {name: recorder(name) for name in group})
            done += 1
            if progress is not None:
                progress(done, len(groups) * len(batches))
        moments.update(stats)
    return moments


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


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
