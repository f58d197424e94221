"""The paper's multi-rank objective: the anchor (maximum) rank plus sampled lower ranks each step,
combined with learned per-rank log-variances ``s_k`` as ``sum_k exp(-s_k) L_k + s_k``.

Two choices beyond the paper, both so that the ranks one deploys are trained, not just sampled:
the curriculum opens ranks from high to low and then samples the least-trained open ranks first,
so a rank opened late catches up and every rank ends with the same share of steps; and each
``s_k`` starts at the log of its rank's first loss (its optimum, ``s_k = log L_k``) instead of 0,
so it tracks ``log L_k`` from the first step rather than drifting there over hundreds of steps.
Under data parallelism (``torchrun``) every process samples the same ranks (same seed), and the
``s_k`` start values and gradients are averaged over processes, so they stay identical.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .surgery import rank as at_rank


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` averaged in place over the processes of a ``torch.distributed`` group (a no-op
    in a single process)."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        distributed.all_reduce(tensor)
        tensor /= distributed.get_world_size()
    return tensor

SCHEDULES = ("uniform", "curriculum")
# A rank whose first loss is ~0 (the anchor of an exact start distilled towards its own dense
# model) would start with weight 1 / L -> inf; its s_k starts no lower than log of this.
MIN_START_LOSS = 1e-3
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
                 schedule: str = "curriculum", warmup_fraction: float = 0.3, distill: str | None = None,
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
        if not 0 <= warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
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
        self.sample_counts = {r: 0 for r in self.ranks}  # lower ranks: how many steps sampled each
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
        """The anchor and this step's sampled lower ranks (highest first). Uniform: a random
        choice; curriculum: the least-sampled open ranks, ties broken at random."""
        allowed = self.allowed_ranks(progress)
        k = min(self.samples_per_step, len(allowed))
        if self.schedule == "uniform":
            chosen = self._random.sample(allowed, k)
        else:
            shuffled = self._random.sample(allowed, len(allowed))
            chosen = sorted(shuffled, key=self.sample_counts.__getitem__)[:k]
        for rank_value in chosen:
            self.sample_counts[rank_value] += 1
        return [self.max_rank] + sorted(chosen, reverse=True)

    def log_variance(self, rank: int) -> torch.Tensor:
        return self.log_variances[self.all_ranks.index(rank)]

    def log_variance_vector(self) -> torch.Tensor:
        """All ``s_k`` in the order of ``all_ranks`` (anchor first), detached."""
        return torch.stack([s.detach() for s in self.log_variances])

    def combine(self, losses: dict[int, torch.Tensor], held: frozenset[int] = frozenset()) -> torch.Tensor:
        """``sum_k exp(-s_k) L_k + s_k`` over the ranks in ``losses`` (no gradient to the ``s_k`` of
        the ranks in ``held``)."""
        total = 0.0
        for rank_value, loss in losses.items():
            s = self.log_variance(rank_value)
            s = s.detach() if rank_value in held else s
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
        if not losses:
            raise ValueError("no loss to optimise: the batch has no labels and no lower rank was sampled; "
                             "pass labels, a teacher output, or samples_per_step >= 1 with distill set")
        # A new rank's s_k is set to its optimum for this batch; its gradient there is 0 up to
        # rounding, which Adam would turn into a full step: hold it for this step.
        return self.combine(losses, held=self.start_log_variances(losses)), losses

    @torch.no_grad()
    def start_log_variances(self, losses: dict[int, torch.Tensor]) -> frozenset[int]:
        """A rank seen for the first time starts its ``s_k`` at ``log L_k``, its optimum for this
        loss (averaged over processes, so every process starts from the same value; at least
        ``log MIN_START_LOSS``). Returns the ranks started."""
        started = frozenset(losses) - self.trained_ranks
        for rank_value in sorted(started):
            start = mean_over_processes(losses[rank_value].detach().clone().float()).clamp(min=MIN_START_LOSS).log()
            self.log_variance(rank_value).copy_(start)
        self.trained_ranks.update(started)
        return started

    def learned_log_variances(self) -> dict[int, float]:
        return {r: float(self.log_variance(r).detach()) for r in sorted(self.trained_ranks)}
