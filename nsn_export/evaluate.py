"""Evaluate an NSN model at a list of ranks: loss and accuracy / perplexity, or embedding fidelity."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .flops import flops_fraction
from .outputs import hf_forward
from .surgery import max_rank, rank as at_rank


@torch.no_grad()
def outputs_at(model, batches, rank_value: int | None) -> tuple[list, list]:
    """Per batch ``(loss, output)`` at ``rank_value`` (``None``: the model as it is)."""
    losses, outputs = [], []
    for batch in batches:
        if rank_value is None:
            loss, output = hf_forward(model, batch)
        else:
            with at_rank(model, rank_value):
                loss, output = hf_forward(model, batch)
        losses.append(loss)
        outputs.append(output)
    return losses, outputs


def evaluate_ranks(model, batches: list[dict], ranks: list[int], reference: list | None = None,
                   context_length: int = 0, progress: Callable[[int], None] | None = None) -> list[dict]:
    """One row per rank: ``rank``, ``flops_fraction`` and the metrics the model supports.

    Models with a loss report ``loss`` plus ``perplexity`` (causal LMs) or ``accuracy``
    (classifiers). Every model reports ``cosine``: the mean cosine similarity of its output to
    ``reference`` (per-batch outputs of the dense model; default: this model at its maximum rank).
    ``progress(rank)`` is called after each rank.
    """
    model.eval()
    if reference is None:
        reference = outputs_at(model, batches, max_rank(model))[1]
    rows = []
    for rank_value in ranks:
        losses, outputs = outputs_at(model, batches, rank_value)
        row = {"rank": rank_value, "flops_fraction": round(flops_fraction(model, rank_value, context_length), 4)}
        cosines = [F.cosine_similarity(o.flatten(0, -2), r.flatten(0, -2), dim=-1).mean() for o, r in zip(outputs, reference)]
        row["cosine"] = round(float(torch.stack(cosines).mean()), 5)
        if losses and losses[0] is not None:
            loss = float(torch.stack(losses).mean())
            row["loss"] = round(loss, 5)
            labels = batches[0].get("labels")
            if labels is not None and labels.dim() == 1:
                correct = sum(int((o.argmax(-1) == b["labels"]).sum()) for o, b in zip(outputs, batches))
                row["accuracy"] = round(correct / sum(len(b["labels"]) for b in batches), 4)
            else:
                row["perplexity"] = round(math.exp(min(loss, 50.0)), 3)
        rows.append(row)
        if progress is not None:
            progress(rank_value)
    return rows


def causal_scorer(model, rank_value: int | None, batch_size: int = 16):
    """``calibration.llm``'s scorer over a causal LM at ``rank_value`` (None: the model as it is, e.g.
    the dense teacher): per sequence, the log-probability of each token given those before it and
    the greedy next token at each position. Sequences run in right-padded batches of similar length."""
    import contextlib

    def score(sequences: list[list[int]]):
        results: list = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in chosen)
            ids = torch.zeros(len(chosen), width, dtype=torch.long)
            mask = torch.zeros(len(chosen), width, dtype=torch.long)
            for row, i in enumerate(chosen):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, :len(sequences[i])] = 1
            with torch.no_grad(), (at_rank(model, rank_value) if rank_value else contextlib.nullcontext()):
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logprobs = F.log_softmax(logits, -1)
            for row, i in enumerate(chosen):
                length = len(sequences[i]) - 1
                targets = ids[row, 1:length + 1]
                results[i] = (logprobs[row, :length].gather(-1, targets[:, None])[:, 0].double().numpy(),
                              logits[row, :length].argmax(-1).numpy())
        return results

    return score


def embedder(model, tokenizer, rank_value: int | None, batch_size: int, max_length: int):
    """``embed(texts)``: a torch model's sentence embeddings (mean-pooled) at ``rank_value``."""
    from .data import make_batches

    def embed(texts):
        batches = make_batches([{"text": t} for t in texts], tokenizer, False, batch_size, max_length)
        return torch.cat(outputs_at(model, batches, rank_value)[1]).float().numpy()

    return embed
