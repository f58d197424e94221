"""Train a tiny NSN encoder with ``train_nsn`` and write what it learned; run by
``test_distributed.py`` as one process and under ``torchrun --nproc_per_node 2``.

    distributed_train.py OUTPUT_DIR PER_DEVICE_BATCH STEPS

Writes ``weights-{process}.safetensors`` and ``objective-{process}.json`` (s_k, sample counts,
world size) for every process.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nsn_export as nsn  # noqa: E402
from nsn_export.data import TokenizedDataset  # noqa: E402
from nsn_export.trainer import train_nsn  # noqa: E402
from tiny import tiny_model, tiny_text, tiny_tokenizer  # noqa: E402

EXAMPLES = 8  # = the global batch: every step sees every example, whatever the sampler's order


def dense_teacher():
    teacher = tiny_model("bert")
    for module in teacher.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # dropout draws differ per process; the comparison needs none
    return teacher


def untrained_student(teacher=None):
    student = copy.deepcopy(teacher or dense_teacher())
    nsn.adapt(student, "all-linear", max_rank=16)
    return student


def main(output: Path, per_device_batch: int, steps: int) -> None:
    teacher = dense_teacher()
    student = untrained_student(teacher)
    tokenizer = tiny_tokenizer()
    # Equal lengths: no padding, so each process's mean loss is the mean over an equal share.
    dataset = TokenizedDataset([{"text": t} for t in tiny_text(EXAMPLES, length=12)], tokenizer, max_length=16)
    objective = nsn.MultiRankObjective(16, ranks=[2, 4, 8, 12], samples_per_step=2, schedule="curriculum",
                                       distill="cosine")
    trainer = train_nsn(student, dataset, tokenizer, str(output / "run"), objective, steps=steps,
                        batch_size=per_device_batch, learning_rate=1e-2, teacher=teacher, log_every=1,
                        show_progress=False)
    process = trainer.args.process_index
    state = {name: tensor.detach().contiguous() for name, tensor in student.state_dict().items()}
    safetensors.torch.save_file(state, str(output / f"weights-{process}.safetensors"))
    facts = {"s_k": objective.learned_log_variances(), "sample_counts": objective.sample_counts,
             "world_size": trainer.args.world_size, "backend": os.environ.get("NSN_TEST_BACKEND", "")}
    (output / f"objective-{process}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
