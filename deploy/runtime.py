"""What every NSN runtime offers (ONNX Runtime's ``NSNSession``, TensorRT's ``NSNEngine``): one
validated ``rank``, ``set_rank`` for the governor, ``embed`` and the one generation loop. A runtime
supplies ``run`` (standard inputs -> outputs at the current rank) and ``decode_step``."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .metadata import NSNModelInfo, validate_rank, within_dense
from .speculative import Speculation, accept, check_speculation
from .text import (check_token_ids, encode_texts, encode_token_ids, length_sorted_batches, load_tokenizer, mean_pool,
                   model_max_length, model_vocab_size, pad_encodings, stop_token_ids)


# Sampling temperatures: 0 is greedy; otherwise within this range. Below the floor the distribution is
# argmax in all but name, and a subnormal temperature turns the scaled logits into inf and NaN.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 100.0


@dataclass(frozen=True)
class Step:
    """One generated token: its id, the rank it ran at, the decode call's latency (a speculative
    round's, shared by the tokens it kept), whether it is a stop token (the last step), and whether
    a speculative draft proposed it (and the target kept it)."""
    token: int
    rank: int
    latency_ms: float
    stop: bool = False
    drafted: bool = False


@dataclass
class Generation:
    token_ids: list[int]
    text: str | None
    ranks: list[int] = field(default_factory=list)
    step_latency_ms: list[float] = field(default_factory=list)
    drafted: int = 0  # speculative decoding: tokens the draft rank proposed
    accepted: int = 0  # ... and the target rank kept

    @property
    def prefill_ms(self) -> float:
        return self.step_latency_ms[0] if self.step_latency_ms else 0.0

    @property
    def decode_ms_per_token(self) -> float:
        steps = self.step_latency_ms[1:]
        return sum(steps) / len(steps) if steps else 0.0


class NonFiniteOutputWarning(RuntimeWarning):
    """The model produced NaN or inf: its weights are damaged or it overflowed."""


def warn_if_not_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        warnings.warn(f"the model produced NaN or inf {what}; its weights (model.onnx_data) are damaged or "
                      f"from another export: re-export it", NonFiniteOutputWarning, stacklevel=3)


def decoder_feeds(shapes: dict[str, list], input_ids: np.ndarray, past: list | None = None,
                  past_length: int = 0, attention_mask: np.ndarray | None = None,
                  position_ids: np.ndarray | None = None) -> dict:
    """The standard inputs of one decoder call: ids, an attention mask (default: every position),
    positions (when the graph takes them; default: ``past_length`` on) and the KV cache in input
    order — ``past``, or empty tensors at prefill."""
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones((batch, past_length + length), np.int64)
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in shapes:
        feeds["position_ids"] = position_ids if position_ids is not None else np.tile(
            np.arange(past_length, past_length + length, dtype=np.int64), (batch, 1))
    past_names = [name for name in shapes if name.startswith("past_key_values.")]
    if past is None:
        past = [np.zeros((batch, shapes[name][1], 0, shapes[name][3]), np.float32) for name in past_names]
    feeds.update(zip(past_names, past))
    return feeds


def prompt_ids(prompt: str | list[int], tokenizer, vocab_size: int | None, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt: text through ``tokenizer``, or ids checked against the vocabulary."""
    if not isinstance(prompt, str):
        return check_token_ids(prompt, vocab_size, "the prompt's token ids")
    if tokenizer is None:
        raise ValueError("this export has no tokenizer.json, so it cannot read text; give token ids (a list of "
                         "integers) instead, or re-export from a checkpoint saved with its tokenizer")
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
    if not ids:
        raise ValueError("the prompt is empty; give at least one token")
    return ids


class NSNRuntime:
    """The shared half of a runtime. Subclasses set ``info`` (``NSNModelInfo``), ``tokenizer``,
    ``vocab_size``, ``stop_ids``, ``max_length``, ``model_dir``, ``input_names``, ``hidden_size`` and ``_rank``, and
    implement ``run`` and ``decode_step``."""

    info: NSNModelInfo
    last_rank: int | None = None  # the rank the latest call ran at (read once per call)
    last_latency_ms: float | None = None  # the latest decode step's or embed batch's latency
    max_batch: int | None = None  # the largest batch the runtime accepts (a TensorRT engine's profiles)

    @property
    def rank(self) -> int:
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = validate_rank(value, self.info.max_rank)

    def set_rank(self, value: int) -> None:
        """The governor's interface: run at ``value`` from now on (assigning ``rank``), and prepare its
        level where the runtime materialises levels (``NSNSession``)."""
        self.rank = value
        self.prepare(self._rank)

    def prepare(self, rank: int, wait: bool = False):
        """Get ready to run ``rank`` at its best (``NSNSession`` builds its level); a no-op here."""
        validate_rank(rank, self.info.max_rank)

    def prepare_draft(self, rank: int, wait: bool = False):
        """Get a speculative draft rank ready beside the governed one (``NSNSession``: its own level)."""
        validate_rank(rank, self.info.max_rank)

    def level_flops(self, rank: int, context_length: int = 0) -> int:
        """FLOPs per token at ``rank`` as this runtime runs it (here: the factors' at every rank)."""
        return self.info.flops(rank, context_length)

    def level_fraction(self, rank: int) -> float:
        """``level_flops(rank)`` against the dense model's FLOPs per token, rounded to 4 places."""
        return round(self.level_flops(rank) / self.info.dense_flops, 4)

    def level_state(self, rank: int | None = None) -> dict:
        """What runs ``rank`` (default: the current one); this runtime has no materialised levels."""
        return {"rank": self._rank if rank is None else rank, "levels": "off"}

    def default_ceiling(self) -> tuple[int, str]:
        """The rank to run when no policy says otherwise, and why: the highest rank whose cost as this
        runtime runs it (``level_flops``) is at most the dense model's."""
        top, dense = self.info.max_rank, self.info.dense_flops
        rank = within_dense(range(1, top + 1), self.level_flops, dense)[-1]
        cost = self.level_flops(rank) / dense
        if rank == top:
            return rank, f"the model's maximum rank, {cost:.2f}x the dense model's FLOPs as it runs here"
        return rank, (f"the highest rank that costs no more than the dense model ({cost:.2f}x its FLOPs; rank {top} "
                      f"would cost {self.level_flops(top) / dense:.2f}x)")

    def load_text_files(self, model_dir, max_length: int | None = None) -> None:
        """The tokenizer, stop tokens and longest input (capped at ``max_length``) from ``model_dir``."""
        self.tokenizer = load_tokenizer(model_dir)
        self.vocab_size = model_vocab_size(model_dir, self.tokenizer)
        self.stop_ids = stop_token_ids(model_dir)
        longest = model_max_length(model_dir)
        self.max_length = min(longest, max_length) if max_length else longest

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode_step(self, token_ids: np.ndarray, cache, past_length: int, logits: bool = True,
                    rank: int | None = None):
        """One decoder call (``cache`` None at prefill) at the current rank or ``rank``: ``(logits
        of the last position, new cache)``. ``logits=False``: nobody reads them (a prompt chunk
        before the last); a runtime may skip the LM head and return None for them."""
        raise NotImplementedError

    def release_cache(self, cache) -> None:
        """Give back a KV cache that will not be used again (device memory, for TensorRT)."""

    @property
    def supports_batching(self) -> bool:
        """Whether ``decode_batch`` runs here: it needs a graph that takes ``position_ids`` (rows of
        different lengths share a call through the mask and their own positions)."""
        return False

    def decode_batch(self, token_ids: np.ndarray, cache, attention_mask: np.ndarray, position_ids: np.ndarray):
        """One decode call for several sequences at the current rank (``deploy.batch``): one new token
        per row, each row's cache left-padded to the batch's length and ``attention_mask`` hiding the
        padding. Returns ``(logits, one row per sequence; the new cache)``."""
        raise NotImplementedError

    def host_cache(self, cache) -> list[np.ndarray]:
        """A cache as numpy arrays, to lay out again when sequences join or leave a batch."""
        return [np.asarray(value) for value in cache]

    def level_ready(self, rank: int) -> bool:
        """Whether ``rank`` runs on a built level (ONNX Runtime's materialised ranks)."""
        return False

    def prompt_reader(self):
        """A second runtime of the same model on one thread, to read a long prompt beside the
        batched decode steps and run those steps on another thread meanwhile (``deploy.batch``);
        None where there is none."""
        return None

    def read_row(self, cache, index: int, width: int, length: int) -> list[np.ndarray]:
        """Row ``index``'s last ``length`` positions of a batch's cache ``width`` positions wide, as
        a one-row cache on the host (a sequence leaving its batch to go on in another)."""
        return [np.ascontiguousarray(array[index:index + 1, :, width - length:]) for array in self.host_cache(cache)]

    def write_row(self, cache, index: int, width: int, own, length: int) -> bool:
        """Write a joining sequence's own one-row cache ``own`` (``length`` positions) into row
        ``index`` of a batch's cache ``width`` positions wide, right-aligned, in place; False where
        this runtime cannot, and the batch is laid out again."""
        return False

    # ---- encoders -------------------------------------------------------------------------
    def embed(self, texts: list[str] | str | list[list[int]], normalize: bool = True, max_length: int | None = None,
              batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings, one row per input in order: the attention-masked mean of
        ``last_hidden_state`` (L2-normalised unless ``normalize=False``). Inputs are texts, or lists
        of token ids (no tokenizer needed).

        Inputs run in batches of at most ``batch_size``, grouped by length, so peak memory depends on
        the batch, not on how many inputs there are. Inputs longer than ``max_length`` (default and
        upper bound: the model's maximum) are cut, with a ``TruncationWarning``; NaN or inf in the
        result gives a ``NonFiniteOutputWarning`` (the weights are damaged)."""
        if self.info.task != "feature-extraction":
            raise ValueError(f"embed needs an encoder export (task feature-extraction), this one is {self.info.task}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        max_length = self._checked_max_length(max_length)
        batch_size = min(batch_size, self.max_batch or batch_size)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.hidden_size), np.float32)
        if all(isinstance(t, str) for t in texts):
            self._require_tokenizer()
            encodings = encode_texts(self.tokenizer, texts, max_length)
        elif not any(isinstance(t, str) for t in texts):
            encodings = encode_token_ids(texts, max_length, self.vocab_size)
        else:
            raise ValueError("embed takes texts or lists of token ids, not a mix of both; give one kind")
        order, parts = [], []
        for batch in length_sorted_batches(encodings, batch_size):
            feeds = pad_encodings([encodings[i] for i in batch], self.input_names)
            start = time.perf_counter()
            hidden = self.run(feeds, ["last_hidden_state"])["last_hidden_state"]
            self.last_latency_ms = (time.perf_counter() - start) * 1e3
            parts.append(mean_pool(hidden, feeds["attention_mask"]))
            order += batch
        pooled = np.empty((len(texts), parts[0].shape[-1]), parts[0].dtype)
        pooled[order] = np.concatenate(parts)
        warn_if_not_finite(pooled, "embeddings")
        if normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled

    # ---- decoders -------------------------------------------------------------------------
    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_dir} has no tokenizer.json, so it cannot read text; give token ids "
                             f"(lists of integers) instead, or re-export from a checkpoint saved with its tokenizer")

    def _checked_max_length(self, max_length) -> int:
        if max_length is None:
            return self.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= self.max_length:
            raise ValueError(f"max_length must be an integer in [1, {self.max_length}] (the model's longest input), "
                             f"got {max_length!r}")
        return max_length

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids: text through the tokenizer, or ids checked against the vocabulary."""
        if self.info.task != "text-generation":
            raise ValueError(f"generate needs a decoder export (task text-generation), this one is {self.info.task}")
        if isinstance(prompt, str):
            self._require_tokenizer()
        return prompt_ids(prompt, self.tokenizer, self.vocab_size)

    def reply_text(self, token_ids: list[int]) -> str:
        """The text of generated ``token_ids`` without the stop token that ended them (it ends the
        turn; it is not part of the reply), as the server sends it."""
        if token_ids and token_ids[-1] in self.stop_ids:
            token_ids = token_ids[:-1]
        return self.tokenizer.decode(token_ids)

    supports_speculation = False  # a runtime with decode_positions and truncate_cache can verify drafts
    max_draft_tokens: int | None = None  # drafts one verify call may hold (None: no limit)

    def generate_steps(self, prompt_ids: list[int], max_new_tokens: int = 32, do_sample: bool = False,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                       stop_ids: set[int] | None = None, speculative: Speculation | None = None) -> Iterator[Step]:
        """The one generation loop: one ``Step`` per new token, at whatever ``rank`` is set when the
        step runs (batch 1, with a KV cache). The caller may change ``rank`` between steps, or stop
        early (``close()``): the cache is released either way. The sampling options are checked
        here, before the first step.

        ``speculative`` (a ``deploy.speculative.Speculation``): each round, the draft rank proposes
        ``k`` tokens and the current rank verifies them in one call (``deploy.speculative``); the
        output is the current rank's own, greedy token for token. Rounds where the draft rank is
        not below the current rank run plainly."""
        sampling, stops = self.generation_options(max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop_ids)
        if speculative is not None and not self.supports_speculation:
            raise ValueError(f"{type(self).__name__} cannot verify drafts here (a TensorRT engine needs decode "
                             f"profiles built with nsn-trt build --draft-tokens K); generate without speculative")
        if speculative is not None:
            check_speculation(speculative.draft_rank, speculative.k, self.info.max_rank)
            if self.max_draft_tokens is not None:  # what one verify call may hold (an engine's profiles)
                speculative.max_k = min(speculative.max_k, self.max_draft_tokens)
                speculative.k = min(speculative.k, speculative.max_k)
            self.prepare_draft(speculative.draft_rank)  # its level builds beside; the views draft meanwhile
        return self._steps(prompt_ids, max_new_tokens, sampling, seed, stops, speculative)

    def generation_options(self, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float,
                           seed: int | None, stop_ids: set[int] | None):
        """The sampling options checked (one rule for every way to generate): ``(sampling, stops)``,
        ``sampling`` None when greedy, else ``(temperature, top_k, top_p)``."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if do_sample and not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                              and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] when "
                             f"sampling (0 is greedy: do_sample=False), got {temperature!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        sampling = (temperature, top_k, top_p) if do_sample else None
        return sampling, self.stop_ids if stop_ids is None else set(stop_ids)

    def _steps(self, prompt_ids, max_new_tokens, sampling, seed, stops, speculation):
        random = np.random.default_rng(seed)
        sequence = list(prompt_ids)
        cache, past = None, 0  # the current rank's cache holds sequence[:past]
        draft = (None, 0)  # the draft rank's cache, and how much of the sequence it holds
        emitted = 0
        try:
            while emitted < max_new_tokens:
                start = time.perf_counter()
                proposals, draft_probs = [], []
                room = max_new_tokens - emitted - 1
                if (speculation is not None and cache is not None and room and speculation.ready
                        and speculation.draft_rank < self._rank):
                    draft, proposals, draft_probs = self._draft(sequence, draft, speculation.draft_rank,
                                                                min(speculation.k, room), sampling, random)
                pending = np.array([sequence[past:] + proposals], np.int64)
                if proposals:
                    logits, cache = self.decode_positions(pending, cache, past)
                    rows = logits[-len(proposals) - 1:]
                else:
                    logits, cache = self.decode_step(pending, cache, past)
                rank = self.last_rank  # the rank that call ran at (a governor may move it)
                if proposals:
                    tokens, kept = self._verify(rows, proposals, draft_probs, sampling, random)
                    speculation.learn(len(proposals), kept)
                    past += pending.shape[1] - (len(proposals) - kept)
                    if kept < len(proposals):
                        cache = self.truncate_cache(cache, past)
                    if draft[1] > past:  # the draft holds rejected proposals too
                        draft = (self.truncate_cache(draft[0], past), past)
                else:
                    tokens, kept = [self.choose(logits[0], sampling, random)], 0
                    past += pending.shape[1]
                    if speculation is not None and draft[0] is None and speculation.draft_rank < self._rank:
                        # the draft reads the prompt with it: later rounds catch up a token or two
                        draft = (self.decode_positions(pending, None, 0, rank=speculation.draft_rank)[1],
                                 pending.shape[1])
                self.last_latency_ms = (time.perf_counter() - start) * 1e3
                if speculation is not None and pending.shape[1] - len(proposals) == 1:  # a decode round
                    speculation.timed(bool(proposals), self.last_latency_ms, len(tokens))
                for index, token in enumerate(tokens):
                    emitted += 1
                    sequence.append(token)
                    yield Step(token, rank, self.last_latency_ms / len(tokens), token in stops, index < kept)
                    if token in stops or emitted >= max_new_tokens:
                        return
        finally:
            self.release_cache(cache)
            self.release_cache(draft[0])

    def _draft(self, sequence: list[int], draft, rank: int, count: int, sampling, random):
        """``count`` tokens proposed at the draft ``rank`` (catching its cache up on the sequence
        first): ``((cache, held), proposals, their distributions)``."""
        cache, held = draft
        proposals, probs = [], []
        step = sequence[held:]
        for _ in range(count):
            logits, cache = self.decode_positions(np.array([step], np.int64), cache, held, rank=rank)
            held += len(step)
            if sampling is None:
                token = int(np.argmax(logits[-1]))
            else:
                probs.append(self._probabilities(logits[-1], *sampling))
                token = int(random.choice(len(probs[-1]), p=probs[-1]))
            proposals.append(token)
            step = [token]
        return (cache, held), proposals, probs

    def _verify(self, rows: np.ndarray, proposals: list[int], draft_probs: list, sampling, random):
        """The tokens a round keeps: the longest prefix of ``proposals`` the target accepts, then one
        of its own (a correction, or the token after them all); and how many proposals were kept."""
        for index, proposal in enumerate(proposals):
            if sampling is None:
                token = int(np.argmax(rows[index]))
                if token != proposal:
                    return proposals[:index] + [token], index
            else:
                kept, token = accept(proposal, self._probabilities(rows[index], *sampling), draft_probs[index], random)
                if not kept:
                    return proposals[:index] + [token], index
        return proposals + [self.choose(rows[-1], sampling, random)], len(proposals)

    def decode_positions(self, token_ids: np.ndarray, cache, past_length: int, rank: int | None = None):
        """One call on one sequence: the logits of every new position, and the new cache
        (runtimes that support speculative decoding)."""
        raise NotImplementedError

    def truncate_cache(self, cache, length: int):
        """The cache cut back to its first ``length`` positions (runtimes that support speculation)."""
        raise NotImplementedError

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_ids: set[int] | None = None, rank_at: Callable[[int], int | None] | None = None,
                 top_p: float = 1.0, speculative: Speculation | None = None) -> Generation:
        """Greedy or sampled generation with a KV cache (batch 1).

        ``rank_at(step)`` (step 0 is the prompt) may return a new rank before each step; the cache
        is kept, so earlier keys and values keep the rank they were computed at. ``speculative``:
        see ``generate_steps``; its counts end up in ``drafted`` and ``accepted``.
        """
        prompt_ids = self.encode_prompt(prompt)
        steps = self.generate_steps(prompt_ids, max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop_ids,
                                    speculative)
        result = Generation([], None)
        with contextlib.closing(steps):
            for index in range(max_new_tokens):
                if rank_at is not None and (new_rank := rank_at(index)) is not None:
                    self.rank = new_rank
                step = next(steps)
                result.token_ids.append(step.token)
                result.ranks.append(step.rank)
                result.step_latency_ms.append(step.latency_ms)
                if step.stop:
                    break
        if speculative is not None:
            result.drafted, result.accepted = speculative.drafted, speculative.accepted
        if self.tokenizer is not None:
            result.text = self.tokenizer.decode(result.token_ids)
        return result

    @classmethod
    def choose(cls, logits: np.ndarray, sampling, random) -> int:
        """The next token: greedy (``sampling`` None), or sampled from ``_probabilities(logits, *sampling)``."""
        if sampling is None:
            return int(np.argmax(logits))
        probs = cls._probabilities(logits, *sampling)
        return int(random.choice(len(probs), p=probs))

    @staticmethod
    def _probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
        """The temperature-scaled distribution cut to the ``top_k`` most likely tokens and then to the
        smallest set whose probability reaches ``top_p`` (nucleus), in float64."""
        scores = logits.astype(np.float64) / temperature
        if top_k and top_k < len(scores):
            cutoff = np.partition(scores, -top_k)[-top_k]
            scores = np.where(scores < cutoff, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            keep = np.cumsum(probs[order]) - probs[order] < top_p  # the most likely always stays
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return probs


def open_runtime(model_dir: Path, intra_op_threads: int | None = None, levels: bool = True):
    """An ``NSNEngine`` for an engine directory, else an ``NSNSession`` (with materialised levels
    unless ``levels`` is false)."""
    model_dir = Path(model_dir)
    if (model_dir / "engine.json").is_file():
        from .tensorrt.engine import NSNEngine

        return NSNEngine(model_dir)
    from .ort.session import NSNSession

    return NSNSession(model_dir, intra_op_threads=intra_op_threads, levels=None if levels else False)
