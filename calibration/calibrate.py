"""Measure an exported model across ranks on the device it runs on and build its frontier.

Runs without torch, through ``deploy``: an ``NSNSession`` (ONNX Runtime) or an ``NSNEngine``
(TensorRT). Per rank: FLOPs fraction (from the graph's metadata); latency as median and p90 over
repetitions interleaved across ranks (so drift and heat affect every rank alike) — decoders:
prefill of ``prompt_tokens``, one decode step after ``context_tokens``, and one decode step of 4
and of the most sequences the runtime batches (``decode_batch_N``, as the server runs them);
encoders: one batch of ``batch`` sentences; the process's resident memory; power and energy per
token when the governor's sensors see a power rail or battery draw (``None`` otherwise, never
invented); quality on the data — cosine to the full rank's embeddings for encoders, 1 / perplexity
for decoders. An export without a tokenizer is measured on token ids drawn from its vocabulary:
cosine to the full rank's embeddings (encoders), agreement with the full rank's next-token choice
(decoders); ``quality_metric`` says which. Decoders on ONNX Runtime also time each measured rank
as a self-speculative draft for the top rank (``measure_drafts``).
"""

from __future__ import annotations

import itertools
import math
import platform
import random
import statistics
import time
from typing import Callable

import numpy as np

from deploy.batch import MAX_STREAMS
from deploy.frontier import (BATCH_PHASE, FRONTIER_VERSION, choose_levels, graph_sha256, mark_pareto, primary_latency,
                             profile_ranges)
from deploy.runtime import decoder_feeds


def geometric_ranks(max_rank: int, count: int = 8) -> list[int]:
    return sorted({max(1, round(max_rank ** (k / (count - 1)))) for k in range(count)} | {max_rank})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


class Calibration:
    """Measure ``runtime`` (an ``NSNSession`` or ``NSNEngine``) on ``texts`` at ranks."""

    def __init__(self, runtime, texts: list[str], batch: int = 32, prompt_tokens: int = 128,
                 context_tokens: int = 128, repeats: int = 7, sensors=None, seed: int = 0):
        self.runtime, self.texts, self.batch = runtime, texts, batch
        self.prompt_tokens, self.context_tokens, self.repeats = prompt_tokens, context_tokens, repeats
        self.sensors, self.random = sensors, random.Random(seed)
        self.decoder = runtime.info.task == "text-generation"
        self.rows: dict[int, dict] = {}
        self._reference = None
        self.speculative: dict | None = None  # measure_drafts' findings
        # Decode steps of several sequences at once, as the server batches them: 4 and the most
        # the runtime takes (a TensorRT engine's --max-batch, else the server's running streams).
        largest = runtime.max_batch or MAX_STREAMS
        self.decode_batches = sorted({b for b in (4, largest) if 1 < b <= largest}) if (
            self.decoder and runtime.supports_batching) else []
        # Without a tokenizer, quality is measured on token ids drawn from the vocabulary.
        self.token_ids = None if runtime.tokenizer is not None else random_token_ids(
            self.vocab_size(), len(texts), min(prompt_tokens, runtime.max_length), seed)

    @property
    def quality_metric(self) -> str:
        if self.token_ids is not None:
            what = "next-token agreement with the full rank" if self.decoder else "cosine to the full rank's embeddings"
            return f"{what} (random token ids: the export has no tokenizer)"
        return "1 / perplexity" if self.decoder else "cosine to the full rank's embeddings"

    # ---- latency, memory, power ----------------------------------------------------------------
    def _timed_call(self) -> dict[str, float]:
        """One repetition at the current rank: ms per phase."""
        runtime = self.runtime
        if not self.decoder:
            start = time.perf_counter()
            runtime.embed(self.inputs[: self.batch], batch_size=self.batch)
            return {"batch": (time.perf_counter() - start) * 1e3}
        vocab = self.vocab_size()
        generator = np.random.default_rng(0)
        prompt = generator.integers(0, vocab, (1, self.prompt_tokens)).astype(np.int64)
        start = time.perf_counter()
        _, cache = runtime.decode_step(prompt, None, 0)
        prefill_ms = (time.perf_counter() - start) * 1e3
        runtime.release_cache(cache)
        context = generator.integers(0, vocab, (1, self.context_tokens)).astype(np.int64)
        _, cache = runtime.decode_step(context, None, 0)
        rows = runtime.host_cache(cache) if self.decode_batches else []
        start = time.perf_counter()
        _, cache = runtime.decode_step(np.array([[1]], np.int64), cache, self.context_tokens)
        decode_ms = (time.perf_counter() - start) * 1e3
        runtime.release_cache(cache)
        times = {"prefill": prefill_ms, "decode": decode_ms}
        for batch in self.decode_batches:
            times[f"{BATCH_PHASE}{batch}"] = self._batched_step_ms(rows, batch)
        return times

    def _batched_step_ms(self, rows: list[np.ndarray], batch: int) -> float:
        """One decode step of ``batch`` sequences of ``context_tokens`` each (after one untimed step
        that lays their cache out for the runtime)."""
        runtime, context = self.runtime, self.context_tokens
        cache = [np.repeat(array, batch, axis=0) for array in rows]
        ids = np.ones((batch, 1), np.int64)
        _, cache = runtime.decode_batch(ids, cache, np.ones((batch, context + 1), np.int64),
                                        np.full((batch, 1), context, np.int64))
        start = time.perf_counter()
        _, cache = runtime.decode_batch(ids, cache, np.ones((batch, context + 2), np.int64),
                                        np.full((batch, 1), context + 1, np.int64))
        elapsed = (time.perf_counter() - start) * 1e3
        runtime.release_cache(cache)
        return elapsed

    def vocab_size(self) -> int:
        """Token ids are drawn below this: the model config's vocabulary, else the tokenizer's."""
        return self.runtime.vocab_size or 2

    def power_w(self) -> float | None:
        if self.sensors is None:
            return None
        return self.sensors.read().power_w

    def measure_latency(self, ranks: list[int], progress: Callable[[int], None] | None = None) -> None:
        """Latency of ``ranks``, repetitions interleaved in a shuffled order each round."""
        import psutil

        samples = {r: [] for r in ranks}
        powers = {r: [] for r in ranks}
        for rank in ranks:  # warm-up: the first call at a rank allocates and plans
            self.runtime.rank = rank
            self._timed_call()
        for _ in range(self.repeats):
            order = list(ranks)
            self.random.shuffle(order)
            for rank in order:
                self.runtime.rank = rank
                samples[rank].append(self._timed_call())
                powers[rank].append(self.power_w())
        for rank in ranks:
            latency = {phase: {"median": round(statistics.median(s[phase] for s in samples[rank]), 3),
                               "p90": round(percentile([s[phase] for s in samples[rank]], 0.9), 3)}
                       for phase in samples[rank][0]}
            valid = [p for p in powers[rank] if p is not None]
            power = statistics.mean(valid) if valid else None
            row = self.rows.setdefault(rank, {"rank": rank})
            row.update({"flops_fraction": round(self.runtime.info.flops_fraction(rank), 4), "latency_ms": latency,
                        "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                        "power_w": None if power is None else round(power, 3)})
            tokens = 1 if self.decoder else self.batch
            row["energy_mj_per_token"] = None if power is None else round(
                power * primary_latency(row) / tokens, 3)
            if progress:
                progress(rank)

    # ---- quality -------------------------------------------------------------------------------
    @property
    def inputs(self) -> list:
        """What encoders embed: the texts, or token ids when there is no tokenizer."""
        return self.texts if self.token_ids is None else self.token_ids

    def at_full_rank(self, measure: Callable[[], object]):
        """``measure()`` at the maximum rank, computed once and kept (the reference of every rank)."""
        if self._reference is None:
            rank = self.runtime.rank
            self.runtime.rank = self.runtime.info.max_rank
            self._reference = measure()
            self.runtime.rank = rank
        return self._reference

    def measure_quality(self, rank: int) -> None:
        row = self.rows.setdefault(rank, {"rank": rank})
        self.runtime.rank = rank
        if self.decoder and self.token_ids is not None:
            choices = self.next_token_choices()
            reference = self.at_full_rank(self.next_token_choices)
            row["quality"] = round(float(np.mean(np.concatenate(choices) == np.concatenate(reference))), 6)
        elif self.decoder:
            perplexity = self.perplexity()
            row.update({"perplexity": round(perplexity, 4), "quality": round(1 / perplexity, 6)})
        else:
            embed = lambda: self.runtime.embed(self.inputs)  # noqa: E731
            embeddings, reference = embed(), self.at_full_rank(embed)
            row["quality"] = round(float(np.mean(np.sum(embeddings * reference, axis=-1))), 6)

    def teacher_forced_logits(self, ids: list[int]) -> np.ndarray:
        """The logits at every position of ``ids`` at the current rank, in one call."""
        feeds = decoder_feeds(self.runtime.input_shapes, np.array([ids], np.int64))
        name = self.runtime.output_names[0]
        return self.runtime.run(feeds, [name])[name][0]

    def next_token_choices(self) -> list[np.ndarray]:
        """The greedy next token at every position of every token-id sequence."""
        return [np.argmax(self.teacher_forced_logits(ids), axis=-1) for ids in self.token_ids]

    def perplexity(self) -> float:
        """Teacher-forced perplexity of the texts (each cut at ``prompt_tokens``)."""
        tokenizer = self.runtime.tokenizer
        total, count = 0.0, 0
        for text in self.texts:
            ids = tokenizer.encode(text).ids[: self.prompt_tokens] if tokenizer is not None else []
            if len(ids) < 2:
                continue
            logits = self.teacher_forced_logits(ids)[:-1].astype(np.float64)
            log_probs = logits - logits.max(-1, keepdims=True)
            log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
            total -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
            count += len(ids) - 1
        if not count:
            raise ValueError("no text of two tokens or more to measure perplexity on; give --data with longer text")
        return math.exp(total / count)

    # ---- rank selection ------------------------------------------------------------------------
    def run(self, ranks: list[int] | None, budget_s: float, progress: Callable[[str], None] | None = None,
            max_ranks: int = 16, min_quality_gap: float = 0.02) -> None:
        """Measure ``ranks`` or (None) a geometric ladder refined where quality changes fastest — quality
        first, at most ``max_ranks`` ranks, until no neighbouring pair differs by ``min_quality_gap``
        or half of ``budget_s`` is spent — then the latency of every rank in one interleaved pass, so
        all rows are timed under the same conditions."""
        report = progress or (lambda message: None)
        start = time.perf_counter()
        for rank in ranks or geometric_ranks(self.runtime.info.max_rank):
            self.measure_quality(rank)
            report(f"quality at rank {rank}: {self.rows[rank]['quality']}")
        while ranks is None and len(self.rows) < max_ranks and time.perf_counter() - start < budget_s / 2:
            measured = sorted(self.rows)
            gaps = [(abs((self.rows[b]["quality"] or 0) - (self.rows[a]["quality"] or 0)), a, b)
                    for a, b in zip(measured, measured[1:]) if b - a > 1]
            if not gaps or max(gaps)[0] < min_quality_gap:
                break
            _, low, high = max(gaps)
            self.measure_quality((low + high) // 2)
            report(f"refined at rank {(low + high) // 2} (between {low} and {high})")
        self.measure_latency(sorted(self.rows),
                             progress=lambda r: report(f"latency at rank {r}: {self.rows[r]['latency_ms']}"))

    # ---- self-speculative decoding: which rank drafts best -------------------------------------
    def measure_drafts(self, tokens: int = 32, k: int = 4, progress: Callable[[str], None] | None = None) -> dict:
        """For each measured rank below the top, as a draft for the top rank: the share of drafted
        tokens the top rank keeps and the tokens/s against plain decoding, greedy, on the texts'
        first ``prompt_tokens`` (held out from nothing: these are the calibration texts, not the
        training data). Plain and drafted runs alternate. The best draft is named when it is
        faster than plain decoding; else ``draft_rank`` is None and ``why`` says so."""
        from deploy.speculative import Speculation

        runtime, top = self.runtime, self.runtime.info.max_rank
        prompts = self._draft_prompts()
        runtime.rank = top
        runtime.prepare(top, wait=True)
        candidates = []
        for draft in [rank for rank in sorted(self.rows) if rank < top]:
            runtime.prepare_draft(draft, wait=True)
            plain_s = drafted_s = 0.0
            drafted = accepted = 0
            for prompt in prompts:
                start = time.perf_counter()
                runtime.generate(prompt, max_new_tokens=tokens, stop_ids=set())
                plain_s += time.perf_counter() - start
                speculation = Speculation(draft, k, auto_off=False)
                start = time.perf_counter()
                runtime.generate(prompt, max_new_tokens=tokens, stop_ids=set(), speculative=speculation)
                drafted_s += time.perf_counter() - start
                drafted, accepted = drafted + speculation.drafted, accepted + speculation.accepted
            candidates.append({"draft_rank": draft, "acceptance": round(accepted / max(drafted, 1), 3),
                               "speedup": round(plain_s / drafted_s, 3)})
            if progress:
                progress(f"draft rank {draft}: acceptance {candidates[-1]['acceptance']}, "
                         f"{candidates[-1]['speedup']}x plain")
        best = max(candidates, key=lambda c: c["speedup"], default=None)
        found = {"target_rank": top, "k": k, "tokens": tokens, "candidates": candidates, "draft_rank": None,
                 "acceptance": None, "speedup": None, "why": None}
        if best is not None and best["speedup"] > 1:
            found.update(draft_rank=best["draft_rank"], acceptance=best["acceptance"], speedup=best["speedup"])
        else:
            found["why"] = ("no rank below the top to draft with" if best is None else
                            f"no draft rank is faster than plain decoding (best: rank {best['draft_rank']}, "
                            f"{best['speedup']}x, acceptance {best['acceptance']})")
        self.speculative = found
        return found

    def _draft_prompts(self, count: int = 2) -> list[list[int]]:
        if self.token_ids is not None:
            return [ids[: self.prompt_tokens] for ids in self.token_ids[:count]]
        tokenizer = self.runtime.tokenizer
        encoded = (tokenizer.encode(text).ids[: self.prompt_tokens] for text in self.texts)
        return list(itertools.islice((ids for ids in encoded if ids), count))

    def frontier(self, model_path, backend: dict) -> dict:
        rows = mark_pareto([self.rows[r] for r in sorted(self.rows)])
        levels = choose_levels(rows)
        info = self.runtime.info
        return {
            "format_version": FRONTIER_VERSION,
            "model": {"graph_sha256": graph_sha256(model_path), **({"weights_sha256": info.weights_sha256}
                                                                   if info.weights_sha256 else {}), "nsn": {
                "max_rank": info.max_rank, "task": info.task, "rank_mode": info.rank_mode,
                "source_model": info.source_model, "trained_ranks": info.trained_ranks}},
            "backend": backend,
            "shapes": {"task": info.task, **({"prompt_tokens": self.prompt_tokens,
                                              "context_tokens": self.context_tokens, "batch": 1}
                                             if self.decoder else {"batch": self.batch})},
            "quality_metric": self.quality_metric, "rows": rows, "levels": levels,
            "profiles": profile_ranges(levels, info.max_rank),
            **({"speculative": self.speculative} if self.speculative is not None else {}),
        }


def random_token_ids(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """``count`` sequences of 8 to ``length`` token ids drawn uniformly below ``vocab_size``."""
    generator = np.random.default_rng(seed)
    shortest = min(8, length)
    return [generator.integers(0, vocab_size, int(generator.integers(shortest, length + 1))).tolist()
            for _ in range(count)]


def device_description() -> dict:
    import os

    return {"machine": platform.machine(), "system": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or None}
