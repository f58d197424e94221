"""Our benchmarks on exports, as ONNX Runtime serves them: NSN exports (fp32, int8, or both) at
chosen ranks on their materialised levels, beside the dense model's Optimum export.

    python scripts/eval_exports.py --dense runs/smollm2-dense-onnx \
        --export runs/smollm2-nsn-onnx --export runs/smollm2-int8 --ranks 127,576

Decoders (``calibration.llm``): perplexity on held-out package docstrings (never trained on),
greedy next-token agreement with the dense model, and manual page -> command multiple choice
(chance 0.25). Encoders: the cosine of each sentence embedding to the dense export's, on the
built-in English sentences, and retrieval top-1 (docstring sentence -> the qualified name it
documents; ``calibration.retrieval``). Torch-free: it runs where nsn-serve runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def evaluate(dense_dir: Path, export_dirs: list[Path], ranks: list[int], threads: int | None = None,
             sequences: int = 16, choices: int = 100, progress=lambda message: None) -> list[dict]:
    """One row for the dense model, then one per export and rank."""
    from deploy import NSNSession
    from deploy.external_data import model_file
    from deploy.metadata import validate_rank

    sessions = [NSNSession(path, intra_op_threads=threads) for path in export_dirs]
    if any(session.tokenizer is None for session in sessions):
        raise SystemExit("an export has no tokenizer.json: the benchmarks are text")
    decoder = sessions[0].info.task == "text-generation"
    dense_score, score = (llm_scores if decoder else encoder_scores)(model_file(dense_dir), sessions[0], threads,
                                                                       sequences, choices, progress)
    rows = [{"model": "dense", "weights": "fp32", "rank": None, **dense_score}]
    for path, session in zip(export_dirs, sessions):
        for rank in ranks:
            session.rank = validate_rank(rank, session.info.max_rank, "--ranks")
            session.prepare(rank, wait=True)
            progress(f"{path} ({session.info.weights}) at rank {rank}")
            rows.append({"model": str(path), "weights": session.info.weights, "rank": rank,
                         "flops_fraction": round(session.info.flops_fraction(rank), 4), **score(session)})
    return rows


def llm_scores(dense_path: Path, like, threads, sequences: int, choices: int, progress):
    """The dense model's scores, and a function that scores a session against it."""
    from calibration.llm import LLMBenchmarks, MC_CHANCE, PlainDecoder, onnx_scorer

    bench = LLMBenchmarks.build(lambda text: like.tokenizer.encode(text, add_special_tokens=False).ids, sequences,
                                choices=choices)
    progress(f"{len(bench.sequences)} held-out sequences, {len(bench.items)} multiple-choice items "
             f"(chance {MC_CHANCE})")
    scores, reference = bench.score(onnx_scorer(PlainDecoder(dense_path, threads)))
    return scores, lambda session: bench.score(onnx_scorer(session), reference)[0]


def encoder_scores(dense_path: Path, like, threads, sequences: int, choices: int, progress):
    """Cosine to the dense export's embeddings and retrieval top-1, for the dense model and a session."""
    import numpy as np

    from calibration.retrieval import cosine_to, dense_embedder, docstring_pairs, top1_accuracy
    from deploy.text import english_sentences

    texts, pairs = english_sentences(64), docstring_pairs()
    dense = dense_embedder(dense_path, like)
    reference = dense(texts)
    progress(f"{len(texts)} sentences for the cosine, {len(pairs)} retrieval pairs")

    def batched(embed):
        return lambda batch: np.concatenate([embed(batch[i:i + 64]) for i in range(0, len(batch), 64)])

    return ({"cosine_to_dense": 1.0, "retrieval_top1": round(top1_accuracy(batched(dense), pairs), 3)},
            lambda session: {"cosine_to_dense": cosine_to(session.embed(texts, normalize=False), reference),
                             "retrieval_top1": round(top1_accuracy(session.embed, pairs), 3)})


def markdown(rows: list[dict]) -> str:
    if "cosine_to_dense" in rows[0]:
        lines = ["| model | weights | rank | cosine to dense | retrieval top-1 |", "|---|---|---:|---:|---:|"]
        lines += [f"| {Path(row['model']).name} | {row['weights']} | {row['rank'] or '—'} | {row['cosine_to_dense']:.4f} "
                  f"| {row['retrieval_top1']:.3f} |" for row in rows]
        return "\n".join(lines)
    lines = ["| model | weights | rank | perplexity | agreement with dense | multiple choice |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        choice = "—" if row["choice_accuracy"] is None else f"{row['choice_accuracy']:.2f}"
        lines.append(f"| {Path(row['model']).name} | {row['weights']} | {row['rank'] or '—'} | {row['perplexity']:.1f} | "
                     f"{row['agreement']:.3f} | {choice} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", type=Path, required=True, help="the dense model's Optimum export")
    parser.add_argument("--export", type=Path, action="append", required=True, help="an NSN export (repeatable)")
    parser.add_argument("--ranks", default="127,576", help="comma-separated ranks")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sequences", type=int, default=16, help="held-out sequences of 128 tokens")
    parser.add_argument("--choices", type=int, default=100, help="multiple-choice items")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        ranks = [int(part) for part in args.ranks.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--ranks {args.ranks!r}: give comma-separated integers, e.g. 127,576")
    rows = evaluate(args.dense, args.export, ranks, args.threads, args.sequences, args.choices,
                    progress=lambda message: print(message, file=sys.stderr))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
