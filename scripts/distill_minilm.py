"""Make the low ranks of the real all-MiniLM-L6-v2 good: data-aware initialisation, then
multi-rank distillation towards the dense model, measured at each stage.

Adapts every linear layer at full rank (R_l = min(d_in, d_out): exact at the top rank) three times —
plain SVD; data-aware, whitened by the input statistics of the training text; and two-sided
("fisher": whitened inputs, outputs weighed by the distillation loss's sampled Gauss-Newton matrix)
— then trains the chosen start's ranks jointly with the paper's objective (anchor + sampled lower
ranks, uncertainty weights ``s_k``, curriculum) towards the dense model's sentence embeddings.
Reports per rank: FLOPs fraction, cosine to the dense embeddings on held-out sentences, and top-1 on
both retrieval benchmarks (whose queries are excluded from the training and calibration text), for
every start and after training.

Where the CPU time goes: batches of sentences of similar length (less padding) and the word
embeddings frozen (their dense gradient and Adam update over 30522 x 384 weights cost a fifth of a
step); on a GPU, bf16 autocast of the student (the teacher's targets stay float32). The dense
teacher's targets are computed once per sentence, as each step needs them: the run sees each
sentence at most once, so a precomputed cache would compute the same number.

Training text: the standard library's docstring sentences and those of the installed packages of
the export extra (``calibration.corpus``: numpy, torch, transformers, ...; 5 % of them held out by
hash), without any evaluated sentence. Two retrieval benchmarks: the docstring one (in-domain) and
Debian's manual pages, NAME description -> command (out of domain: no manual page is trained on).

    python scripts/distill_minilm.py [--steps 3800] [--output runs/minilm-nsn] [--json results.json]
    python scripts/distill_minilm.py --quick      # a smoke run of the whole path, about 30 s
    python scripts/distill_minilm.py --device cuda   # a GPU: bf16 autocast, batch 64, 20,000 steps (not run
                                                     # here; expected 10-20 min, see the README)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time

import torch

import nsn_export as nsn
from calibration.corpus import CORPUS_PACKAGES, is_held_out, manpage_pairs, package_sentences
from calibration.retrieval import docstring_pairs, top1_accuracy, unseen_sentences
from deploy.atomic import atomic_file
from nsn_export.cli import format_table, phase
from nsn_export.data import TokenizedDataset, english_sentences, make_batches
from nsn_export.evaluate import embedder, evaluate_ranks, outputs_at
from nsn_export.models import default_model_dir, load_hf_model, load_tokenizer
from nsn_export.outputs import hf_forward, hidden_states_forward
from nsn_export.trainer import train_nsn

REPORT_RANKS = "24,48,96,128,192,288,384"  # 128 is the rank closest to half the dense FLOPs
TRAIN_RANKS = "16,24,48,72,96,128,160,192,256"
TARGETS = {"hidden-states": hidden_states_forward, "embedding": hf_forward}
QUICK = {"steps": 2, "batch_size": 4, "held_out": 8, "train_sentences": 32, "calibration_tokens": 1024,
         "retrieval_items": 24, "ranks": "48,384", "corpus_packages": "click", "bf16": "on"}
CPU = {"steps": 3800, "batch_size": 8}
GPU = {"steps": 20000, "batch_size": 64}  # --device cuda (with bf16): not run here (no GPU)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimiser steps [default: {CPU['steps']}; --device cuda: {GPU['steps']}]")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"sentences per step [default: {CPU['batch_size']} (8 beats 32 at the same compute: more, "
                             f"noisier steps); --device cuda: {GPU['batch_size']}]")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (linear decay to 0)")
    parser.add_argument("--target", choices=sorted(TARGETS), default="embedding",
                        help="what the ranks are distilled towards: every layer's token states, or the sentence embedding")
    parser.add_argument("--ranks-per-step", type=int, default=2, help="lower ranks sampled per step, besides the anchor")
    parser.add_argument("--train-ranks", default=TRAIN_RANKS, help="lower ranks the curriculum samples")
    parser.add_argument("--max-length", type=int, default=40,
                        help="training tokens per sentence (docstring sentences rarely need more; 64 costs 1.5x)")
    parser.add_argument("--held-out", type=int, default=256, help="sentences kept for the cosine evaluation")
    parser.add_argument("--train-sentences", type=int, default=None, help="limit the training sentences")
    parser.add_argument("--calibration-tokens", type=int, default=32768,
                        help="tokens for the data-aware statistics (16384: cosine 0.806 at rank 128 from the fisher "
                             "start, 32768: 0.819, 65536: 0.824 in 2 min)")
    parser.add_argument("--init", choices=["fisher", "whitened"], default="fisher",
                        help="the start that is trained: two-sided (inputs and output gradients) or inputs only")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="train the word embeddings too (default: frozen; training them costs a fifth more per CPU step)")
    parser.add_argument("--retrieval-items", type=int, default=None, help="limit the retrieval benchmark's items")
    parser.add_argument("--ranks", default=REPORT_RANKS, help="ranks to report")
    parser.add_argument("--corpus-packages", default=",".join(CORPUS_PACKAGES),
                        help="installed packages whose docstrings are training text (empty: the standard library only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 autocast and larger steps (see --steps, --batch-size)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 autocast of the student (auto: on a GPU only; on a CPU with native bf16 it saved 7 %% "
                             "of a step, but the full rank's start then sits 0.008 in cosine from the dense model)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--output", default=None, help="save the trained NSN checkpoint here")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = parser.parse_args()
    for key, value in (GPU if args.device == "cuda" else CPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.bf16 = args.bf16 == "on" or (args.bf16 == "auto" and args.device == "cuda")
    return args


def measure(model, ranks, eval_batches, dense, tokenizer, pairs, man_pairs) -> list[dict]:
    """Per rank: FLOPs fraction, cosine to the dense embeddings, retrieval top-1 in domain (docstrings)
    and out of domain (manual pages)."""
    rows = evaluate_ranks(model, eval_batches, ranks, reference=dense)
    for row in rows:
        embed = embedder(model, tokenizer, row["rank"], 64, 64)
        row["top1"] = round(top1_accuracy(embed, pairs), 4)
        row["top1_man"] = round(top1_accuracy(embed, man_pairs), 4) if man_pairs else None
    return rows


def training_text(held_out: list[str], all_pairs, man_pairs, packages: list[str], count: int | None) -> list[str]:
    """The standard library's unseen sentences and the packages' training split, without any
    evaluated sentence, in a fixed shuffled order (calibration draws its first batches from it)."""
    excluded = set(held_out) | {q for q, _ in all_pairs} | {q for q, _ in man_pairs}
    text = unseen_sentences(held_out, pairs=all_pairs)
    seen = set(text)
    text += [s for s in package_sentences(packages, excluded) if not is_held_out(s) and s not in seen]
    random.Random(0).shuffle(text)
    return text[:count]


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    source = default_model_dir()
    tokenizer = load_tokenizer(source)
    teacher = load_hf_model(source)
    all_pairs = docstring_pairs()
    pairs = all_pairs[: args.retrieval_items]
    queries = {query for query, _ in all_pairs}
    held_out = [s for s in english_sentences() if s not in queries][: args.held_out]
    man_pairs = manpage_pairs()[: args.retrieval_items]
    packages = [p for p in args.corpus_packages.split(",") if p]
    train_text = training_text(held_out, all_pairs, man_pairs, packages, args.train_sentences)
    ranks = [int(r) for r in args.ranks.split(",")]
    log(f"{len(train_text)} training sentences (standard library and {len(packages)} packages' docstrings), "
        f"{len(held_out)} held out, {len(pairs)} docstring and {len(man_pairs)} manual-page retrieval items (no "
        f"held-out sentence or retrieval query among the training sentences)")
    eval_batches = make_batches([{"text": t} for t in held_out], tokenizer, False, 32, 64)
    dense = outputs_at(teacher, eval_batches, None)[1]
    dense_embed = embedder(teacher, tokenizer, None, 64, 64)
    dense_top1 = round(top1_accuracy(dense_embed, pairs), 4)
    dense_top1_man = round(top1_accuracy(dense_embed, man_pairs), 4) if man_pairs else None

    plain = copy.deepcopy(teacher)
    nsn.adapt(plain, "all-linear", max_rank=1.0)
    before = measure(plain, ranks, eval_batches, dense, tokenizer, pairs, man_pairs)
    del plain

    calibration = make_batches([{"text": t} for t in train_text], tokenizer, False, 16, 64)
    starts, init_seconds = {}, {}
    from tqdm import tqdm

    for init in ("whitened", "fisher"):
        model = copy.deepcopy(teacher)
        start = time.perf_counter()
        with tqdm(file=sys.stderr) as bar:
            nsn.adapt(model, "all-linear", max_rank=1.0, calibration=calibration,
                      calibration_tokens=args.calibration_tokens, fisher=init == "fisher",
                      calibration_progress=phase(bar, "collecting input statistics", "batch"),
                      fisher_progress=phase(bar, "collecting output gradients", "batch"),
                      progress=phase(bar, f"factorising ({init})", "layer"))
        init_seconds[init] = round(time.perf_counter() - start, 1)
        starts[init] = measure(model, ranks, eval_batches, dense, tokenizer, pairs, man_pairs)
        if init == args.init:
            student = model
    log(f"bf16 autocast: {'on' if args.bf16 else 'off'}; word embeddings: "
        f"{'trained' if args.train_embeddings else 'frozen'}; start: {args.init}")

    for module in student.modules():  # the student matches the dense model's eval-mode function: no noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if not args.train_embeddings:
        student.get_input_embeddings().requires_grad_(False)
    objective = nsn.MultiRankObjective(nsn.max_rank(student), ranks=[int(r) for r in args.train_ranks.split(",")],
                                       samples_per_step=args.ranks_per_step, schedule="curriculum", distill="cosine")
    dataset = TokenizedDataset([{"text": t} for t in train_text], tokenizer, max_length=args.max_length)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minilm-distill-") as run_dir:
        train_nsn(student, dataset, tokenizer, run_dir, objective, steps=args.steps, batch_size=args.batch_size,
                  learning_rate=args.lr, teacher=teacher, log_every=max(1, args.steps // 12),
                  forward_fn=TARGETS[args.target], lr_schedule="linear", device=args.device, bf16=args.bf16,
                  group_by_length=True)
    train_minutes = (time.perf_counter() - start) / 60
    trained = measure(student, ranks, eval_batches, dense, tokenizer, pairs, man_pairs)

    stages = {"svd": before, "data_aware": starts["whitened"], "fisher": starts["fisher"], "trained": trained}
    rows = [{"rank": row["rank"], "flops_fraction": row["flops_fraction"]} for row in before]
    for metric, key in (("cosine", "cosine"), ("top1", "top1"), ("man_top1", "top1_man")):
        for stage, measured in stages.items():
            for row, value in zip(rows, measured):
                row[f"{metric}_{stage}"] = value[key]
    s_k = {r: round(s, 3) for r, s in objective.learned_log_variances().items()}
    print(f"data-aware initialisation ({student.nsn_config.calibration_tokens} tokens): whitened "
          f"{init_seconds['whitened']:.0f} s, fisher {init_seconds['fisher']:.0f} s; trained from {args.init}: "
          f"{args.steps} steps of {args.batch_size} in {train_minutes:.1f} min (bf16 {'on' if args.bf16 else 'off'})")
    print(f"learned s_k (rank: s): {s_k}")
    print(f"steps each lower rank was trained: {objective.sample_counts}")
    print(f"dense model: retrieval top1 {dense_top1} on {len(pairs)} docstring items, {dense_top1_man} on "
          f"{len(man_pairs)} manual-page items")
    print(format_table(rows))
    if args.json_path:
        results = {"dense_top1": dense_top1, "retrieval_items": len(pairs), "dense_top1_man": dense_top1_man,
                   "man_items": len(man_pairs), "train_sentences": len(train_text), "device": args.device,
                   "bf16": args.bf16, "steps": args.steps, "init": args.init,
                   "train_embeddings": args.train_embeddings,
                   "batch_size": args.batch_size, "learning_rate": args.lr, "init_seconds": init_seconds,
                   "train_minutes": round(train_minutes, 2), "target": args.target, "calibration_tokens": student.nsn_config.calibration_tokens,
                   "s_k": s_k, "sample_counts": objective.sample_counts, "rows": rows}
        atomic_file(args.json_path, json.dumps(results, indent=1) + "\n")
    if args.output:
        nsn.save_nsn(student, args.output, tokenizer=tokenizer)
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
