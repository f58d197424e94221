"""Continuous batching: the generations that run at one rank decode in one call.

Decode on a CPU or a Jetson is bound by memory bandwidth: one call for eight sequences reads the
weights once and costs far less than eight calls (SmolLM2-135M, ONNX Runtime, 2 threads: 23 ms for
one sequence's step, 29-30 ms for eight). The server's scheduler says who may run at which rank
(``Batcher.step(rank_of)``); this module decides how they share calls.

How, on the graph as exported (no custom attention operator): the sequences of a ``Batch`` share
one KV cache with a row each, left-padded to the longest; the attention mask hides each row's
padding and ``position_ids`` carry each row's own positions, so every row computes what it would
alone, to rounding (greedy output is token-identical; the tests check it). A decode call appends
one column for every row; the graph concatenates past and present, so each call copies the cache
in any case. Rows are slots, as llama.cpp's are: a sequence that leaves frees its row (the mask
hides it; its output is not read) and the next sequence to join takes it, its own cache written
into the row in place. The cache is laid out again (one copy) only when a joining sequence is
longer than the batch is wide, when more rows are free than used, or when columns no row needs
any more hold more positions than the rows use; never at every step. (SmolLM2, 16 streams of
32 + 32 tokens arriving in turn, in one process: layouts 128 -> 22, their time 2.4 -> 0.3 s of
~10 s.) A TensorRT engine does the same in its device buffers (``write_row`` / ``read_row``).

Rows of very different lengths would pad each other: a stream that would pad a batch by more than
a call's worth of positions decodes in a batch of its own at the same rank (``Batcher``).

Prompts are read in chunks between decode steps (chunked prefill, as vLLM does), oldest first, at
most ``prefill_chunk`` tokens a step, and paced by time while others decode, so a long prompt adds
a bounded share to the gap between the running streams' tokens instead of the whole prompt's
cost. A sequence's first token comes from its last chunk; it joins a batch at the next step.

With a ``reader`` (a second runtime of the model on one thread: ``NSNSession.prompt_reader``), a
long prompt that arrives while others decode is read beside the steps instead: its chunks run on
a thread of their own, one in flight at a time, and meanwhile the steps run on the reader's other
thread, so on two cores the streams' step costs one thread's decode instead of a decode plus a
read (SmolLM2, 4 streams, a 2,000-token prompt: steps ~42 ms against ~67 ms, the prompt read in
~7 s against ~10 s). Both runtimes run the rank on a built level, whose numbers do not depend on
the thread count, so every sequence still gets its solo tokens.

Isolation: a decode call that fails is retried one row at a time, so only the sequence at fault
ends (with the exception as its outcome); the others carry on.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .runtime import Step
from .text import check_token_ids

# The most prompt tokens read in one step (when nothing else decodes, a prompt is read this many
# at a time: SmolLM2 reads 2,000 tokens in ~6 s in chunks of 128-256, ~8 s in chunks of 32).
DEFAULT_PREFILL_CHUNK = 256
MAX_PREFILL_CHUNK = 8192
# While streams decode, a step's prompt reading takes about this many times the step's decoding
# (a 2,000-token prompt during four streams on SmolLM2: their worst gap 1.3-2.3x their median over
# the run, 3.4-5.5x their gap before it came; in one process, 1.0 / 1.25 / 1.5 gave a worst gap
# of 2.8-3.0x / 3.1-3.6x / 3.3-3.9x the gap before and read the prompt in 27 / 14-15 / 9-13 s;
# docs/SERVING.md). The first paced chunk is FIRST_PACED_CHUNK tokens, later ones are sized from
# the time the previous one took.
PREFILL_SHARE = 1.5
FIRST_PACED_CHUNK = 16
# A prompt at least this long is read beside the decode steps, on the reader's own thread, while
# other streams decode (``Batcher(reader=...)``); shorter ones are read between steps.
BESIDE_PROMPT = 256
# Generations a server runs at once (each holds a KV cache); more wait in its queue.
MAX_STREAMS = 16
# Padded cache positions a stream may add to a batch rather than decode in a call of its own. A
# call's fixed cost (the weights' read) against a padded position's (copied with the cache and
# attended over), SmolLM2 on 2 CPU threads, four short rows and one long row, one padded call vs
# two calls: long row of 1,000 (3,900 padded) 43.9 vs 49.8 ms; of 1,200 beside rows of 200 (4,000)
# 48.0 vs 53.0; of 2,000 (7,200-7,900) 58.6-63.4 vs 54.1-59.8. Break-even near 6,000; kept below.
PADDING_PER_CALL = 4096


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
    right-aligned (its padding on the left), and the attention mask that hides the padding. A
    sequence that leaves frees its row (``None`` in ``rows``) and the next to join takes it, as
    llama.cpp's slots are taken: neither lays the cache out again."""

    def __init__(self, runtime, rank: int):
        self.runtime, self.rank = runtime, rank
        self.rows: list[Stream | None] = []  # None: a free row (hidden by the mask, its output unread)
        self.cache = None
        self.mask = np.zeros((0, 0), np.int64)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def streams(self) -> list[Stream]:
        return [row for row in self.rows if row is not None]

    def join(self, streams: list[Stream]) -> None:
        """Add ``streams``, each holding its own one-row cache (given back). A stream no longer than
        the batch takes a free row, written in place where the runtime can (``write_row``: ONNX
        Runtime through numpy, a TensorRT engine by copies on the device); the others make the batch
        be laid out again (one copy, none when a stream starts a batch alone: its cache becomes the
        batch's as it is)."""
        streams = list(streams)
        free = [index for index, row in enumerate(self.rows) if row is None]
        for stream in [stream for stream in streams if stream.length <= self.width]:
            if not free or not self.runtime.write_row(self.cache, free[0], self.width, stream.cache, stream.length):
                break
            index = free.pop(0)
            self.mask[index] = 0
            self.mask[index, self.width - stream.length:] = 1
            self.runtime.release_cache(stream.cache)
            stream.cache, self.rows[index] = None, stream
            streams.remove(stream)
        if streams:
            self._lay_out(streams)

    def _lay_out(self, joining: list[Stream], free: int = 0) -> None:
        """The cache laid out again (one copy) with the running rows, ``joining`` and ``free`` free
        rows; columns that are padding in every row dropped."""
        runtime, live = self.runtime, [index for index, row in enumerate(self.rows) if row is not None]
        if not live and len(joining) == 1:
            (stream,) = joining
            self.cache, stream.cache = stream.cache, None
            self.mask, self.rows = np.ones((1, stream.length), np.int64), [stream]
            return
        rows = [self.rows[index] for index in live] + joining
        lengths = [row.length for row in rows]
        rows += [None] * free
        width, kept = max(lengths), max(lengths[:len(live)], default=0)
        old = runtime.host_cache(self.cache) if live else None
        new = [runtime.host_cache(stream.cache) for stream in joining]
        layers = []
        for layer, sample in enumerate(old or new[0]):
            array = np.zeros((len(rows), sample.shape[1], width, sample.shape[3]), sample.dtype)
            if old is not None:  # the running rows, right-aligned as they were: one block
                array[:len(live), :, width - kept:] = old[layer][live, :, self.width - kept:]
            for index, (stream, host) in enumerate(zip(joining, new), start=len(live)):
                array[index, :, width - stream.length:] = host[layer][0]
            layers.append(array)
        mask = np.zeros((len(rows), width), np.int64)  # a free row's stays zero
        for index, length in enumerate(lengths):
            mask[index, width - length:] = 1
        for stream in joining:
            runtime.release_cache(stream.cache)
            stream.cache = None
        if self.cache is not None:
            runtime.release_cache(self.cache)
        self.cache, self.mask, self.rows = layers, mask, rows

    def take(self, streams: list[Stream]) -> None:
        """Remove ``streams``; each one still running gets its row back as its own cache (a copy of
        the row). Their rows are freed for the next streams to join. The batch is laid out again only
        when more of its rows are free than used (the free ones dropped), or when the columns that
        no row needs any more hold more positions than its rows use (trimmed, the free rows kept):
        the copies stay few however often streams come and go."""
        for stream in streams:
            index = self.rows.index(stream)
            if not stream.done:
                stream.cache = self.runtime.read_row(self.cache, index, self.width, stream.length)
            self.rows[index] = None
            self.mask[index] = 0
        live = self.streams
        if not live:
            self.runtime.release_cache(self.cache)
            self.cache, self.mask, self.rows = None, np.zeros((0, 0), np.int64), []
            return
        free = len(self.rows) - len(live)
        if free > len(live):
            self._lay_out([])
        elif (self.width - max(row.length for row in live)) * len(self.rows) > sum(row.length for row in live):
            self._lay_out([], free)

    def step(self, runtime=None) -> np.ndarray:
        """One call (on ``runtime``, default the batch's): each row's last token in, one row of logits
        per row out (a free row's unread)."""
        runtime, rows = runtime or self.runtime, self.rows
        ids = np.array([[0 if stream is None else stream.tokens[-1]] for stream in rows], np.int64)
        positions = np.array([[0 if stream is None else stream.length] for stream in rows], np.int64)
        mask = np.concatenate([self.mask, np.ones((len(rows), 1), np.int64)], axis=1)  # a free row sees itself
        runtime.rank = self.rank
        logits, self.cache = runtime.decode_batch(ids, self.cache, mask, positions)
        self.mask = mask
        return logits


Outcome = tuple[Stream, "Step | Exception"]


def padding(rows: int, width: int, cached: int) -> int:
    """Cache positions a batch of ``rows`` rows, ``width`` wide, pads (``cached``: positions in use)."""
    return rows * width - cached


class Batcher:
    """Runs every open ``Stream`` a step at a time: one decode call per batch of streams that are
    decoding (one batch per rank, or more where lengths differ too much), and prompt tokens for the
    streams still reading theirs. Single-threaded: the caller (the server's scheduler thread) owns
    it and the runtime.

    Where streams go: a stream joins the batch at its rank that its length pads least, if that adds
    at most ``padding_per_call`` cache positions; else it starts a batch of its own. A row of 2,000
    positions padding four of 200 makes their call cost more than two calls (SmolLM2: 63 ms against
    60), because every padded position is copied and attended over; a row of 1,200 does not (48 ms
    against 53).

    How fast prompts are read: at most ``prefill_chunk`` tokens per step; and while other streams
    decode, a step's reading is paced to take about ``PREFILL_SHARE`` times that step's decoding
    (the chunk size adapts to each chunk's measured time), so a running stream's gap between two
    tokens stays within about ``1 + PREFILL_SHARE`` times its usual gap however long the prompt."""

    def __init__(self, runtime, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 padding_per_call: int = PADDING_PER_CALL, reader=None):
        if not runtime.supports_batching:
            raise ValueError(f"{type(runtime).__name__} cannot run batched decode steps (its graph needs a "
                             f"position_ids input); serve it one sequence at a time")
        self.runtime, self.prefill_chunk = runtime, check_prefill_chunk(prefill_chunk)
        self.padding_per_call = padding_per_call
        self.chunk = min(FIRST_PACED_CHUNK, self.prefill_chunk)  # the paced chunk size, learned
        self.reading: list[Stream] = []  # oldest first
        self.batches: list[Batch] = []
        self.last_sizes: list[int] = []  # the rows of each decode call of the latest step
        # a long prompt's chunks are read by ``reader`` (a second runtime of the same model, on one
        # thread of its own) at the same time as the decode steps, one chunk in flight at a time
        self.reader = reader
        self._beside = ThreadPoolExecutor(1, thread_name_prefix="nsn-prompt") if reader is not None else None
        self._warmed: set[int] = set()  # ranks whose reader level has read a warm-up chunk
        self.in_flight: "tuple[Stream, int, int, Future] | None" = None  # (stream, chunk, rank, its call)

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
        if self.in_flight is not None and self.in_flight[0] is stream:
            return  # its cache is being read; released when the call returns
        if stream.cache is not None:
            self.runtime.release_cache(stream.cache)
            stream.cache = None

    @property
    def streams(self) -> int:
        in_flight = self.in_flight is not None and self.in_flight[0] not in self.reading  # closed, not yet back
        return len(self.reading) + sum(len(batch.streams) for batch in self.batches) + in_flight

    def step(self, rank_of: Callable[[Stream], int]) -> list[Outcome]:
        """One step: streams that finished or changed rank leave their batch and those ready join
        one (``rank_of(stream)``: the rank it may run at now), one decode call per batch, then
        prompt tokens. Returns each new token, or the exception that ended a stream."""
        outcomes: list[Outcome] = self._collect_beside()
        self._regroup(rank_of)
        self.last_sizes = []
        self._warm_reader()
        self._start_beside(rank_of)
        start = time.perf_counter()
        for batch in list(self.batches):
            outcomes += self._decode(batch)
        decode_ms = (time.perf_counter() - start) * 1e3 if self.last_sizes else 0.0
        outcomes += self._read_prompts(rank_of, decode_ms)
        return outcomes

    def _read_prompts(self, rank_of, decode_ms: float) -> list[Outcome]:
        """Prompt tokens, oldest stream first: up to ``prefill_chunk`` of them, and while streams
        decode, about ``PREFILL_SHARE * decode_ms`` of reading."""
        outcomes = []
        budget, spent = self.prefill_chunk, 0.0
        target_ms = PREFILL_SHARE * decode_ms
        for stream in list(self.reading):  # a copy: a failed read closes its stream
            if stream.tokens:
                continue  # read (its first token came from the reader this step)
            rank = rank_of(stream)
            if (self.in_flight is not None and stream is self.in_flight[0]) or (
                    decode_ms and self._beside_for(stream, rank)):
                continue  # read on the reader's thread, never between the steps
            if budget == 0 or (decode_ms and spent >= target_ms):
                break
            remaining = len(stream.prompt_ids) - stream.read
            paced = self.chunk if decode_ms else budget
            # a short rest is read whole: a call's fixed cost (the weights' read) is not worth splitting for
            size = min(budget, remaining if remaining <= 2 * paced else paced)  # >= 1: prompts are never empty
            budget -= size
            read, elapsed_ms = self._read(stream, size, rank)
            spent += elapsed_ms
            if decode_ms and elapsed_ms > 0:  # the size whose time would have met the target
                self.chunk = max(1, min(self.prefill_chunk, round(size * target_ms / elapsed_ms)))
            outcomes += read
        return outcomes

    def _start_beside(self, rank_of) -> None:
        """While streams decode, the oldest long prompt's next chunk starts on the reader's thread
        (where the reader runs that stream's rank as this runtime does: on a built level)."""
        if self.reader is None or self.in_flight is not None or not self.batches:
            return
        for stream in self.reading:
            rank = rank_of(stream)
            if not stream.tokens and self._beside_for(stream, rank):
                chunk = min(self.prefill_chunk, len(stream.prompt_ids) - stream.read)
                self.in_flight = (stream, chunk, rank, self._beside.submit(
                    self._chunk_call, self.reader, stream, chunk, rank))
                return

    def _warm_reader(self) -> None:
        """The reader's first chunk at a rank, on its thread, is slow (the level's memory and the
        thread's grow to a chunk's size; the decode step beside it took 65-69 ms on SmolLM2 and
        105-129 ms on the realistic decoder, against ~40 and ~70 for the next ones): once the reader
        runs a rank that streams decode at, a chunk of zeros is read there first, on its thread,
        so that no long prompt's first step pays it (a long prompt's chunk waits for it)."""
        if self.reader is None:
            return
        for rank in {batch.rank for batch in self.batches} - self._warmed:
            if self._on_reader(rank):
                self._warmed.add(rank)
                self._beside.submit(self.reader.decode_step, np.zeros((1, self.prefill_chunk), np.int64), None, 0,
                                    logits=False, rank=rank)

    def _beside_for(self, stream: Stream, rank: int) -> bool:
        """Whether ``stream``'s prompt is read by the reader while others decode: a long one."""
        return len(stream.prompt_ids) >= BESIDE_PROMPT and self._on_reader(rank)

    def _on_reader(self, rank: int) -> bool:
        """Whether the reader computes at ``rank`` what this runtime would: both run it on a built
        level (whose numbers do not depend on the thread count)."""
        return self.reader is not None and self.reader.level_ready(rank) and self.runtime.level_ready(rank)

    def _collect_beside(self) -> list[Outcome]:
        """The chunk read beside the last step, once its call returned (waited for when nothing
        decodes: there is nothing else to do)."""
        if self.in_flight is None or not (self.in_flight[3].done() or not self.batches):
            return []
        (stream, chunk, rank, call), self.in_flight = self.in_flight, None
        try:
            result = call.result()
        except Exception as error:
            return self._failed(stream, error)
        if stream.done:  # closed meanwhile
            for old in (stream.cache, result[1]):
                if old is not None:
                    self.runtime.release_cache(old)
            stream.cache = None
            return []
        return self._advance(stream, chunk, rank, *result)

    def _regroup(self, rank_of) -> None:
        """Finished rows and rows whose rank changed leave; streams ready to decode join a batch."""
        placing = [stream for stream in self.reading if stream.tokens and not stream.done]
        for stream in placing:
            self.reading.remove(stream)
        for batch in self.batches:
            leaving = [stream for stream in batch.streams if stream.done or rank_of(stream) != batch.rank]
            if leaving:
                batch.take(leaving)
                placing += [stream for stream in leaving if not stream.done]
        self.batches = [batch for batch in self.batches if batch.streams]
        self._merge()
        joining: dict[Batch, list[Stream]] = {}
        for stream in placing:
            rank = rank_of(stream)
            added, best = min(((self._added_padding(batch, joining.get(batch, []), stream), batch)
                               for batch in self.batches if batch.rank == rank
                               and self._fits(len(batch.streams) + len(joining.get(batch, [])) + 1)),
                              key=lambda pair: pair[0], default=(None, None))
            if best is None or added > self.padding_per_call:
                best = Batch(self.runtime, rank)
                self.batches.append(best)
            joining.setdefault(best, []).append(stream)
        for batch, streams in joining.items():
            batch.join(streams)

    def _fits(self, rows: int) -> bool:
        """Whether the runtime takes a batch of ``rows`` (a TensorRT engine's ``--max-batch``)."""
        return self.runtime.max_batch is None or rows <= self.runtime.max_batch

    @staticmethod
    def _shape(rows: list[Stream]) -> tuple[int, int, int]:
        return len(rows), max((row.length for row in rows), default=0), sum(row.length for row in rows)

    def _added_padding(self, batch: Batch, planned: list[Stream], stream: Stream) -> int:
        rows = batch.streams + planned
        return padding(*self._shape(rows + [stream])) - padding(*self._shape(rows))

    def _merge(self) -> None:
        """Batches at one rank become one where that pads at most ``padding_per_call`` more (after a
        failure split one, or once the long row that kept two apart has left)."""
        merged: list[Batch] = []
        for batch in self.batches:
            into = next((other for other in merged if other.rank == batch.rank
                         and self._fits(len(other.streams) + len(batch.streams)) and padding(
                *self._shape(other.streams + batch.streams)) - padding(*self._shape(other.streams)) - padding(
                *self._shape(batch.streams)) <= self.padding_per_call), None)
            if into is None:
                merged.append(batch)
            else:
                rows = batch.streams
                batch.take(rows)
                into.join(rows)
        self.batches = merged

    def _emit(self, stream: Stream, logits: np.ndarray, latency_ms: float, rank: int) -> Step:
        token = self.runtime.choose(logits, stream.sampling, stream.random)
        stream.tokens.append(token)
        stop = token in stream.stops
        stream.done = stop or len(stream.tokens) >= stream.max_new_tokens
        return Step(token, rank, latency_ms, stop)

    def _read(self, stream: Stream, chunk: int, rank: int) -> tuple[list[Outcome], float]:
        """Read the next ``chunk`` tokens of ``stream``'s prompt here (its first token after the
        last, or the exception that ended it), and how long that took."""
        start = time.perf_counter()
        try:
            result = self._chunk_call(self.runtime, stream, chunk, rank)
        except Exception as error:
            return self._failed(stream, error), (time.perf_counter() - start) * 1e3
        return self._advance(stream, chunk, rank, *result), result[2]

    @staticmethod
    def _chunk_call(runtime, stream: Stream, chunk: int, rank: int):
        """The call that reads ``stream``'s next ``chunk`` prompt tokens on ``runtime`` (here, or on
        the reader's thread: the stream is not touched): ``(logits, new cache, ms)``, the logits only
        for the last chunk."""
        ids = np.array([stream.prompt_ids[stream.read:stream.read + chunk]], np.int64)
        start = time.perf_counter()
        logits, cache = runtime.decode_step(ids, stream.cache, stream.read, rank=rank,
                                            logits=stream.read + chunk == len(stream.prompt_ids))
        return logits, cache, (time.perf_counter() - start) * 1e3

    def _advance(self, stream: Stream, chunk: int, rank: int, logits, cache, elapsed_ms: float) -> list[Outcome]:
        """A chunk read: the stream's cache and progress; its first token once its prompt is read."""
        stream.cache, stream.read, stream.prefill_ms = cache, stream.read + chunk, stream.prefill_ms + elapsed_ms
        if stream.read < len(stream.prompt_ids):
            return []
        return [(stream, self._emit(stream, logits[0], stream.prefill_ms, rank))]

    def _failed(self, stream: Stream, error: Exception) -> list[Outcome]:
        """A read that failed ends its stream alone (not reported if it was closed meanwhile)."""
        stream.cache = None  # a runtime that fails a call has released what it was given
        if stream.done:
            return []
        self.close(stream)
        return [(stream, error)]

    def _decode(self, batch: Batch) -> list[Outcome]:
        rows = batch.streams
        start = time.perf_counter()
        try:  # while the reader reads a prompt on one thread, the step runs on its other (same numbers)
            logits = batch.step(self.reader if self.in_flight is not None and self._on_reader(batch.rank) else None)
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
        return [(stream, self._emit(stream, logits[index], latency_ms, batch.rank))
                for index, stream in enumerate(batch.rows) if stream is not None]
