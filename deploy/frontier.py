"""``frontier.json``: what each rank costs and what it is worth, measured on one device — written by
``nsn-calibrate`` (calibration/), read by the TensorRT profile planner and the governor through
``read_frontier``, the one reader.

Schema (``format_version`` 1)::

    {"format_version": 1,
     "model": {"graph_sha256": "...", "weights_sha256": "..." (of model.onnx_data, from the graph's
               metadata), "nsn": {metadata_props of the graph}},
     "backend": {"runtime": "onnxruntime 1.32 (CPUExecutionProvider)", "device": {...}},
     "shapes": {"task": ..., "batch": ..., "prompt_tokens": ..., "context_tokens": ...},
     "quality_metric": "cosine to the full rank's embeddings" | "1 / perplexity" | null,
     "rows": [{"rank", "flops_fraction", "latency_ms": {phase: {"median", "p90"}}, "rss_mb",
               "power_w", "energy_mj_per_token", "quality", "perplexity", "pareto"}, ...],
     "levels": [ranks], "profiles": "1-64,65-192,193-448",
     "speculative": {"target_rank", "draft_rank" (or null, with "why"), "k", "tokens", "acceptance",
                     "speedup", "candidates": [{"draft_rank", "acceptance", "speedup"}, ...]} (decoders)}

Decoders' phases are ``prefill``, ``decode`` (one sequence) and ``decode_batch_N`` (one step of N
sequences decoding together, as the server batches them). Quality is always higher-is-better (for
decoders, 1 / perplexity). The primary latency of a row is decode ms/token for decoders and the
batch's ms for encoders. A row is Pareto-optimal when no other row is at least as fast and at
least as good (strictly better in one, or a lower rank); without quality (a decoder exported
without a tokenizer) a higher rank counts as better.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .external_data import model_file, read_json_object
from .schema import Flag, ListOf, MapOf, Number, Table, Text, check, optional

FRONTIER_VERSION = 1


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


graph_sha256 = file_sha256  # of model.onnx: the graph, and (in its metadata) the weights' hash


def check_same_weights(recorded: str | None, source: str, model_path: Path) -> None:
    """``recorded`` (a weights hash a frontier or an engine carries) must be the weights hash in
    ``model_path``'s metadata; a mismatch names both files."""
    from .metadata import read_model_info

    actual = read_model_info(model_path).weights_sha256
    if recorded and actual and recorded != actual:
        raise ValueError(f"{source} was made from weights {recorded[:12]}..., but {model_path.parent / 'model.onnx_data'} "
                         f"holds weights {actual[:12]}... (nsn.weights_sha256 in {model_path}): another model's; "
                         f"run nsn-calibrate (or nsn-trt build) on this one")


def primary_latency(row: dict) -> float:
    latency = row["latency_ms"]
    phase = "decode" if "decode" in latency else next(iter(latency))
    return float(latency[phase]["median"])


BATCH_PHASE = "decode_batch_"  # a decode step of that many sequences at once: decode_batch_4, decode_batch_16


def latency_by_batch(row: dict) -> dict[int, float]:
    """A row's median latency per decode batch size: ``{1: primary latency, 4: ..., 16: ...}``."""
    found = {1: primary_latency(row)}
    for phase, value in row["latency_ms"].items():
        if phase.startswith(BATCH_PHASE) and phase[len(BATCH_PHASE):].isdigit():
            found[int(phase[len(BATCH_PHASE):])] = float(value["median"])
    return found


def mark_pareto(rows: list[dict]) -> list[dict]:
    """Set ``pareto`` on each row (quality vs primary latency). Without a quality measurement a
    higher rank is assumed better (the nesting makes it a superset of every lower rank)."""
    def score(row):
        return row["quality"] if row.get("quality") is not None else row["flops_fraction"]

    for row in rows:
        row["pareto"] = not any(
            other is not row and primary_latency(other) <= primary_latency(row) and score(other) >= score(row)
            and (primary_latency(other) < primary_latency(row) or score(other) > score(row)
                 or other["rank"] < row["rank"])
            for other in rows)
    return rows


def choose_levels(rows: list[dict], min_saving: float = 0.2) -> list[int]:
    """Pareto ranks, from the best down, keeping one only when it saves at least ``min_saving`` of the
    latency of the last one kept — so every step down is worth taking."""
    pareto = sorted((r for r in rows if r.get("pareto")), key=primary_latency, reverse=True)
    kept: list[dict] = []
    for row in pareto:
        if not kept or primary_latency(row) <= (1 - min_saving) * primary_latency(kept[-1]):
            kept.append(row)
    return sorted(r["rank"] for r in kept)


def profile_ranges(levels: list[int], max_rank: int, count: int = 3) -> str:
    """Contiguous rank ranges over [1, max_rank] for TensorRT profiles, each ending at a level, so
    the governor's levels fall into at most ``count`` profiles of about as many levels each."""
    levels = sorted(set(levels))
    count = max(1, min(count, len(levels)))
    ends = sorted({levels[round((i + 1) * len(levels) / count) - 1] for i in range(count - 1)} - {max_rank})
    ends.append(max_rank)
    starts = [1] + [e + 1 for e in ends[:-1]]
    return ",".join(f"{a}-{b}" for a, b in zip(starts, ends))


MS = Number(0, 1e9, "ms")
PROFILES_SYNTAX = r"\d+-\d+(,\d+-\d+)*"
FRONTIER_SCHEMA = Table({
    "format_version": Number(FRONTIER_VERSION, FRONTIER_VERSION, integer=True),
    "model": Table({"graph_sha256": Text(pattern="[0-9a-f]{64}", example="64 hex digits"),
                    "weights_sha256": optional(Text(pattern="[0-9a-f]{64}", example="64 hex digits")),
                    "nsn": optional(Table({"max_rank": optional(Number(1, 1_000_000, integer=True))}, open=True),
                                    dict)}, open=True),
    "backend": optional(Table(open=True), dict),
    "shapes": optional(Table(open=True), dict),
    "quality_metric": optional(Text()),
    "rows": ListOf(Table({
        "rank": Number(1, 1_000_000, integer=True),
        "flops_fraction": Number(0, 1e6),
        "latency_ms": MapOf(Table({"median": MS, "p90": MS}), min_len=1),
        "quality": optional(Number(-1, 1e9)),
        "perplexity": optional(Number(0, 1e12)),
        "rss_mb": optional(Number(0, 1e9, "MiB")),
        "power_w": optional(Number(0, 10_000, "W")),
        "energy_mj_per_token": optional(Number(0, 1e12, "mJ")),
        "pareto": optional(Flag(), False),
    }), min_len=1),
    "levels": ListOf(Number(1, 1_000_000, integer=True), min_len=1, max_len=1024),
    "profiles": Text(pattern=PROFILES_SYNTAX, example="1-64,65-192,193-448"),
    # self-speculative decoding: the best draft rank for the top rank, or None and why
    "speculative": optional(Table({
        "target_rank": Number(1, 1_000_000, integer=True),
        "draft_rank": optional(Number(1, 1_000_000, integer=True)),
        "k": Number(1, 64, integer=True),
        "tokens": Number(1, 1_000_000, integer=True),
        "acceptance": optional(Number(0, 1)),
        "speedup": optional(Number(0, 1e6)),
        "why": optional(Text()),
        "candidates": ListOf(Table({"draft_rank": Number(1, 1_000_000, integer=True), "acceptance": Number(0, 1),
                                    "speedup": Number(0, 1e6)}), max_len=1024),
    })),
})


def read_frontier(path: str | Path, model_path: str | Path | None = None) -> dict:
    """Read and check a frontier (``FRONTIER_SCHEMA``); with ``model_path`` (a graph or export
    directory), refuse a frontier measured on another model. Errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such frontier file; write one with nsn-calibrate")
    data = read_json_object(path, "write it again with nsn-calibrate")
    if data.get("format_version") != FRONTIER_VERSION:
        raise ValueError(f"{path}: format_version {data.get('format_version')!r} is not one this nsn-export reads "
                         f"({FRONTIER_VERSION}); recalibrate with nsn-calibrate")
    data = check(data, FRONTIER_SCHEMA, str(path))
    levels, max_rank = data["levels"], data["model"]["nsn"].get("max_rank")
    if levels != sorted(set(levels)) or (max_rank is not None and levels[-1] > max_rank):
        raise ValueError(f"{path}: field 'levels' = {levels} must be distinct ranks in ascending order within "
                         f"[1, {max_rank or 'the model maximum'}]; recalibrate with nsn-calibrate")
    if model_path is not None:
        model_path = model_file(model_path)
        check_same_weights(data["model"].get("weights_sha256"), str(path), model_path)
        expected = data["model"]["graph_sha256"]
        actual = graph_sha256(model_path)
        if expected != actual:
            raise ValueError(f"{path}: field 'model.graph_sha256' is {str(expected)[:12]}..., but {model_path} hashes "
                             f"to {actual[:12]}...: this frontier was measured on another model; run nsn-calibrate "
                             f"on this one")
    return data
