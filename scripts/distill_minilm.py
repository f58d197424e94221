"""Multi-rank distillation of the real all-MiniLM-L6-v2 weights, a few CPU minutes.

Adapts every linear layer at full rank (R_l = min(d_in, d_out): exact at the top rank), measures
each rank's sentence-embedding fidelity to the dense model (cosine similarity, held-out English
sentences from Python's own documentation), trains all ranks jointly towards the dense model's
embeddings with the paper's objective, and measures again.

    python scripts/distill_minilm.py [--steps 150] [--output runs/minilm-nsn]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import nsn_export as nsn
from nsn_export.cli import format_table
from nsn_export.data import TokenizedDataset, english_sentences, make_batches
from nsn_export.evaluate import evaluate_ranks, outputs_at
from nsn_export.models import default_model_dir, load_hf_model, load_tokenizer
from nsn_export.trainer import train_nsn

RANKS = (24, 48, 96, 192, 288, 384)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--ranks-per-step", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=256, help="sentences kept for evaluation")
    parser.add_argument("--train-sentences", type=int, default=None, help="limit the training sentences")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="ranks to report")
    parser.add_argument("--output", default=None, help="save the trained NSN checkpoint here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    source = default_model_dir()
    tokenizer = load_tokenizer(source)
    teacher = load_hf_model(source)
    student = copy.deepcopy(teacher)
    nsn.adapt(student, "all-linear", max_rank=1.0)

    sentences = english_sentences()
    held_out, train_text = sentences[: args.held_out], sentences[args.held_out:][: args.train_sentences]
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"{len(train_text)} training sentences, {len(held_out)} held out (Python standard library docs)")
    eval_batches = make_batches([{"text": t} for t in held_out], tokenizer, False, 32, 64)
    dense = outputs_at(teacher, eval_batches, None)[1]
    before = evaluate_ranks(student, eval_batches, ranks, reference=dense)

    objective = nsn.MultiRankObjective(nsn.max_rank(student), samples_per_step=args.ranks_per_step,
                                       schedule="curriculum", warmup_fraction=0.3, distill="cosine")
    dataset = TokenizedDataset([{"text": t} for t in train_text], tokenizer, max_length=64)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minilm-distill-") as run_dir:
        train_nsn(student, dataset, tokenizer, run_dir, objective, steps=args.steps, batch_size=args.batch_size,
                  learning_rate=args.lr, teacher=teacher, log_every=25)
    minutes = (time.perf_counter() - start) / 60
    after = evaluate_ranks(student, eval_batches, ranks, reference=dense)

    rows = [{"rank": b["rank"], "flops_fraction": b["flops_fraction"], "cosine_svd": b["cosine"],
             "cosine_trained": a["cosine"]} for b, a in zip(before, after)]
    print(f"\ntrained {args.steps} steps in {minutes:.1f} min; learned s_k: "
          f"{ {r: round(s, 3) for r, s in objective.learned_log_variances().items()} }")
    print(format_table(rows))
    if args.output:
        nsn.save_nsn(student, args.output, tokenizer=tokenizer)
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
