"""``NSNTrainer``: a ``transformers.Trainer`` that optimises the multi-rank objective.

Being a ``Trainer`` subclass, it runs unchanged under ``torchrun`` / ``accelerate`` (multi-GPU).
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers

from .checkpoint import write_checkpoint
from .objective import MultiRankObjective, mean_over_processes
from .outputs import hf_forward


class NSNTrainer(transformers.Trainer):
    """Trains all ranks jointly: anchor rank + sampled lower ranks per step (``objective``).

    Logs ``loss_rank_{r}`` and ``s_rank_{r}`` and saves NSN checkpoints (``nsn_config.json`` holds
    the trained ranks and learned ``s_k``). ``teacher``: an optional frozen model whose outputs the
    ranks are distilled towards (e.g. the original dense model). ``log_variance_lr``: the learning
    rate of ``s_k``, which must track ``log L_k`` much faster than the weights move.
    ``forward_fn(model, batch) -> (task loss or None, output)``: what is compared (default
    ``hf_forward``: logits, or pooled embeddings; ``hidden_states_forward``: every layer's states).
    """

    def __init__(self, *args, objective: MultiRankObjective, teacher=None, log_variance_lr: float = 2e-2,
                 forward_fn: Callable = hf_forward, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_fn = forward_fn
        self.objective = objective.to(self.args.device)
        self.log_variance_lr = log_variance_lr
        self.teacher = teacher.to(self.args.device).eval() if teacher is not None else None
        self._rank_logs: dict[str, list[float]] = {}
        self._gradient_step = -1  # the optimiser step the objective's gradients belong to

    def create_optimizer(self):
        optimizer = super().create_optimizer()
        # The learned log-variances s_k are trained with the model and never decayed.
        params = list(self.objective.parameters())
        already = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in already for p in params):
            optimizer.add_param_group({"params": params, "weight_decay": 0.0, "lr": self.log_variance_lr})
        return optimizer

    def training_step(self, *args, **kwargs):
        # Trainer clears only the model's gradients after each optimiser step: clear the s_k's at
        # the first micro-batch of a step, or they would accumulate over the whole run.
        if self._gradient_step != self.state.global_step:
            self.objective.zero_grad(set_to_none=True)
            self._gradient_step = self.state.global_step
        loss = super().training_step(*args, **kwargs)
        # DDP averages the model's gradients, not the objective's: do the same for the s_k, so
        # every process takes the same optimiser step (every process sampled the same ranks).
        for parameter in self.objective.parameters():
            if parameter.grad is not None:
                mean_over_processes(parameter.grad)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        max_steps = max(1, self.state.max_steps)
        progress = self.state.global_step / max_steps
        teacher_output = None
        if self.teacher is not None:
            # full precision even under bf16 autocast: the targets are exact, only the student is rounded
            with torch.no_grad(), torch.autocast(self.args.device.type, enabled=False):
                teacher_output = self.forward_fn(self.teacher, inputs)[1]
        loss, per_rank = self.objective(model, self.forward_fn, inputs, progress, teacher_output)
        for rank_value, value in per_rank.items():
            self._rank_logs.setdefault(f"loss_rank_{rank_value}", []).append(float(value.detach()))
        if return_outputs:
            return loss, None
        return loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:
            for key, values in self._rank_logs.items():
                logs[key] = round(sum(values) / len(values), 4)
            for rank_value, s in self.objective.learned_log_variances().items():
                logs[f"s_rank_{rank_value}"] = round(s, 4)
            self._rank_logs.clear()
        super().log(logs, *args, **kwargs)

    def sync_nsn_config(self):
        """Copy the trained ranks and learned ``s_k`` into ``model.nsn_config``."""
        config = self.model.nsn_config
        config.trained_ranks = sorted(set(config.trained_ranks) | self.objective.trained_ranks)
        config.log_variances = {**config.log_variances, **self.objective.learned_log_variances()}

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        self.sync_nsn_config()
        write_checkpoint(self.model, output_dir, tokenizer=self.processing_class)


def train_nsn(model, dataset, tokenizer, output_dir: str, objective: MultiRankObjective, steps: int = 100,
              batch_size: int = 8, learning_rate: float = 5e-5, teacher=None, collator=None,
              log_every: int = 10, show_progress: bool = True, forward_fn: Callable = hf_forward,
              lr_schedule: str = "constant_with_warmup", device: str | None = None, bf16: bool = False,
              group_by_length: bool = False) -> NSNTrainer:
    """Train ``model`` with ``objective`` for ``steps`` optimiser steps on ``device`` ("cpu", "cuda";
    default: the visible GPUs, else the CPU), under bf16 autocast when ``bf16`` (``lr_schedule``: a
    ``transformers`` scheduler name, after a warm-up of ``min(10, steps/10)``). ``group_by_length``:
    batches of examples of similar length (less padding; still a random order of batches)."""
    from .data import collate

    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; install a CUDA build of torch or "
                         "train on the CPU")
    on_gpu = torch.cuda.is_available() if device is None else device == "cuda"

    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, logging_steps=log_every, save_strategy="no", report_to=[],
        disable_tqdm=not show_progress, lr_scheduler_type=lr_schedule,
        warmup_steps=min(10, steps // 10), remove_unused_columns=False,
        dataloader_pin_memory=on_gpu, use_cpu=not on_gpu, bf16=bf16, group_by_length=group_by_length,
    )
    trainer = NSNTrainer(model=model, args=args, train_dataset=dataset,
                         data_collator=collator or collate(tokenizer), objective=objective,
                         teacher=teacher, processing_class=tokenizer, forward_fn=forward_fn)
    model.train()
    trainer.train()
    model.eval()
    trainer.sync_nsn_config()
    return trainer
