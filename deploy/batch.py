"""Continuous batching: the generations that run at one rank decode in one call.

Decode on a CPU or a Jetson is bound by memory bandwidth: one call for eight sequences reads the
weights once and costs far less than eight calls (SmolLM2-135M, ONNX Runtime, 2 threads: 27 ms for
one sequence's step, 38 ms for eight). The server's scheduler says who may run at which rank
(``Batcher.step(rank_of)``); this module decides how they share calls.

How, on the graph as exported (no custom attention operator): the sequences of a ``Batch`` share
one KV cache with a row each, left-padded to the longest; the attention mask hides each row's
padding and ``position_ids`` carry each row's own positions, so every row computes what it would
alone, to rounding (greedy output is token-identical; the tests check it). A decode call appends
one column for every row; the graph concatenates past and present, so each call copies the cache
in any case. A sequence that joins or leaves lays the cache out again once (one copy, dropping
padding that no row needs any more), never at every step.

Prompts are read in chunks between decode steps (chunked prefill, as vLLM does): a step reads at
most ``prefill_chunk`` prompt tokens, shared by the sequences still reading theirs, oldest first,
so a long prompt adds one chunk's cost to the gap between the running streams' tokens instead of
the whole prompt's. A sequence's first token comes from its last chunk; it joins its rank's batch
at the next step.

Isolation: a decode call that fails is retried one row at a time, so only the sequence at fault
ends (with the exception as its outcome); the others carry on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .runtime import Step
from .text import check_token_ids

# Prompt tokens read per step: on SmolLM2 (2 CPU threads) a 64-token chunk costs about what one
# decode step of four streams does, so a long prompt at most doubles their gap (docs/SERVING.md).
DEFAULT_PREFILL_CHUNK = 64
MAX_PREFILL_CHUNK = 8192


def check_prefill_chunk(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PREFILL_CHUNK:
        raise ValueError(f"the prefill chunk must be an integer in [1, {MAX_PREFILL_CHUNK}] (prompt tokens read "
                         f"per step), got {value!r}; the default is {DEFAULT_PREFILL_CHUNK}")
    return value


@dataclass(eq=False)
class Stream:
    """One generation in a ``Batcher``: its prompt and options, and where it stands."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: tuple | None  # None: greedy; else (temperature, top_k, top_p)
    random: np.random.Generator
    stops: set[int]
    tag: object = None  # the caller's handle (the server's job)
    read: int = 0  # prompt tokens in its cache
    cache: object = None  # its own one-row cache, while it reads its prompt or changes batch
    prefill_ms: float = 0.0
    tokens: list[int] = field(default_factory=list)
    done: bool = False  # stopped, at its budget, failed or closed: it leaves at the next step

    @property
    def length(self) -> int:
        """Tokens in its cache: the prompt read so far, then every generated token but the last (the
        one the next call feeds)."""
        return self.read + max(len(self.tokens) - 1, 0)


class Batch:
    """Sequences that decode together at ``rank``: one KV cache with a row per sequence, each row
    right-aligned (its padding on the left), and the attention mask that hides the padding."""

    def __init__(self, runtime, rank: int):
        self.runtime, self.rank = runtime, rank
        self.rows: list[Stream] = []
        self.cache = None
        self.mask = np.zeros((0, 0), np.int64)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def join(self, streams: list[Stream]) -> None:
        """Add ``streams``, each holding its own one-row cache (given back): one copy of the batch."""
        runtime, count = self.runtime, len(self.rows)
        width = max([self.width] + [stream.length for stream in streams])
        old = runtime.host_cache(self.cache) if count else None
        new = [runtime.host_cache(stream.cache) for stream in streams]
        layers = []
        for layer, sample in enumerate(new[0]):
            array = np.zeros((count + len(streams), sample.shape[1], width, sample.shape[3]), sample.dtype)
            if old is not None:
                array[:count, :, width - self.width:] = old[layer]
            for index, (stream, host) in enumerate(zip(streams, new)):
                array[count + index, :, width - stream.length:] = host[layer][0]
            layers.append(array)
        mask = np.zeros((count + len(streams), width), np.int64)
        mask[:count, width - self.width:] = self.mask
        for index, stream in enumerate(streams):
            mask[count + index, width - stream.length:] = 1
        for stream in streams:
            runtime.release_cache(stream.cache)
            stream.cache = None
        if old is not None:
            runtime.release_cache(self.cache)
        self.cache, self.mask, self.rows = layers, mask, self.rows + list(streams)

    def take(self, streams: list[Stream]) -> None:
        """Remove ``streams``; each one still running gets its row back as its own cache. The rest
        is laid out again (one copy), without columns that are padding in every row left."""
        host = self.runtime.host_cache(self.cache)
        width = self.width
        for stream in streams:
            if not stream.done:
                index = self.rows.index(stream)
                stream.cache = [np.ascontiguousarray(array[index:index + 1, :, width - stream.length:])
                                for array in host]
        keep = [index for index, row in enumerate(self.rows) if row not in streams]
        self.runtime.release_cache(self.cache)
        if keep:
            trim = width - max(self.rows[index].length for index in keep)
            self.cache = [array[keep, :, trim:] for array in host]  # a copy (indexed by a list)
            self.mask = self.mask[keep, trim:]
        else:
            self.cache, self.mask = None, np.zeros((0, 0), np.int64)
        self.rows = [self.rows[index] for index in keep]

    def step(self) -> np.ndarray:
        """One call: each row's last token in, one row of logits per sequence out."""
        rows = self.rows
        ids = np.array([[stream.tokens[-1]] for stream in rows], np.int64)
        positions = np.array([[stream.length] for stream in rows], np.int64)
        mask = np.concatenate([self.mask, np.ones((len(rows), 1), np.int64)], axis=1)
        self.runtime.rank = self.rank
        logits, self.cache = self.runtime.decode_batch(ids, self.cache, mask, positions)
        self.mask = mask
        return logits


Outcome = tuple[Stream, "Step | Exception"]


class Batcher:
    """Runs every open ``Stream`` a step at a time: one decode call per rank for the streams that
    are decoding, and up to ``prefill_chunk`` prompt tokens for those still reading. Single-threaded:
    the caller (the server's scheduler thread) owns it and the runtime."""

    def __init__(self, runtime, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if not runtime.supports_batching:
            raise ValueError(f"{type(runtime).__name__} cannot run batched decode steps (its graph needs a "
                             f"position_ids input); serve it one sequence at a time")
        self.runtime, self.prefill_chunk = runtime, check_prefill_chunk(prefill_chunk)
        self.reading: list[Stream] = []  # oldest first
        self.batches: list[Batch] = []
        self.last_sizes: list[int] = []  # the rows of each decode call of the latest step

    def open(self, prompt_ids: list[int], max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_ids: set[int] | None = None, tag=None) -> Stream:
        """A new stream; the options mean what they mean for ``generate`` and are checked the same way."""
        sampling, stops = self.runtime.generation_options(max_new_tokens, do_sample, temperature, top_k, top_p,
                                                          seed, stop_ids)
        prompt_ids = check_token_ids(prompt_ids, self.runtime.vocab_size, "the prompt's token ids")
        stream = Stream(prompt_ids, max_new_tokens, sampling, np.random.default_rng(seed), stops, tag)
        self.reading.append(stream)
        return stream

    def close(self, stream: Stream) -> None:
        """Stop ``stream`` (finished, or its client left): it leaves its batch at the next step."""
        stream.done = True
        if stream in self.reading:
            self.reading.remove(stream)
        if stream.cache is not None:
            self.runtime.release_cache(stream.cache)
            stream.cache = None

    @property
    def streams(self) -> int:
        return len(self.reading) + sum(len(batch.rows) for batch in self.batches)

    def step(self, rank_of: Callable[[Stream], int]) -> list[Outcome]:
        """One step: streams that finished or changed rank leave their batch and those ready join
        one (``rank_of(stream)``: the rank it may run at now), one decode call per rank, then up to
        ``prefill_chunk`` prompt tokens. Returns each new token, or the exception that ended a stream."""
        self._regroup(rank_of)
        outcomes: list[Outcome] = []
        self.last_sizes = []
        for batch in list(self.batches):
            outcomes += self._decode(batch)
        budget = self.prefill_chunk
        for stream in list(self.reading):
            if budget == 0:
                break
            if stream.read < len(stream.prompt_ids):
                chunk = min(budget, len(stream.prompt_ids) - stream.read)
                budget -= chunk
                if (outcome := self._read(stream, chunk, rank_of(stream))) is not None:
                    outcomes.append((stream, outcome))
        return outcomes

    def _regroup(self, rank_of) -> None:
        moving = [stream for stream in self.reading if stream.tokens and not stream.done]
        for stream in moving:
            self.reading.remove(stream)
        for batch in self.batches:
            leaving = [stream for stream in batch.rows if stream.done or rank_of(stream) != batch.rank]
            if leaving:
                batch.take(leaving)
                moving += [stream for stream in leaving if not stream.done]
        by_rank: dict[int, list[Stream]] = {}
        for stream in moving:
            by_rank.setdefault(rank_of(stream), []).append(stream)
        batches: dict[int, Batch] = {}
        for batch in self.batches:
            if not batch.rows:
                continue
            if batch.rank in batches:  # split after a failure: merge it back
                rows = list(batch.rows)
                batch.take(rows)
                by_rank.setdefault(batch.rank, []).extend(rows)
                continue
            batches[batch.rank] = batch
        for rank, streams in by_rank.items():
            batches.setdefault(rank, Batch(self.runtime, rank)).join(streams)
        self.batches = list(batches.values())

    def _emit(self, stream: Stream, logits: np.ndarray, latency_ms: float) -> Step:
        token = self.runtime.choose(logits, stream.sampling, stream.random)
        stream.tokens.append(token)
        stop = token in stream.stops
        stream.done = stop or len(stream.tokens) >= stream.max_new_tokens
        return Step(token, self.runtime.last_rank, latency_ms, stop)

    def _read(self, stream: Stream, chunk: int, rank: int) -> "Step | Exception | None":
        """Read the next ``chunk`` tokens of ``stream``'s prompt; its first token after the last."""
        self.runtime.rank = rank
        ids = np.array([stream.prompt_ids[stream.read:stream.read + chunk]], np.int64)
        start = time.perf_counter()
        try:
            logits, stream.cache = self.runtime.decode_step(ids, stream.cache, stream.read)
        except Exception as error:  # this stream's alone: the caller reports it
            stream.cache = None  # a runtime that fails a call has released what it was given
            self.close(stream)
            return error
        stream.read += chunk
        stream.prefill_ms += (time.perf_counter() - start) * 1e3
        if stream.read < len(stream.prompt_ids):
            return None
        return self._emit(stream, logits[0], stream.prefill_ms)

    def _decode(self, batch: Batch) -> list[Outcome]:
        rows = list(batch.rows)
        start = time.perf_counter()
        try:
            logits = batch.step()
        except Exception as error:
            if len(rows) == 1:
                self.close(rows[0])
                batch.take(rows)
                return [(rows[0], error)]
            batch.take(rows)  # one row at a time, to find the one at fault
            self.batches.remove(batch)
            outcomes = []
            for stream in rows:
                single = Batch(self.runtime, batch.rank)
                single.join([stream])
                self.batches.append(single)
                outcomes += self._decode(single)
            return outcomes
        latency_ms = (time.perf_counter() - start) * 1e3
        self.last_sizes.append(len(rows))
        return [(stream, self._emit(stream, logits[index], latency_ms)) for index, stream in enumerate(rows)]
