"""``nsn-bench --model``: exports of an NSN model (fp32, int8) at each governor level against the
dense model's Optimum export, and against llama.cpp on the same GGUF when a ``llama-bench`` binary
is on PATH.

Everything runs in one process, one run, on the same shapes (batch 1) and thread count: prefill of
``prefill_tokens`` tokens, and one decode step after a ``cache_tokens``-token KV cache (decoders).
Variants at each rank, timed in alternating blocks so drift in a shared machine hits all alike:

- ``dense``: the original model exported by Optimum, what a user deploys without NSN;
- ``<weights> views``: an NSN export on its weight views (every rank from one session, switched
  instantly);
- ``<weights> level``: the same rank on its materialised level (constants; dense products above each
  layer's break-even rank; int8 kernels for an int8 export), what the server runs once the
  governor has held a rank for a few seconds.

llama.cpp is never a dependency: a user who has built it (``cmake``, then ``llama-bench``) gets its
row, and the report says when it was not found.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np

from .bench import copy_bandwidth_gbs, decoder_workload, machine_facts, measure_interleaved, plain_session

SCHEMA = "nsn-bench-compare/1"
LLAMA_BENCH = "llama-bench"


def default_ranks(session) -> list[int]:
    """The governor's default levels on this runtime (its equal-work ladder within the dense cost),
    plus the rank nearest half the dense FLOPs."""
    from deploy.governor.policy import Levels

    ladder = Levels.equal_work(session.default_ceiling()[0], session.level_flops, count=5).ranks
    return sorted(set(ladder) | {session.info.rank_for_budget(0.5)})


def workload(session, prefill_tokens: int, cache_tokens: int, seed: int = 0) -> dict[str, dict]:
    """Feeds per phase: ``prefill`` (and ``decode`` for decoders, ``bench.decoder_workload``) with
    random ids and a random cache."""
    vocab = session.vocab_size or 100
    if session.info.task == "text-generation":
        prefill, decode = decoder_workload(session.session, vocab, prefill_tokens, cache_tokens, seed)
        return {"prefill": prefill, "decode": decode}
    prompt = np.random.default_rng(seed).integers(0, vocab, (1, prefill_tokens)).astype(np.int64)
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt)}
    if "token_type_ids" in session.input_shapes:
        feeds["token_type_ids"] = np.zeros_like(prompt)
    return {"prefill": feeds}


def llama_bench(gguf: Path | None, threads: int, prefill_tokens: int, decode_tokens: int,
                repetitions: int = 5) -> dict:
    """llama.cpp's own benchmark on ``gguf`` (prefill of ``prefill_tokens``, then ``decode_tokens``
    generated), or why it did not run."""
    binary = shutil.which(LLAMA_BENCH)
    if gguf is None:
        return {"ran": False, "why": "no --gguf given"}
    if binary is None:
        return {"ran": False, "why": f"no {LLAMA_BENCH} on PATH (build llama.cpp with cmake to compare with it)"}
    command = [binary, "-m", str(gguf), "-t", str(threads), "-p", str(prefill_tokens), "-n", str(decode_tokens),
               "-r", str(repetitions), "-o", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
        rows = json.loads(done.stdout)
        prefill = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
        decode = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    except (subprocess.SubprocessError, OSError, ValueError, KeyError, StopIteration) as error:
        detail = getattr(error, "stderr", "") or ""
        return {"ran": False, "why": f"{LLAMA_BENCH} failed ({type(error).__name__}: {error}) {detail[-300:]}".strip()}
    return {"ran": True, "binary": binary, "command": " ".join(command), "build": prefill.get("build_commit"),
            "type": prefill.get("model_type"), "prefill_ms": round(prefill_tokens / prefill["avg_ts"] * 1e3, 3),
            "prefill_tokens_per_s": round(prefill["avg_ts"], 2), "decode_tokens_per_s": round(decode["avg_ts"], 2),
            "decode_ms": round(1e3 / decode["avg_ts"], 3)}


def compare_exports(model_dirs: list[Path], dense_dir: Path, ranks: list[int] | None = None, threads: int = 2,
                    prefill_tokens: int = 32, cache_tokens: int = 32, decode_runs: int = 40, prefill_runs: int = 10,
                    warmup: int = 3, gguf: Path | None = None,
                    progress: Callable[[str], None] = lambda m: None) -> dict:
    """The comparison as a JSON-ready report (schema ``nsn-bench-compare/1``). ``model_dirs`` are
    exports of one NSN model (fp32 and int8, say), each timed on its views and its levels; variants
    are named ``"<weights> views"`` and ``"<weights> level"``."""
    from deploy import NSNSession
    from deploy.external_data import model_file

    exports = {}
    for model_dir in model_dirs:
        session = NSNSession(model_dir, intra_op_threads=threads)
        if session.levels is None:
            raise ValueError(f"{model_dir}: this export cannot run on weight views (a mask-mode graph?), so it has no "
                             f"levels to compare; re-export it with --rank-mode slice")
        first = next(iter(exports.values()))[0] if exports else session
        if (session.info.max_rank, session.info.flops_per_rank) != (first.info.max_rank, first.info.flops_per_rank):
            raise ValueError(f"{model_dirs[0]} and {model_dir} are not exports of one model (their ranks or FLOPs "
                             f"differ); give the fp32 and int8 exports of one checkpoint")
        if session.info.weights in exports:
            raise ValueError(f"{model_dir}: two exports with {session.info.weights} weights; give one of each")
        exports[session.info.weights] = (session, NSNSession(model_dir, intra_op_threads=threads, levels=False))
    first = next(iter(exports.values()))[0]
    dense = plain_session(model_file(dense_dir), threads)
    dense_inputs = {i.name for i in dense.get_inputs()}
    info = first.info
    ranks = sorted(set(ranks or default_ranks(first)))
    phases = workload(first, prefill_tokens, cache_tokens)
    bandwidth = copy_bandwidth_gbs()
    progress(f"comparing {', '.join(map(str, model_dirs))} with {dense_dir} at ranks {ranks} ({threads} threads)")
    rows = []
    for rank in ranks:
        row = {"rank": rank, "flops_fraction": round(info.flops_fraction(rank), 4),
               "level_flops_fraction": round(first.level_flops(rank) / info.dense_flops, 4), "levels": {}}
        calls = {}
        for weights, (levels, views) in exports.items():
            views.rank = levels.rank = rank
            level = levels.prepare(rank, wait=True)
            progress(f"rank {rank}, {weights}: level built in {level.build_s:.1f} s ({level.products} of "
                     f"{len(levels.pairs)} layers as products)")
            row["levels"][weights] = {"products": level.products, "layers": len(levels.pairs),
                                      "mib": round(level.constant_bytes / 2**20, 1), "build_s": round(level.build_s, 2),
                                      "max_abs_diff_vs_views": max_difference(views, levels, phases["prefill"])}
            calls[f"{weights} views"], calls[f"{weights} level"] = views.run_raw, levels.run_raw
        for phase, feeds in phases.items():
            dense_feeds = {name: value for name, value in feeds.items() if name in dense_inputs}
            timings = measure_interleaved({"dense": lambda: dense.run(None, dense_feeds),
                                           **{name: functools.partial(call, feeds) for name, call in calls.items()}},
                                          decode_runs if phase == "decode" else prefill_runs, warmup)
            row[phase] = {name: vars(timing) for name, timing in timings.items()}
            row[phase]["vs_dense"] = {name: round(timings[name].median_ms / timings["dense"].median_ms, 3)
                                      for name in calls}
        rows.append(row)
    decoder = info.task == "text-generation"
    report = {
        "schema": SCHEMA, "models": [str(m) for m in model_dirs], "dense": str(dense_dir), "task": info.task,
        "weights": list(exports), "max_rank": info.max_rank,
        "workload": {"batch": 1, "prefill_tokens": prefill_tokens, "cache_tokens": cache_tokens,
                     "decode_runs": decode_runs, "prefill_runs": prefill_runs, "warmup": warmup},
        "machine": machine_facts(threads, bandwidth),
        "rows": rows,
        "llama_cpp": (llama_bench(gguf, threads, prefill_tokens, cache_tokens) if decoder
                      else {"ran": False, "why": "llama.cpp runs decoders"}),
    }
    report["targets"] = targets(report)
    return report


def max_difference(views, levels, feeds: dict) -> float:
    """The largest difference between a level's outputs and its views' (rounding for fp32; the int8
    kernels' activation rounding for int8)."""
    return max(float(np.abs(a - b).max()) for a, b in zip(views.run_raw(feeds), levels.run_raw(feeds)))


def targets(report: dict) -> dict:
    """The issue's targets against this report: no fp32 level slower than dense (1.05x), int8 at
    half the FLOPs at least 2x dense, and at least half as fast as llama.cpp."""
    phase = "decode" if report["task"] == "text-generation" else "prefill"
    checks = {}
    if "fp32" in report["weights"]:
        worst = max(report["rows"], key=lambda row: row[phase]["vs_dense"]["fp32 level"])
        value = worst[phase]["vs_dense"]["fp32 level"]
        checks["fp32_level_vs_dense_max"] = {"value": value, "at_rank": worst["rank"], "phase": phase,
                                             "target": "<= 1.05", "met": value <= 1.05}
    if "int8" in report["weights"]:
        half = ([row for row in report["rows"] if row["flops_fraction"] <= 0.5 + 1e-9] or report["rows"][:1])[-1]
        speedup = round(1 / half[phase]["vs_dense"]["int8 level"], 3)
        checks["int8_level_speedup_vs_dense_at_half_flops"] = {
            "value": speedup, "rank": half["rank"], "phase": phase, "target": ">= 2.0", "met": speedup >= 2.0}
        llama = report["llama_cpp"]
        if llama["ran"]:
            ratio = round(1e3 / half["decode"]["int8 level"]["median_ms"] / llama["decode_tokens_per_s"], 3)
            checks["int8_level_decode_vs_llama_cpp"] = {"value": ratio, "rank": half["rank"], "target": ">= 0.5",
                                                        "met": ratio >= 0.5}
    return checks


def compare_markdown(report: dict) -> str:
    """One table: dense, each export's levels (and views), and llama.cpp, in tokens/s and ms."""
    decoder = report["task"] == "text-generation"
    work = report["workload"]
    prefill = f"prefill of {work['prefill_tokens']} tokens (ms)"
    lines = [f"| runtime | rank | FLOPs vs dense | {'decode tokens/s | decode ms | ' if decoder else ''}{prefill} |",
             "|---|---:|---:|" + ("---:|---:|" if decoder else "") + "---:|"]

    def cells(row: dict, name: str) -> str:
        decode = ""
        if decoder:
            ms = row["decode"][name]["median_ms"]
            decode = f"{1e3 / ms:.1f} | {ms:.2f} | "
        return f"{decode}{row['prefill'][name]['median_ms']:.1f}"

    lines.append(f"| dense fp32 (Optimum export) | — | 1.00 | {cells(report['rows'][0], 'dense')} |")
    for weights in report["weights"]:
        for kind, flops_key in (("level", "level_flops_fraction"), ("views", "flops_fraction")):
            for row in report["rows"]:
                lines.append(f"| NSN {weights}, {kind} | {row['rank']} | {row[flops_key]:.2f} | "
                             f"{cells(row, f'{weights} {kind}')} |")
    llama = report["llama_cpp"]
    if decoder and llama["ran"]:
        lines.append(f"| llama.cpp ({llama['type']}) | — | — | {llama['decode_tokens_per_s']:.1f} | "
                     f"{llama['decode_ms']:.2f} | {llama['prefill_ms']:.1f} |")
    elif decoder:
        lines.append(f"\nllama.cpp: not measured ({llama['why']}).")
    machine = report["machine"]
    lines.append(f"\n{machine['processor']}, {machine['cpu_count']} cores, ONNX Runtime {machine['onnxruntime']} "
                 f"with {machine['intra_op_threads']} threads; batch 1"
                 + (f", decode after a {work['cache_tokens']}-token cache" if decoder else "") + ".")
    return "\n".join(lines)


def compare_summary(report: dict) -> str:
    return "targets: " + ", ".join(f"{name} {check['value']} ({'met' if check['met'] else 'NOT met'})"
                                   for name, check in report["targets"].items())



SPECULATIVE_SCHEMA = "nsn-bench-speculative/1"
SPECULATIVE_PROMPT = "Give me three tips for staying healthy."


def speculative_report(model_dir: Path, draft_rank: int, ranks: list[int] | None = None, threads: int = 2,
                       tokens: int = 64, rounds: int = 3, draft_tokens: int = 4,
                       progress: Callable[[str], None] = lambda m: None) -> dict:
    """Greedy generation with and without self-speculative decoding at each governor level above
    ``draft_rank`` (each on its level, as served), alternating ``rounds`` times: tokens/s of both,
    the acceptance rate, and whether speculation switched itself off. A report of schema
    ``nsn-bench-speculative/1``; the outputs are checked to be the same tokens."""
    import statistics
    import time

    from deploy import NSNSession
    from deploy.speculative import Speculation

    session = NSNSession(model_dir, intra_op_threads=threads)
    if session.info.task != "text-generation":
        raise ValueError(f"{model_dir} is an encoder ({session.info.task}): speculative decoding drafts tokens")
    if session.levels is None:
        raise ValueError(f"{model_dir}: this export cannot run on weight views (a mask-mode graph?); re-export it "
                         f"with --rank-mode slice")
    prompt = session.encode_prompt(SPECULATIVE_PROMPT) if session.tokenizer is not None else list(range(1, 17))
    levels = [rank for rank in sorted(set(ranks or default_ranks(session))) if rank > draft_rank]
    if not levels:
        raise ValueError(f"no rank to verify above the draft rank {draft_rank}; give a lower draft rank or --ranks")
    rows = []
    for rank in levels:
        session.set_rank(rank)
        session.prepare(rank, wait=True)
        session.prepare_draft(draft_rank, wait=True)  # the draft on its own level, as the server runs it
        progress(f"rank {rank}: {tokens} tokens, plain and drafted by rank {draft_rank}, {rounds} rounds")
        speeds: dict[str, list[float]] = {"plain": [], "speculative": [], "speculative, never off": []}
        counts = {}
        reference = None
        for _ in range(rounds):
            for name in speeds:
                speculation = None if name == "plain" else Speculation(draft_rank, draft_tokens,
                                                                       auto_off=name == "speculative")
                start = time.perf_counter()
                result = session.generate(prompt, max_new_tokens=tokens, stop_ids=set(), speculative=speculation)
                speeds[name].append(len(result.token_ids) / (time.perf_counter() - start))
                reference = reference or result.token_ids
                if result.token_ids != reference:  # a broken runtime, not a slow one: say so loudly
                    raise RuntimeError(f"rank {rank}: speculative decoding changed the greedy tokens ({name})")
                if speculation is not None:
                    counts[name] = {"drafted": speculation.drafted, "accepted": speculation.accepted,
                                    "switched_off": speculation.off}
        plain = statistics.median(speeds["plain"])
        rows.append({"rank": rank, "tokens_per_s": {name: round(statistics.median(v), 2) for name, v in speeds.items()},
                     "speedup": {name: round(statistics.median(v) / plain, 3) for name, v in speeds.items()
                                 if name != "plain"},
                     "acceptance": round(counts["speculative, never off"]["accepted"]
                                         / max(1, counts["speculative, never off"]["drafted"]), 3),
                     "switched_off": counts["speculative"]["switched_off"]})
    return {"schema": SPECULATIVE_SCHEMA, "model": str(model_dir), "draft_rank": draft_rank,
            "draft_tokens": draft_tokens, "tokens": tokens, "rounds": rounds,
            "machine": machine_facts(threads, copy_bandwidth_gbs()), "rows": rows}


def speculative_markdown(report: dict) -> str:
    lines = [f"| rank | plain tokens/s | speculative (draft rank {report['draft_rank']}) | speedup | never switched off "
             f"| speedup | acceptance | switched itself off |", "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in report["rows"]:
        speed, gain = row["tokens_per_s"], row["speedup"]
        lines.append(f"| {row['rank']} | {speed['plain']:.1f} | {speed['speculative']:.1f} | {gain['speculative']:.2f}x "
                     f"| {speed['speculative, never off']:.1f} | {gain['speculative, never off']:.2f}x "
                     f"| {row['acceptance']:.2f} | {'yes' if row['switched_off'] else 'no'} |")
    machine = report["machine"]
    lines.append(f"\n{report['tokens']} greedy tokens, median of {report['rounds']} alternating runs; "
                 f"{machine['processor']}, {machine['cpu_count']} cores, ONNX Runtime {machine['onnxruntime']} with "
                 f"{machine['intra_op_threads']} threads.")
    return "\n".join(lines)
