"""Five fixed chat prompts answered greedily at several ranks of an NSN export (ONNX Runtime) and by
the dense model's Optimum export, printed as they came (a markdown table, and JSON with --json).

    python scripts/chat_at_ranks.py runs/quickstart-llm/smollm2-nsn-onnx \
        --dense runs/quickstart-llm/smollm2-dense-onnx --ranks 127,256,375,576
"""

from __future__ import annotations

import argparse
import json

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "What is 12 times 7?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="an nsn-export directory of a chat model")
    parser.add_argument("--dense", default=None, help="the dense model's Optimum export (a column of its answers)")
    parser.add_argument("--ranks", default="127,256,375,576")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the answers here")
    args = parser.parse_args()

    from calibration.llm import PlainDecoder
    from deploy import NSNSession
    from deploy.cli import chat_prompt_ids

    session = NSNSession(args.export, intra_op_threads=args.threads)
    dense = PlainDecoder(f"{args.dense}/model.onnx", args.threads) if args.dense else None
    ranks = [int(r) for r in args.ranks.split(",")]

    answers = []
    for prompt in PROMPTS:
        ids = chat_prompt_ids(session, prompt)
        row = {"prompt": prompt}
        if dense is not None:
            tokens = dense.generate(ids, args.max_new_tokens, session.stop_ids)[0]
            row["dense"] = {"text": session.reply_text(tokens), "tokens": tokens}
        for rank in ranks:
            session.rank = rank
            tokens = session.generate(ids, max_new_tokens=args.max_new_tokens).token_ids
            row[str(rank)] = {"text": session.reply_text(tokens), "tokens": tokens}
        answers.append(row)
    columns = (["dense"] if dense is not None else []) + [str(r) for r in ranks]
    print("| prompt | " + " | ".join(f"rank {c}" if c != "dense" else "dense" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in answers:
        cells = [row[c]["text"].replace("\n", " ⏎ ").replace("|", "\\|") for c in columns]
        print(f"| {row['prompt']} | " + " | ".join(cells) + " |")
    if dense is not None:
        for c in columns[1:]:
            same = sum(row[c]["tokens"] == row["dense"]["tokens"] for row in answers)
            print(f"rank {c}: {same} of {len(answers)} answers token-identical to the dense model's")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(answers, handle, indent=1)


if __name__ == "__main__":
    main()
