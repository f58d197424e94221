"""``nsn-bench``: is a lower rank really faster, and is one dynamic-rank graph as fast as a graph
exported for that rank alone?

Measured side by side in one process, on the same shapes (batch 1): prefill of ``prefill_tokens``
tokens and one decode step after a ``cache_tokens``-token KV cache, ONNX Runtime CPU. Variants:

- ``dynamic``: the one exported graph, fed ``rank`` (what any ONNX Runtime caller gets);
- ``dynamic_views``: the same file through ``deploy.NSNSession`` with zero-copy weight views;
- ``dynamic_levels``: the same session on the rank's materialised level (constants; dense products
  above each layer's break-even rank), what it serves once the governor has held the rank;
- ``specialist``: a graph exported at that rank alone (weights pre-sliced, no ``rank`` input);
- ``dense``: the original model exported by Hugging Face Optimum, what a user deploys without NSN.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

SCHEMA = "nsn-bench/1"

# Llama-style decoders. "realistic" has the layer sizes of a 0.5B-class model (Qwen2-0.5B: hidden
# 896, intermediate 4864, 24 layers, 14 heads / 2 KV heads) with a 32k vocabulary.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "realistic": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=32000),
}
RANK_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
# dynamic: the exported slice-mode graph as any ONNX Runtime caller runs it; dynamic_mask: the
# mask-mode export (static shapes, full-rank compute); dynamic_views: slice-mode graph through
# deploy.NSNSession's zero-copy weight views; dynamic_levels: the same session on the rank's level.
DYNAMIC_VARIANTS = ("dynamic", "dynamic_mask", "dynamic_views", "dynamic_levels")


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        ordered = sorted(samples_ms)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return cls(round(statistics.median(ordered), 4), round(pick(0.1), 4), round(pick(0.9), 4), len(ordered))


# ---- models and graphs ----------------------------------------------------------------------

def build_dense_model(shape: str, seed: int = 0):
    import torch
    import transformers

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=1024, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def prepare_graphs(shape: str, work_dir: Path, ranks_for: Callable, opset: int = 17,
                   progress: Callable[[str], None] = lambda m: None) -> dict:
    """Export the dense model, the dynamic NSN graph and one specialist per rank level. Graphs are
    cached in ``work_dir``; the torch model is built (and factorised) only if one is missing.
    ``ranks_for(info)`` picks the rank levels from the dynamic graph's NSN metadata."""
    import nsn_export as nsn
    from nsn_export.export import export_dense_onnx, export_onnx, read_metadata

    from deploy.metadata import NSNModelInfo

    # the last number changes when the export's graphs do (4: grouped attention)
    key = hashlib.sha256(json.dumps([SHAPES[shape], opset, 4], sort_keys=True).encode()).hexdigest()[:10]
    root = Path(work_dir) / f"{shape}-{key}"

    @functools.cache
    def dense_model():
        return build_dense_model(shape)

    @functools.cache
    def model():  # factorised in place, so the dense graph is exported first
        nsn.adapt(dense_model(), "all-linear", max_rank=0.5)
        return dense_model()

    def export(directory: Path, message: str, write: Callable) -> Path:
        if not (directory / "model.onnx").is_file():
            progress(f"exporting {message} -> {directory}")
            write(directory)
        return directory / "model.onnx"

    graphs = {"root": root, "specialists": {}}
    graphs["dense"] = export(root / "dense", "the dense model with Optimum",
                             lambda d: export_dense_onnx(dense_model(), d, opset))
    graphs["dynamic"] = export(root / "dynamic", "the dynamic-rank NSN graph", lambda d: export_onnx(
        model(), d, opset=opset, verify=shape == "tiny", overwrite=True))
    graphs["dynamic_mask"] = export(root / "dynamic-mask", "the dynamic-rank NSN graph in mask mode",
                                    lambda d: export_onnx(model(), d, opset=opset, rank_mode="mask", verify=False,
                                                          overwrite=True))
    graphs["ranks"] = ranks_for(NSNModelInfo.from_props(read_metadata(graphs["dynamic"])))
    for r in graphs["ranks"]:
        graphs["specialists"][r] = export(root / f"specialist-{r}", f"the rank-{r} specialist", lambda d, r=r: (
            export_onnx(model(), d, opset=opset, fixed_rank=r, overwrite=True)))
    return graphs


def rank_levels(info, fractions=RANK_FRACTIONS, context_length: int = 128) -> list[int]:
    """Rank levels as fractions of the max rank, plus the rank whose FLOPs are 50% of dense."""
    levels = {max(1, round(info.max_rank * f)) for f in fractions}
    levels.add(info.rank_for_budget(0.5, context_length))
    return sorted(levels)


# ---- running ------------------------------------------------------------------------------

def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def plain_session(path: Path, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def decoder_workload(session, vocab: int, prefill_tokens: int, cache_tokens: int, seed: int = 0):
    """Feeds for prefill (empty cache) and for one decode step (a random cache of ``cache_tokens``)."""
    from deploy.ort.session import input_shapes
    from deploy.runtime import decoder_feeds

    generator = np.random.default_rng(seed)
    shapes = input_shapes(session)
    ids = lambda length: generator.integers(0, vocab, (1, length)).astype(np.int64)  # noqa: E731
    cache = [generator.standard_normal((1, shape[1], cache_tokens, shape[3])).astype(np.float32)
             for name, shape in shapes.items() if name.startswith("past_key_values.")]
    return decoder_feeds(shapes, ids(prefill_tokens)), decoder_feeds(shapes, ids(1), cache, cache_tokens)


def time_calls(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def measure_interleaved(calls: dict[str, Callable[[], object]], runs: int, warmup: int, rounds: int = 4) -> dict:
    """Time every variant in ``rounds`` alternating blocks, so drift in the machine hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for name, call in calls.items():
        time_calls(call, 0, warmup)
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name] += time_calls(call, per_round, 0)
    return {name: Timing.of(values) for name, values in samples.items()}


def copy_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth of a large copy (bytes read + bytes written, per second), in GB/s."""
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    best = min(time_calls(lambda: np.copyto(target, source), repeats, 1))
    return 2 * source.nbytes / (best / 1e3) / 1e9


def rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def decode_bytes(info, rank: int, decode: dict) -> int:
    """Bytes one decode step must read at ``rank``: every fp32 weight it multiplies (4 bytes per
    multiply-add, i.e. 2 bytes per linear FLOP) plus the KV cache."""
    cache = sum(v.nbytes for k, v in decode.items() if k.startswith("past_key_values."))
    return 2 * info.flops(rank) + cache


def max_abs_difference(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(a - b))) for a, b in zip(first, second))


def run_benchmark(shape: str = "tiny", work_dir: str | Path = "runs/bench", threads: int = 2,
                  prefill_tokens: int = 128, cache_tokens: int = 128, decode_runs: int = 60,
                  prefill_runs: int = 12, warmup: int = 3, fractions=RANK_FRACTIONS,
                  progress: Callable[[str], None] = lambda m: None) -> dict:
    """Run the whole comparison; returns the JSON-ready report (schema ``nsn-bench/1``)."""
    from deploy import NSNSession

    graphs = prepare_graphs(shape, Path(work_dir), lambda info: rank_levels(info, fractions, cache_tokens),
                            progress=progress)
    ranks = graphs["ranks"]
    bandwidth = copy_bandwidth_gbs()
    progress(f"copy bandwidth {bandwidth:.1f} GB/s; loading sessions ({threads} threads)")

    rss_before = rss_bytes()
    views = NSNSession(graphs["dynamic"], intra_op_threads=threads, weight_views=True, levels=False)
    levels = NSNSession(graphs["dynamic"], intra_op_threads=threads)
    info = views.info
    dynamic = plain_session(graphs["dynamic"], threads)
    masked = plain_session(graphs["dynamic_mask"], threads)
    dense = plain_session(graphs["dense"], threads)
    prefill, decode = decoder_workload(dense, SHAPES[shape]["vocab_size"], prefill_tokens, cache_tokens)
    factor_bytes = sum(v.weight.nbytes for v in views.views)

    rows = []
    for r in ranks:
        progress(f"rank {r}: measuring prefill ({prefill_tokens} tokens) and decode (cache {cache_tokens})")
        specialist = plain_session(graphs["specialists"][r], threads)
        rank_feed = {"rank": np.array(r, np.int64)}
        views.rank = levels.rank = r
        levels.prepare(r, wait=True)
        outputs = {
            "dynamic": dynamic.run(None, {**decode, **rank_feed}),
            "dynamic_mask": masked.run(None, {**decode, **rank_feed}),
            "dynamic_views": views.run_raw(decode),
            "dynamic_levels": levels.run_raw(decode),
            "specialist": specialist.run(None, decode),
        }
        row = {"rank": r, "flops_fraction": round(info.flops_fraction(r, cache_tokens), 4),
               "max_abs_diff_vs_specialist": {k: max_abs_difference(v, outputs["specialist"])
                                              for k, v in outputs.items() if k != "specialist"}}
        for phase, feeds, runs in (("prefill", prefill, prefill_runs), ("decode", decode, decode_runs)):
            timings = measure_interleaved({
                "dynamic": lambda: dynamic.run(None, {**feeds, **rank_feed}),
                "dynamic_mask": lambda: masked.run(None, {**feeds, **rank_feed}),
                "dynamic_views": lambda: views.run_raw(feeds),
                "dynamic_levels": lambda: levels.run_raw(feeds),
                "specialist": lambda: specialist.run(None, feeds),
                "dense": lambda: dense.run(None, feeds),
            }, runs, warmup)
            row[phase] = {name: vars(t) for name, t in timings.items()}
            special = timings["specialist"].median_ms
            row[phase]["ratio_vs_specialist"] = {
                name: round(timings[name].median_ms / special, 3) for name in DYNAMIC_VARIANTS}
            row[phase]["speedup_vs_dense"] = {
                name: round(timings["dense"].median_ms / timings[name].median_ms, 3)
                for name in (*DYNAMIC_VARIANTS, "specialist")}
            best = min(special, timings["dense"].median_ms)
            row[phase]["levels_vs_best"] = round(timings["dynamic_levels"].median_ms / best, 3)
        token_bytes = decode_bytes(info, r, decode)
        row["decode"]["bytes_read_per_token"] = token_bytes
        row["decode"]["bandwidth_fraction"] = {
            name: round(token_bytes / (row["decode"][name]["median_ms"] / 1e3) / 1e9 / bandwidth, 3)
            for name in (*DYNAMIC_VARIANTS, "specialist")}
        rows.append(row)
        del specialist
        gc.collect()

    switch = measure_switch(views, decode, ranks[0], ranks[-1], 2 * decode_runs, warmup)
    all_weights = 2 * info.flops(info.max_rank) + embedding_bytes(shape)
    memory = {"factor_bytes": factor_bytes, "all_weight_bytes": all_weights}
    memory.update(measure_session_memory(graphs["dynamic"], ranks, decode, threads))
    memory["views_session_rss_delta_over_all_weight_bytes"] = round(
        memory["views_session_rss_delta_bytes"] / all_weights, 3)
    report = {
        "schema": SCHEMA,
        "shape": {"name": shape, **SHAPES[shape]},
        "max_rank": info.max_rank,
        "workload": {"batch": 1, "prefill_tokens": prefill_tokens, "cache_tokens": cache_tokens,
                     "decode_runs": decode_runs, "prefill_runs": prefill_runs, "warmup": warmup},
        "machine": machine_facts(threads, bandwidth),
        "rows": rows,
        "switch": switch,
        "memory": memory,
        "rss_growth_bytes_main_process": rss_bytes() - rss_before,
    }
    report["targets"] = target_checks(report)
    return report


def target_checks(report: dict) -> dict:
    """The performance targets of docs/PERFORMANCE.md, measured against this report."""
    top = report["max_rank"]
    within_half = [row for row in report["rows"] if row["flops_fraction"] <= 0.5 + 1e-9] or report["rows"][:1]
    half = within_half[-1]  # rows are sorted by rank: the largest rank within half the dense FLOPs
    checks = {}
    for variant in DYNAMIC_VARIANTS:
        worst = max((row[phase]["ratio_vs_specialist"][variant], row["rank"], phase)
                    for row in report["rows"] if row["rank"] >= top / 8 for phase in ("prefill", "decode"))
        checks[f"{variant}_vs_specialist_max_ratio"] = {"value": worst[0], "at_rank": worst[1], "phase": worst[2],
                                                       "target": "<= 1.10", "met": worst[0] <= 1.10}
        slowest = min(half[phase]["speedup_vs_dense"][variant] for phase in ("prefill", "decode"))
        checks[f"{variant}_speedup_vs_dense_at_half_flops"] = {
            "value": slowest, "rank": half["rank"], "flops_fraction": half["flops_fraction"],
            "target": ">= 1.6", "met": slowest >= 1.6}
    worst = max((row[phase]["levels_vs_best"], row["rank"], phase) for row in report["rows"]
                for phase in ("prefill", "decode"))
    checks["dynamic_levels_vs_faster_of_specialist_and_dense"] = {
        "value": worst[0], "at_rank": worst[1], "phase": worst[2], "target": "<= 1.05", "met": worst[0] <= 1.05}
    switch = report["switch"]["added_ms_per_switch"]
    checks["rank_switch_added_ms"] = {"value": switch, "target": "< 0.1", "met": switch < 0.1}
    memory = report["memory"]["views_session_rss_delta_over_all_weight_bytes"]
    checks["one_session_memory_over_weight_bytes"] = {"value": memory, "target": "<= 1.15", "met": memory <= 1.15}
    return checks


def embedding_bytes(shape: str) -> int:
    return 4 * SHAPES[shape]["vocab_size"] * SHAPES[shape]["hidden_size"]


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    ordered = sorted(values)
    drop = int(len(ordered) * cut)
    kept = ordered[drop: len(ordered) - drop] or ordered
    return sum(kept) / len(kept)


def measure_switch(views, decode: dict, low: int, high: int, runs: int, warmup: int, rounds: int = 6) -> dict:
    """Cost of switching rank between two consecutive decode calls (weight-views session).

    Each call's time is compared with calls *at the same rank* that did not follow a switch
    (blocks of one rank), so the large difference between the two ranks' own costs cancels out.
    """
    for r in (low, high):  # the governor's levels are warm: their view feeds exist already
        views.rank = r
        views.rank_feeds(r)

    def call(r):
        views.rank = r
        start = time.perf_counter()
        views.run_raw(decode)
        return (time.perf_counter() - start) * 1e3

    for _ in range(warmup):
        call(low), call(high)
    per_block = max(2, runs // rounds)
    switched = {low: [], high: []}
    steady = {low: [], high: []}
    for _ in range(rounds):
        for i in range(per_block):
            r = low if i % 2 else high
            switched[r].append(call(r))
        for r in (low, high):
            call(r)  # the first call of a block follows a switch: not a steady sample
            steady[r] += [call(r) for _ in range(per_block // 2)]
    added = [trimmed_mean(switched[r]) - trimmed_mean(steady[r]) for r in (low, high)]
    error = [(statistics.pvariance(switched[r]) / len(switched[r]) + statistics.pvariance(steady[r]) / len(steady[r]))
             ** 0.5 for r in (low, high)]
    setter = time_calls(lambda: (setattr(views, "rank", low), views.rank_feeds(low),
                                 setattr(views, "rank", high), views.rank_feeds(high)), 2000, 10)
    return {"ranks": [low, high], "calls": sum(map(len, switched.values())) + sum(map(len, steady.values())),
            "added_ms_per_switch": round(sum(added) / 2, 4),
            "added_ms_by_rank": {str(r): round(a, 4) for r, a in zip((low, high), added)},
            "standard_error_ms": round((error[0] ** 2 + error[1] ** 2) ** 0.5 / 2, 4),
            "rank_setter_us": round(statistics.median(setter) * 1e3 / 2, 3)}


def machine_facts(threads: int, bandwidth: float) -> dict:
    import onnxruntime as ort

    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "onnxruntime": ort.__version__, "intra_op_threads": threads, "copy_bandwidth_gbs": round(bandwidth, 2)}


def measure_session_memory(path: Path, ranks: list[int], decode: dict, threads: int) -> dict:
    """RSS of a fresh process before and after one weight-views session has served every rank."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "decode.npz", **decode)
        script = (
            "import json, sys, numpy as np, psutil, os\n"
            "from deploy import NSNSession\n"
            "rss = lambda: psutil.Process(os.getpid()).memory_info().rss\n"
            f"feeds = dict(np.load({str(Path(tmp) / 'decode.npz')!r}))\n"
            "base = rss()\n"
            f"s = NSNSession({str(path)!r}, intra_op_threads={threads}, weight_views=True)\n"
            "loaded = rss()\n"
            f"for r in {ranks!r}:\n"
            "    s.rank = r; s.run_raw(feeds)\n"
            "factors = sum(v.weight.nbytes for v in s.views)\n"
            "print(json.dumps({'rss_base': base, 'rss_loaded': loaded, 'rss_after_all_ranks': rss(), "
            "'factor_bytes': factors}))\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    grown = facts["rss_after_all_ranks"] - facts["rss_base"]
    return {"views_session_rss_delta_bytes": grown,
            "views_session_rss_delta_over_factor_bytes": round(grown / facts["factor_bytes"], 3)}
