"""The paper's multi-rank objective: the anchor (maximum) rank plus sampled lower ranks each step,
combined with learned per-rank log-variances ``s_k`` as ``sum_k exp(-s_k) L_k + s_k``.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .surgery import rank as at_rank

SCHEDULES = ("uniform", "curriculum")
DISTILL_LOSSES = ("kl", "cosine", "mse")


def default_rank_grid(max_rank: int, levels: int = 8) -> list[int]:
    """Ranks trained below the anchor: ``R/16`` and ``k R / levels`` for ``k < levels`` (deduplicated)."""
    grid = {max(1, round(max_rank / 16))} | {max(1, round(max_rank * k / levels)) for k in range(1, levels)}
    return sorted(r for r in grid if r < max_rank)


def distillation_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0):
    """``kl``: KL(teacher || student) over the last axis (logits); ``cosine``: 1 - cosine similarity;
    ``mse``: mean squared error. The teacher is detached."""
    teacher = teacher.detach()
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, -1).flatten(0, -2), F.log_softmax(teacher / t, -1).flatten(0, -2),
                        log_target=True, reduction="batchmean") * t * t
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"distillation loss must be one of {DISTILL_LOSSES}, got {kind!r}")


class MultiRankObjective(nn.Module):
    """Anchor rank + ``samples_per_step`` sampled lower ranks, uncertainty-weighted.

    ``forward_fn(model, batch)`` returns ``(task_loss or None, output)`` at the model's current rank;
    ``output`` (logits or embeddings) is what distillation compares. With ``distill`` set, a lower
    rank's loss is the distance from its output to the teacher: the ``teacher_output`` passed in
    (e.g. the original dense model's), or else the anchor rank's output on the same batch, detached.
    """

    def __init__(self, max_rank: int, ranks: list[int] | None = None, samples_per_step: int = 1,
                 schedule: str = "curriculum", warmup_fraction: float = 0.5, distill: str | None = None,
                 temperature: float = 1.0, seed: int = 0):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if distill is not None and distill not in DISTILL_LOSSES:
            raise ValueError(f"distill must be None or one of {DISTILL_LOSSES}, got {distill!r}")
        self.max_rank = max_rank
        self.ranks = sorted(set(ranks)) if ranks else default_rank_grid(max_rank)
        bad = [r for r in self.ranks if not 1 <= r < max_rank]
        if bad:
            raise ValueError(f"sampled ranks must be in [1, {max_rank - 1}] (below the anchor), got {bad}")
        if samples_per_step < 0:
            raise ValueError(f"samples_per_step must be >= 0, got {samples_per_step}")
        self.samples_per_step = samples_per_step
        self.schedule = schedule
        self.warmup_fraction = warmup_fraction
        self.distill = distill
        self.temperature = temperature
        self.all_ranks = [max_rank] + self.ranks[::-1]
        # One scalar per rank: a rank not sampled this step has no gradient (grad None), so Adam
        # leaves its s_k alone instead of drifting it on stale momentum.
        self.log_variances = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in self.all_ranks)
        self.trained_ranks: set[int] = set()
        self._random = random.Random(seed)

    def allowed_ranks(self, progress: float) -> list[int]:
        """Lower ranks that may be sampled at ``progress`` in [0, 1] of training."""
        if self.schedule == "uniform" or not self.ranks:
            return list(self.ranks)
        # Curriculum: the lowest allowed rank falls linearly from the highest grid rank to the lowest.
        opened = min(1.0, progress / self.warmup_fraction) if self.warmup_fraction > 0 else 1.0
        count = 1 + round(opened * (len(self.ranks) - 1))
        return self.ranks[-count:]

    def step_ranks(self, progress: float) -> list[int]:
        allowed = self.allowed_ranks(progress)
        k = min(self.samples_per_step, len(allowed))
        return [self.max_rank] + sorted(self._random.sample(allowed, k), reverse=True)

    def log_variance(self, rank: int) -> torch.Tensor:
        return self.log_variances[self.all_ranks.index(rank)]

    def log_variance_vector(self) -> torch.Tensor:
        """All ``s_k`` in the order of ``all_ranks`` (anchor first), detached."""
        return torch.stack([s.detach() for s in self.log_variances])

    def combine(self, losses: dict[int, torch.Tensor]) -> torch.Tensor:
        """``sum_k exp(-s_k) L_k + s_k`` over the ranks in ``losses``."""
        total = 0.0
        for rank_value, loss in losses.items():
            s = self.log_variance(rank_value)
            total = total + torch.exp(-s) * loss + s
        return total

    def forward(self, model: nn.Module, forward_fn: Callable, batch, progress: float = 1.0,
                teacher_output: torch.Tensor | None = None):
        """Returns ``(total_loss, {rank: loss})`` for one batch."""
        losses: dict[int, torch.Tensor] = {}
        teacher = teacher_output
        for rank_value in self.step_ranks(progress):
            with at_rank(model, rank_value):
                task_loss, output = forward_fn(model, batch)
            if self.distill is not None and (teacher is not None or rank_value != self.max_rank):
                loss = distillation_loss(self.distill, output, teacher, self.temperature)
            elif task_loss is not None:
                loss = task_loss
            else:
                loss = None  # self-distillation without labels: the anchor only provides the teacher
            if rank_value == self.max_rank and teacher is None:
                teacher = output.detach()
            if loss is not None:
                losses[rank_value] = loss
                self.trained_ranks.add(rank_value)
        if not losses:
            raise ValueError("no loss to optimise: the batch has no labels and no lower rank was sampled; "
                             "pass labels, a teacher output, or samples_per_step >= 1 with distill set")
        return self.combine(losses), losses

    def learned_log_variances(self) -> dict[int, float]:
        return {r: float(self.log_variance(r).detach()) for r in sorted(self.trained_ranks)}
