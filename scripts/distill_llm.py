"""Make the low ranks of SmolLM2-135M-Instruct (the built-in chat model) good: a data-aware start,
then multi-rank distillation towards the dense model's next-token distribution, measured at each
stage on LLM benchmarks of our own.

Adapts every linear layer of the 30 blocks at full rank (R_l = min(d_in, d_out): the top rank is the
dense model exactly; it costs 1.39x the dense FLOPs, and the rank whose cost equals dense is about
375) from the two-sided ("fisher") start — inputs whitened, outputs weighed by the softmax Fisher of
the logits — then trains all ranks jointly with the paper's objective (the anchor and sampled lower
ranks, uncertainty weights ``s_k``, a curriculum from high ranks to low) on a KL to the dense
model's logits. The word embeddings (tied to the output layer) stay frozen.

Training text: the corpus's package docstrings (``calibration.corpus``), packed end to end into
sequences of ``--seq-len`` tokens, without the 5 % held out by hash — which is where the perplexity
and agreement benchmarks read. The multiple-choice benchmark reads Debian's manual pages, which no
training text contains. Per rank it reports FLOPs fraction, held-out perplexity, greedy next-token
agreement with the dense model and multiple-choice accuracy (chance 0.25), for the start and after
training, beside the dense model.

    python scripts/distill_llm.py --output runs/smollm2-nsn          # CPU, 2 cores: within 45 minutes
    python scripts/distill_llm.py --quick                             # a smoke run of the whole path
    python scripts/distill_llm.py --device cuda --output runs/smollm2-nsn   # a GPU (not run here)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time

import torch

import nsn_export as nsn
from calibration.corpus import CORPUS_PACKAGES, is_held_out, package_sentences
from calibration.llm import EVAL_PACKAGES, MC_CHANCE, LLMBenchmarks, pack_sentences
from deploy.atomic import atomic_file
from nsn_export.cli import format_table, phase
from nsn_export.evaluate import causal_scorer
from nsn_export.flops import flops_fraction
from nsn_export.importing import builtin_llm_dir
from nsn_export.models import load_hf_model, load_tokenizer
from nsn_export.trainer import train_nsn

REPORT_RANKS = "64,127,192,256,375,576"  # 127: half the dense FLOPs; 375: the dense model's cost
TRAIN_RANKS = "48,64,96,127,160,192,256,320,375,448"
QUICK = {"steps": 2, "batch_size": 2, "seq_len": 32, "train_sequences": 16, "calibration_tokens": 256,
         "eval_sequences": 2, "eval_len": 32, "choices": 8, "ranks": "127,576", "corpus_packages": "click"}
CPU = {"steps": 260, "batch_size": 4}  # 8.2 s a step on 2 cores: 36 minutes, 45 with the benchmarks
GPU = {"steps": 6000, "batch_size": 16}  # --device cuda with bf16: not run here (no GPU)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Hugging Face causal LM directory [default: the built-in "
                                                       "SmolLM2-135M-Instruct, imported from its GGUF once]")
    parser.add_argument("--steps", type=int, default=None, help=f"optimiser steps [default: {CPU['steps']}; "
                                                                f"--device cuda: {GPU['steps']}]")
    parser.add_argument("--batch-size", type=int, default=None, help=f"sequences per step [default: "
                                                                     f"{CPU['batch_size']}; cuda: {GPU['batch_size']}]")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed training sequence")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (linear decay to 0)")
    parser.add_argument("--ranks-per-step", type=int, default=1, help="lower ranks sampled per step, besides the anchor")
    parser.add_argument("--train-ranks", default=TRAIN_RANKS, help="lower ranks the curriculum samples")
    parser.add_argument("--train-sequences", type=int, default=None,
                        help="training sequences [default: steps x batch size: each is seen once]")
    parser.add_argument("--calibration-tokens", type=int, default=8192, help="tokens for the data-aware statistics")
    parser.add_argument("--init", choices=["fisher", "whitened"], default="fisher")
    parser.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences for perplexity/agreement")
    parser.add_argument("--eval-len", type=int, default=128, help="tokens per held-out sequence")
    parser.add_argument("--choices", type=int, default=100, help="multiple-choice items (manual pages)")
    parser.add_argument("--ranks", default=REPORT_RANKS, help="ranks to report")
    parser.add_argument("--corpus-packages", default=",".join(CORPUS_PACKAGES),
                        help="installed packages whose docstrings are training text")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--output", default=None, help="save the trained NSN checkpoint here")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:  # the smoke run's sizes, where the command line does not say otherwise
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    for key, value in (GPU if args.device == "cuda" else CPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def measure(model, ranks, bench: LLMBenchmarks, dense_tokens) -> list[dict]:
    """Per rank: FLOPs fraction, held-out perplexity, agreement with the dense model's greedy tokens,
    multiple-choice accuracy."""
    return [{"rank": rank, "flops_fraction": round(flops_fraction(model, rank), 4),
             **bench.score(causal_scorer(model, rank), dense_tokens)[0]} for rank in ranks]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()

    source = args.model or builtin_llm_dir(progress=log)
    tokenizer = load_tokenizer(source)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    teacher = load_hf_model(source)
    packages = [p for p in args.corpus_packages.split(",") if p]
    eval_packages = [p for p in EVAL_PACKAGES if p in packages] or packages
    bench = LLMBenchmarks.build(encode, args.eval_sequences, args.eval_len, args.choices, eval_packages)
    sentences = [s for s in package_sentences(packages) if not is_held_out(s)]
    sentences.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())  # a fixed, shuffled order
    train = pack_sentences(sentences, encode, args.seq_len, args.train_sequences or args.steps * args.batch_size)
    log(f"{len(train)} training sequences of {args.seq_len} tokens ({len(packages)} packages' docstrings, the "
        f"held-out 5 % left out); benchmarks: {len(bench.sequences)} held-out sequences of {args.eval_len} tokens, "
        f"{len(bench.items)} manual-page items (chance {MC_CHANCE})")

    dense_scores, dense_tokens = bench.score(causal_scorer(teacher, None))
    dense_row = {"rank": "dense", "flops_fraction": 1.0, **dense_scores}
    ranks = [int(r) for r in args.ranks.split(",")]

    from tqdm import tqdm

    from nsn_export.data import collate

    calibration_batches = [collate(tokenizer)(train[i:i + 8]) for i in range(0, min(len(train), 64), 8)]
    student = copy.deepcopy(teacher)
    init_start = time.perf_counter()
    with tqdm(file=sys.stderr) as bar:
        nsn.adapt(student, "all-linear", max_rank=1.0, calibration=calibration_batches,
                  calibration_tokens=args.calibration_tokens, fisher=args.init == "fisher",
                  calibration_progress=phase(bar, "collecting input statistics", "batch"),
                  fisher_progress=phase(bar, "collecting output gradients", "batch"),
                  progress=phase(bar, f"factorising ({args.init})", "layer"))
    init_seconds = time.perf_counter() - init_start
    ranks = sorted({min(r, nsn.max_rank(student)) for r in ranks})
    start_rows = measure(student, ranks, bench, dense_tokens)
    log(format_table([dense_row, *start_rows]))

    student.get_input_embeddings().requires_grad_(False)  # tied to the output layer: both stay dense
    train_ranks = [r for r in (int(x) for x in args.train_ranks.split(",")) if r < nsn.max_rank(student)]
    objective = nsn.MultiRankObjective(nsn.max_rank(student), ranks=train_ranks, samples_per_step=args.ranks_per_step,
                                       schedule="curriculum", distill="kl")
    train_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llm-distill-") as run_dir:
        train_nsn(student, train, tokenizer, run_dir, objective, steps=args.steps, batch_size=args.batch_size,
                  learning_rate=args.lr, teacher=teacher, log_every=max(1, args.steps // 12), lr_schedule="linear",
                  device=args.device, bf16=args.device == "cuda")
    train_minutes = (time.perf_counter() - train_start) / 60
    student.to("cpu")
    trained_rows = measure(student, ranks, bench, dense_tokens)

    rows = [dense_row]
    for start_row, trained_row in zip(start_rows, trained_rows):
        rows.append({"rank": start_row["rank"], "flops_fraction": start_row["flops_fraction"],
                     **{f"{k}_{stage}": row[k] for k in ("perplexity", "agreement", "choice_accuracy")
                        for stage, row in (("start", start_row), ("trained", trained_row))}})
    total_minutes = (time.perf_counter() - started) / 60
    print(f"{args.init} start ({student.nsn_config.calibration_tokens} tokens) in {init_seconds:.0f} s; trained "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens in {train_minutes:.1f} min on {args.device}; "
          f"{total_minutes:.1f} min in all")
    print(f"learned s_k (rank: s): { {r: round(s, 3) for r, s in objective.learned_log_variances().items()} }")
    print(format_table(rows))
    if args.json_path:
        atomic_file(args.json_path, json.dumps({
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "init": args.init,
            "device": args.device, "init_seconds": round(init_seconds, 1), "train_minutes": round(train_minutes, 2),
            "total_minutes": round(total_minutes, 2), "train_sequences": len(train),
            "eval_sequences": len(bench.sequences), "choice_items": len(bench.items), "choice_chance": MC_CHANCE,
            "dense": dense_row, "start": start_rows, "trained": trained_rows}, indent=1) + "\n")
    if args.output:
        nsn.save_nsn(student, args.output, tokenizer=tokenizer)
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
