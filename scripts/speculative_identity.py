"""Check on a real export that self-speculative decoding gives the target rank's own greedy tokens:
for each (draft rank, target rank) pair, a few hundred tokens plain and drafted (speculation
forced on), compared token for token, with the acceptance of each pair.

    python scripts/speculative_identity.py EXPORT_DIR [--pairs 1:576,127:576,575:576] [--tokens 300]
        [--threads 2] [--output runs/speculative-identity.json]

Torch-free (ONNX Runtime). The test suite checks every pair of ranks on tiny decoders; this runs the
same check where it matters, on the model you ship. Exit status 1 if any pair differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.atomic import atomic_file, check_output_files  # noqa: E402

PROMPTS = ["Write a short note to a friend about a walk in the rain.",
           "Explain in two sentences why the sky is blue."]


def parse_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        draft, _, target = item.partition(":")
        if not (draft.strip().isdigit() and target.strip().isdigit()) or int(draft) >= int(target):
            raise SystemExit(f"--pairs: {item!r} is not DRAFT:TARGET with DRAFT < TARGET (e.g. 127:576)")
        pairs.append((int(draft), int(target)))
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--pairs", default="1:576,127:576,232:576,575:576,38:179,127:179")
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path("runs/speculative-identity.json"))
    args = parser.parse_args(argv)
    check_output_files({"--output": args.output}, [args.export_dir])

    from deploy import NSNSession
    from deploy.speculative import Speculation

    session = NSNSession(args.export_dir, intra_op_threads=args.threads)
    rows, failed = [], False
    for draft, target in parse_pairs(args.pairs):
        if target > session.info.max_rank:
            raise SystemExit(f"--pairs: rank {target} is above the model's maximum rank {session.info.max_rank}")
        session.set_rank(target)
        session.prepare(target, wait=True)
        session.prepare_draft(draft, wait=True)
        for prompt in PROMPTS:
            ids = session.encode_prompt(prompt)
            start = time.perf_counter()
            plain = session.generate(ids, max_new_tokens=args.tokens, stop_ids=set()).token_ids
            speculation = Speculation(draft, 4, auto_off=False)
            drafted = session.generate(ids, max_new_tokens=args.tokens, stop_ids=set(), speculative=speculation)
            same = drafted.token_ids == plain
            failed |= not same
            first = next((i for i, (a, b) in enumerate(zip(plain, drafted.token_ids)) if a != b), None)
            rows.append({"draft_rank": draft, "target_rank": target, "prompt": prompt, "tokens": len(plain),
                         "identical": same, "first_difference": first, "drafted": speculation.drafted,
                         "accepted": speculation.accepted, "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {"export": str(args.export_dir), "tokens": args.tokens, "rows": rows,
              "all_identical": not failed}
    atomic_file(args.output, json.dumps(report, indent=1) + "\n")
    print(f"{sum(r['identical'] for r in rows)} of {len(rows)} runs identical ({args.tokens} greedy tokens each); "
          f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
