"""The one owner of the runtime: a scheduler thread that the HTTP routes hand jobs to.

Requests never touch the runtime. A route submits a ``Job`` and reads its events (tokens, then
``done`` or ``error``) from an asyncio queue; the scheduler thread runs the model:

- generations are batched continuously (``deploy.batch``): at each step every active generation
  that runs at the same rank decodes in one call, and prompts are read in chunks between steps,
  so a long prompt does not stall the streams; a request joins or leaves between two steps and a
  token is sent as soon as it is decoded. Without batching (``--no-batching``, a runtime that
  cannot batch) generations interleave token by token, round robin, each with its own KV cache;
- with a draft rank (self-speculative decoding), a generation that starts while nothing else runs
  drafts and runs by itself (a round verifies one sequence); the others are batched;
- embedding jobs waiting together are run together, grouped by the rank they may run at;
- before every step the rank is set to ``min(ceiling, job.max_rank)``: the governor moves the
  device's ceiling (``set_rank``, the governor's one interface), a request may only ask for less,
  and a job whose ``min_rank`` the ceiling falls below stops rather than run worse than it accepts;
- a job whose client went away stops at its next token and releases its cache;
- a failure while running one job ends that job alone (a 500 to its client); every other job
  keeps running (``_isolated``; a batched call that fails is retried one sequence at a time).

Waiting jobs are a FIFO bounded by ``max_queue`` (``QueueFull`` beyond: a 503 with Retry-After).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..batch import DEFAULT_PREFILL_CHUNK, MAX_STREAMS, Batcher
from ..speculative import Speculation

log = logging.getLogger("nsn.serve")

MAX_ACTIVE = MAX_STREAMS  # generations running at once (batched, or in turn); more wait in the queue
EMBED_BATCH_INPUTS = 64  # inputs of waiting embedding jobs run in one call


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_queue``."""


class Draining(RuntimeError):
    """The server is shutting down and takes no new work."""


class BelowMinRank(RuntimeError):
    """The device's rank ceiling is below the rank a request needs."""


@dataclass
class Job:
    """One request's work, and how its events reach the route (``emit`` is thread-safe)."""

    kind: str  # "generate" or "embed"
    emit: Callable[[str, dict], None]
    max_rank: int | None = None
    min_rank: int | None = None
    # generation
    prompt_ids: list[int] = field(default_factory=list)
    max_tokens: int = 16
    sampling: dict = field(default_factory=dict)  # do_sample, temperature, top_k, top_p, seed
    stop: list[str] = field(default_factory=list)
    # embedding
    inputs: list = field(default_factory=list)
    input_tokens: int = 0  # the tokens its inputs hold (what its usage reports)
    # state, owned by the scheduler thread
    created_s: float = field(default_factory=time.monotonic)
    started_s: float | None = None
    cancelled: bool = False  # set by the route when its client goes away
    finished: bool = False  # its last event was sent
    steps: object = None  # its generate_steps, when it runs alone
    stream: object = None  # its deploy.batch.Stream, when it runs batched
    text: object = None
    tokens: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    speculation: object = None  # a deploy.speculative.Speculation when the server drafts


class TextStream:
    """Token ids -> text deltas that are safe to send: whole characters only, nothing that could
    still turn out to be the start of a stop string, and the text cut at the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        self.text = self.tokenizer.decode(token_ids)
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        end = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        if not self.stopped and self.text.endswith("\ufffd"):  # half a multi-byte character
            end = min(end, len(self.text) - 1)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def rest(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


class Scheduler:
    """Owns ``runtime`` (an ``NSNSession`` or ``NSNEngine``) on one thread. ``set_rank`` is the
    governor's interface: it moves the ceiling every job runs under."""

    def __init__(self, runtime, max_queue: int = 64, metrics=None, max_active: int = MAX_ACTIVE,
                 draft_rank: int | None = None, draft_tokens: int = 4, batching: bool = True,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, read_beside: bool = False):
        self.runtime, self.max_queue, self.metrics, self.max_active = runtime, max_queue, metrics, max_active
        self.draft_rank, self.draft_tokens = draft_rank, draft_tokens  # self-speculative decoding, when set
        # continuous batching, where the runtime can; with a draft rank, a generation that starts alone
        # drafts instead (a speculative round verifies one sequence: it pays when the device is idle);
        # ``read_beside``: long prompts are read by a second runtime, where the runtime has one
        self.batcher = Batcher(runtime, prefill_chunk, reader=runtime.prompt_reader() if read_beside else None) if (
            batching and runtime.info.task == "text-generation"
            and runtime.supports_batching and (runtime.max_batch or 2) > 1) else None
        self.batch_size = 0  # sequences decoded in the latest step (the governor reads it)
        self.decode_calls = self.decoded_rows = 0  # totals, for the mean batch the page shows
        if self.batcher is not None:
            note = (f"continuous batching: one decode call per rank for every running generation, prompts read "
                    f"up to {self.batcher.prefill_chunk} tokens per step" + (
                        ", long ones on a thread of their own beside the steps" if self.reader is not None else ""))
            drafts = "a generation that starts alone"
        else:
            why = ("--no-batching" if not batching else "the engine was built for batch 1 (nsn-trt build --max-batch)"
                   if runtime.max_batch == 1 else f"{type(runtime).__name__} decodes one sequence per call")
            note, drafts = f"no batching ({why}): generations take turns, a token each", "each generation"
        self.batching = note + (f"; rank {draft_rank} drafts for {drafts}" if draft_rank is not None else "")
        self.info = runtime.info
        self.ceiling, why = runtime.default_ceiling()
        self.reason = f"no governor: {why}"
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.condition = threading.Condition()
        self.draining = self.stopped = False
        self.served = self.tokens_total = 0
        self.last_rank: int | None = None  # the rank the latest token or batch ran at
        self.last_latency_ms: float | None = None
        self._thread = threading.Thread(target=self._run, name="nsn-scheduler", daemon=True)

    @property
    def reader(self):
        """The second runtime that reads long prompts beside the steps (``deploy.batch``), if any."""
        return self.batcher.reader if self.batcher is not None else None

    def _prepare(self) -> None:
        """Build the ceiling's level beside serving (jobs use it once ready), the reader's too."""
        for runtime in (self.runtime, self.reader):
            if runtime is not None:
                runtime.prepare(self.ceiling)

    # ---- the governor's interface --------------------------------------------------------------------
    def set_rank(self, rank: int) -> None:
        self.ceiling = int(rank)
        self._prepare()
        if self.metrics is not None:
            self.metrics.ceiling(self.ceiling)

    @property
    def queue_s(self) -> float:
        """How long the oldest waiting request has waited (the governor's queue signal)."""
        waiting = self.waiting
        return time.monotonic() - waiting[0].created_s if waiting else 0.0

    def level_state(self) -> dict:
        """What runs the ceiling (``runtime.level_state``), and under ``reader`` what the long-prompt
        reader runs it on, where there is one."""
        state = self.runtime.level_state(self.ceiling)
        if self.reader is not None:
            state["reader"] = self.reader.level_state(self.ceiling)["runs_on"]
        return state

    @property
    def model_path(self):
        return getattr(self.runtime, "model_path", None)

    @property
    def plan(self):
        return getattr(self.runtime, "plan", None)

    # ---- what routes call ------------------------------------------------------------------------------
    def start(self) -> None:
        self._prepare()
        if self.draft_rank is not None:
            self.runtime.prepare_draft(self.draft_rank)
        self._thread.start()

    def rank_for(self, job: Job) -> int:
        """The rank a job runs at now: the ceiling, lowered to the job's ``max_rank``."""
        return min(self.ceiling, job.max_rank or self.ceiling)

    def check_min_rank(self, min_rank: int | None) -> None:
        if min_rank is not None and self.ceiling < min_rank:
            raise BelowMinRank(f"the device's rank ceiling is {self.ceiling} ({self.reason}), below the request's "
                               f"nsn.min_rank {min_rank}; retry later or lower min_rank")

    def submit(self, job: Job) -> None:
        with self.condition:
            if self.draining:
                raise Draining("the server is shutting down; retry on another instance")
            self.check_min_rank(job.min_rank)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue}); retry "
                                f"in a moment")
            self.waiting.append(job)
            self._gauges()
            self.condition.notify()

    def busy(self) -> int:
        return len(self.waiting) + len(self.active)

    def drain(self, timeout_s: float, cut: threading.Event | None = None) -> bool:
        """Take no new work; wait up to ``timeout_s`` (or until ``cut`` is set) for the jobs in hand.
        True when all finished."""
        deadline = time.monotonic() + timeout_s
        with self.condition:
            self.draining = True
            while self.busy() and time.monotonic() < deadline and not (cut and cut.is_set()):
                self.condition.wait(timeout=min(0.1, max(deadline - time.monotonic(), 0.001)))
            return not self.busy()

    def stop(self) -> None:
        """End the thread; jobs still in hand end with a 503 error event saying the server is stopping."""
        with self.condition:
            self.stopped = True
            self.condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ---- the scheduler thread ------------------------------------------------------------------------------
    @property
    def profile_switches(self) -> int | None:
        """TensorRT optimization profile switches so far (None on ONNX Runtime)."""
        return getattr(self.runtime, "profile_switches", None)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(running=len(self.active), waiting=len(self.waiting),
                               cache_tokens=sum(len(j.prompt_ids) + len(j.tokens) for j in self.active
                                                if j.started_s is not None), profile_switches=self.profile_switches)

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.active:
                    self.condition.wait()
                if self.stopped:
                    break
                embeds = self._take_embeddings()
                while self.waiting and self.waiting[0].kind == "generate" and len(self.active) < self.max_active:
                    self.active.append(self.waiting.popleft())
                self._gauges()
            if embeds:
                self._isolated(embeds, lambda: self._embed(embeds))
            if self.batcher is not None:
                self._isolated([job for job in self.active if job.steps is None], self._batched_step)
            for job in [job for job in self.active if job.steps is not None or self.batcher is None]:
                self._isolated([job], lambda: self._step(job))  # alone: no batching, or drafting
            with self.condition:
                self._gauges()
                self.condition.notify_all()
        for job in list(self.waiting) + list(self.active):
            self._finish(job, error=(503, "the server is shutting down; retry on another instance"))

    def _isolated(self, jobs: list[Job], work: Callable[[], None]) -> None:
        """Run ``work`` for ``jobs``; an exception ends those jobs alone (their clients get a 500) and
        every other job keeps running: one request can never end another's generation. Embedding jobs
        that failed together are retried one by one, so only the one at fault fails."""
        try:
            work()
        except Exception:
            pending = [job for job in jobs if not job.finished]
            if len(pending) > 1 and all(job.kind == "embed" for job in pending):
                for job in pending:
                    self._isolated([job], lambda job=job: self._embed([job]))
                return
            log.exception("a request failed while running the model; the others keep running")
            for job in pending:
                self._finish(job, error=(500, "internal error while running the model; see the server log"))

    def _take_embeddings(self) -> list[Job]:
        taken, inputs = [], 0
        while self.waiting and self.waiting[0].kind == "embed" and (not taken or inputs + len(
                self.waiting[0].inputs) <= EMBED_BATCH_INPUTS):
            job = self.waiting.popleft()
            taken.append(job)
            inputs += len(job.inputs)
        return taken

    def _embed(self, jobs: list[Job]) -> None:
        """Run waiting embedding jobs together, one call per rank they may run at."""
        jobs = [job for job in jobs if not self._dropped(job)]
        by_rank: dict[int, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            by_rank[self.rank_for(job)].append(job)
        for rank, group in by_rank.items():
            self.runtime.rank = rank
            start = time.monotonic()
            for job in group:
                job.started_s = start
            inputs = [item for job in group for item in job.inputs]
            vectors = self.runtime.embed(inputs, batch_size=self.runtime.max_batch or 32)
            self.last_latency_ms, self.last_rank = self.runtime.last_latency_ms, self.runtime.last_rank
            if self.metrics is not None:
                self.metrics.embedded(self.last_rank)
            offset = 0
            for job in group:
                count = len(job.inputs)
                job.ranks = [self.runtime.last_rank] * count
                self._finish(job, result={"embeddings": vectors[offset:offset + count]})
                offset += count

    def _dropped(self, job: Job) -> bool:
        """Finish a job whose client left (``abort``) or whose floor the ceiling fell below."""
        if job.cancelled:
            self._finish(job, reason="abort")
            return True
        if job.min_rank is not None and self.ceiling < job.min_rank:
            self._finish(job, reason="stop", note=f"stopped: the rank ceiling fell to {self.ceiling} ({self.reason}), "
                                                  f"below nsn.min_rank {job.min_rank}")
            return True
        return False

    def _begin(self, job: Job) -> None:
        job.started_s = time.monotonic()
        if self.metrics is not None:
            self.metrics.queued(job.started_s - job.created_s)
        job.text = TextStream(self.runtime.tokenizer, job.stop)

    def _start_alone(self, job: Job) -> None:
        """Start a generation that runs by itself (``generate_steps``), drafting when a draft rank is set."""
        self._begin(job)
        if self.draft_rank is not None:
            job.speculation = Speculation(self.draft_rank, self.draft_tokens)
        job.steps = self.runtime.generate_steps(job.prompt_ids, job.max_tokens, **job.sampling,
                                                speculative=job.speculation)

    def _open_stream(self, job: Job) -> None:
        """Start a generation in the batcher: its prompt is read from the next step on."""
        self._begin(job)
        job.stream = self.batcher.open(job.prompt_ids, job.max_tokens, **job.sampling, tag=job)

    def _step(self, job: Job) -> None:
        """One token of one job, alone (no batching)."""
        if self._dropped(job):
            return
        runtime = self.runtime
        if job.steps is None:
            self._start_alone(job)
        runtime.rank = self.rank_for(job)
        step = next(job.steps, None)
        if step is None:  # max_tokens reached on the previous step
            self._finish(job, reason="length")
            return
        self.batch_size = 1
        self.decode_calls += 1
        self.decoded_rows += 1
        if len(job.tokens) > 0:  # a decode step (the first token's call read the prompt)
            self.last_latency_ms = step.latency_ms
        self._emit_token(job, step)

    def _batched_step(self) -> None:
        """One step of every active job: one decode call per rank, and a chunk of new prompts."""
        for job in list(self.active):
            if not self._dropped(job) and job.stream is None and job.steps is None:
                if self.draft_rank is not None and len(self.active) == 1 and not self.batcher.streams:
                    self._isolated([job], lambda job=job: self._start_alone(job))  # alone on the device: it
                    continue  # drafts, and runs by itself to its end (the loop steps it)
                self._isolated([job], lambda job=job: self._open_stream(job))
        start = time.perf_counter()
        outcomes = self.batcher.step(lambda stream: self.rank_for(stream.tag))
        self.batch_size = sum(self.batcher.last_sizes)
        self.decode_calls += len(self.batcher.last_sizes)
        self.decoded_rows += self.batch_size
        if self.batch_size:  # what each running stream waited for its token (the governor's latency)
            self.last_latency_ms = (time.perf_counter() - start) * 1e3
        if self.metrics is not None:
            for size in self.batcher.last_sizes:
                self.metrics.batched(size)
        for stream, outcome in outcomes:
            if isinstance(outcome, Exception):
                log.error("a request failed while running the model; the others keep running",
                          exc_info=(type(outcome), outcome, outcome.__traceback__))
                self._finish(stream.tag, error=(500, "internal error while running the model; see the server log"))
            else:
                self._emit_token(stream.tag, outcome)

    def _emit_token(self, job: Job, step) -> None:
        now = time.monotonic()
        self.last_rank = step.rank
        self.tokens_total += 1
        job.tokens.append(step.token)
        job.ranks.append(step.rank)
        job.token_times.append(now)
        if self.metrics is not None:
            self.metrics.token(first=len(job.tokens) == 1, since_s=now - (job.token_times[-2] if len(
                job.token_times) > 1 else job.created_s), rank=step.rank)
        delta = job.text.add(job.tokens[:-1] if step.stop else job.tokens)
        job.emit("token", {"text": delta, "token": step.token, "rank": step.rank, "drafted": step.drafted})
        if job.text.stopped or step.stop:
            self._finish(job, reason="stop")
        elif len(job.tokens) >= job.max_tokens:
            self._finish(job, reason="length")

    def _finish(self, job: Job, reason: str | None = None, result: dict | None = None, note: str | None = None,
                error: tuple[int, str] | None = None) -> None:
        if job.finished:
            return
        job.finished = True
        if job.steps is not None:
            with contextlib.suppress(Exception):
                job.steps.close()  # releases the KV cache (device memory, for TensorRT)
            job.steps = None
        if job.stream is not None:
            self.batcher.close(job.stream)  # its row leaves the batch at the next step
            job.stream = None
        with self.condition:
            if job in self.active:
                self.active.remove(job)
            elif job in self.waiting:
                self.waiting.remove(job)
        if error is not None:
            job.emit("error", {"status": error[0], "message": error[1]})
            return
        finished = time.monotonic()
        if self.metrics is not None:
            self.metrics.finished(reason or "stop", finished - job.created_s, len(job.prompt_ids) or job.input_tokens,
                                  len(job.tokens))
            if job.speculation is not None:
                self.metrics.speculated(job.speculation.drafted, job.speculation.accepted)
        self.served += 1
        payload = dict(result or {})
        if job.kind == "generate":
            rest = job.text.rest() if job.text is not None else ""
            payload.update(finish_reason=reason, text_rest=rest, completion_tokens=len(job.tokens),
                           prompt_tokens=len(job.prompt_ids))
        payload["nsn"] = self.nsn_report(job, note)
        job.emit("done", payload)

    def nsn_report(self, job: Job, note: str | None = None) -> dict:
        """What every response says about ranks: the ranks its tokens ran at and what bound them."""
        ranks = job.ranks
        report = {"ceiling": self.ceiling, "governor": self.reason}
        if ranks:
            report.update(ranks={"first": ranks[0], "last": ranks[-1], "min": min(ranks),
                                 "mean": round(statistics.fmean(ranks), 2)},
                          flops_fraction=round(float(np.mean([self.info.flops_fraction(r) for r in ranks])), 4),
                          token_ranks=ranks if job.kind == "generate" else None)
        if job.speculation is not None:
            report["speculative"] = {"draft_rank": job.speculation.draft_rank, "drafted": job.speculation.drafted,
                                     "accepted": job.speculation.accepted, "switched_off": job.speculation.off}
        if note:
            report["note"] = note
        return {k: v for k, v in report.items() if v is not None}
