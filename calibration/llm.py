"""Benchmarks of a causal LM at one rank, on text any machine has and no training run saw:

- **perplexity** on held-out prose: the 5 % of the corpus's package docstrings that
  ``calibration.corpus.is_held_out`` keeps out of every training and calibration set, packed into
  sequences of a fixed number of tokens;
- **agreement**: the share of those positions where the rank's greedy next token is the dense
  model's;
- **multiple choice** (zero-shot, scored as lm-evaluation-harness scores ``acc``: the summed
  log-likelihood of each continuation): a Debian manual page's NAME description -> which of 4
  commands it documents. Chance is 0.25; no manual page is training text.

Everything here is torch-free. A model enters through a *scorer*: ``score(sequences)`` returns, for
each token-id sequence, the log-probability of every token given the ones before it and the most
likely next token at every position (both of length ``len(sequence) - 1``). ``nsn_export.evaluate``
makes one from a PyTorch model at a rank; ``onnx_scorer`` makes one from an ONNX Runtime session.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

Scorer = Callable[[list[list[int]]], list[tuple[np.ndarray, np.ndarray]]]
CHOICES = 4
MC_CHANCE = 1 / CHOICES
# The packages whose held-out docstring sentences the perplexity and agreement benchmarks read
# (parsed in seconds; every package's held-out 5 % is out of every training set anyway).
EVAL_PACKAGES = ("numpy", "scipy", "networkx", "matplotlib")


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    options: tuple[str, ...]
    answer: int


def held_out_sequences(tokenizer_encode: Callable[[str], list[int]], count: int = 32, length: int = 128,
                       packages=None) -> list[list[int]]:
    """``count`` sequences of exactly ``length`` tokens of held-out docstring sentences, packed end to
    end, in a fixed order."""
    from .corpus import CORPUS_PACKAGES, is_held_out, package_sentences

    sentences = [s for s in package_sentences(packages or CORPUS_PACKAGES) if is_held_out(s)]
    sentences.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return [example["input_ids"] for example in pack_sentences(sentences, tokenizer_encode, length, count)]


def pack_sentences(sentences: list[str], encode: Callable[[str], list[int]], length: int,
                   count: int | None = None) -> list[dict]:
    """Sentences tokenised and packed end to end (a space between them) into at most ``count``
    examples of exactly ``length`` tokens (``input_ids``, ``attention_mask``): no padding to train on."""
    examples, current = [], []
    for sentence in sentences:
        current += encode((" " if current else "") + sentence)
        while len(current) >= length:
            examples.append({"input_ids": current[:length], "attention_mask": [1] * length})
            current = current[length:]
        if count is not None and len(examples) >= count:
            break
    return examples[:count]


def manpage_choices(pairs: list[tuple[str, str]], choices: int = CHOICES) -> list[ChoiceItem]:
    """Each (description, command) pair as a ``choices``-way item: its command and the commands of
    ``choices - 1`` other pages (the ones whose hash with this command is smallest), in an order
    fixed by hashing."""
    items = []
    commands = [command for _, command in pairs]
    for description, command in pairs:
        others = sorted((c for c in commands if c != command),
                        key=lambda c: hashlib.sha256(f"{command}/{c}".encode()).hexdigest())[: choices - 1]
        options = sorted([command, *others], key=lambda c: hashlib.sha256(f"{description}/{c}".encode()).hexdigest())
        items.append(ChoiceItem(f"Manual page: {description}.\nCommand:", tuple(f" {o}" for o in options),
                                options.index(command)))
    return items


def perplexity_and_agreement(score: Scorer, sequences: list[list[int]],
                             dense_tokens: list[np.ndarray] | None = None) -> tuple[float, float | None, list]:
    """(perplexity, agreement with ``dense_tokens`` or None, this model's greedy tokens)."""
    scored = score(sequences)
    logprobs = np.concatenate([lp for lp, _ in scored])
    greedy = [tokens for _, tokens in scored]
    agreement = None
    if dense_tokens is not None:
        agreement = float(np.mean(np.concatenate(greedy) == np.concatenate(dense_tokens)))
    return float(np.exp(-logprobs.mean())), agreement, greedy


def choice_accuracy(score: Scorer, items: list[ChoiceItem], encode: Callable[[str], list[int]]) -> float:
    """Accuracy on ``items``: the option whose tokens are most likely after the context wins."""
    sequences, spans = [], []
    for item in items:
        context = encode(item.context)
        for option in item.options:
            continuation = encode(item.context + option)[len(context):] or encode(option)
            sequences.append(context + continuation)
            spans.append(len(continuation))
    scored = score(sequences)
    totals = [float(logprobs[-span:].sum()) for (logprobs, _), span in zip(scored, spans)]
    correct = 0
    for index, item in enumerate(items):
        options = totals[index * len(item.options):(index + 1) * len(item.options)]
        correct += int(np.argmax(options)) == item.answer
    return correct / len(items) if items else float("nan")


@dataclass
class LLMBenchmarks:
    """The three benchmarks, built once: ``score(scorer, reference)`` measures one model (a rank, or
    the dense model) on them, agreement against the ``reference`` greedy tokens when given."""

    encode: Callable[[str], list[int]]
    sequences: list[list[int]]
    items: list[ChoiceItem]

    @classmethod
    def build(cls, encode: Callable[[str], list[int]], sequences: int = 16, length: int = 128, choices: int = 100,
              packages=EVAL_PACKAGES) -> "LLMBenchmarks":
        from .corpus import manpage_pairs

        return cls(encode, held_out_sequences(encode, sequences, length, packages),
                   manpage_choices(manpage_pairs()[:choices]))

    def score(self, scorer: Scorer, reference: list[np.ndarray] | None = None) -> tuple[dict, list[np.ndarray]]:
        """``({"perplexity", "agreement", "choice_accuracy"}, this model's greedy tokens)``; agreement
        is 1.0 without a reference (the model is its own), choice accuracy None without items."""
        perplexity, agreement, greedy = perplexity_and_agreement(scorer, self.sequences, reference)
        return {"perplexity": round(perplexity, 3), "agreement": 1.0 if agreement is None else round(agreement, 4),
                "choice_accuracy": round(choice_accuracy(scorer, self.items, self.encode), 4) if self.items
                else None}, greedy


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(logits)[t, targets[t]]`` for each position, in float64."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    normaliser = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logits[np.arange(len(targets)), targets] - normaliser


def onnx_scorer(runtime) -> Scorer:
    """A scorer over an ``NSNSession`` at its current rank: one prefill call per sequence."""
    from deploy.runtime import decoder_feeds

    def score(sequences):
        results = []
        for sequence in sequences:
            feeds = decoder_feeds(runtime.input_shapes, np.array([sequence], np.int64))
            logits = runtime.run(feeds, ["logits"])["logits"][0, :-1]
            results.append((log_softmax_at(logits, np.array(sequence[1:])), logits.argmax(-1)))
        return results

    return score


class PlainDecoder:
    """A dense decoder exported by Optimum (``text-generation-with-past``), run with ONNX Runtime:
    the baseline an NSN export is compared with. It offers what ``onnx_scorer`` needs (``run``,
    ``input_shapes``) and greedy generation with its KV cache."""

    def __init__(self, model_path, threads: int | None = None):
        import onnxruntime as ort

        from deploy.ort.session import input_shapes

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_shapes = input_shapes(self.session)
        self.presents = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]

    def run(self, feeds: dict, outputs: list[str]) -> dict:
        return dict(zip(outputs, self.session.run(outputs, feeds)))

    def generate(self, prompt_ids: list[int], max_new_tokens: int,
                 stop_ids: set[int]) -> tuple[list[int], float, float]:
        """Greedy tokens, prefill ms and decode ms per token."""
        import time

        from deploy.runtime import decoder_feeds

        tokens, times, past, length = [], [], None, 0
        step = np.array([prompt_ids], np.int64)
        for _ in range(max_new_tokens):
            start = time.perf_counter()
            logits, *past = self.session.run(["logits", *self.presents],
                                              decoder_feeds(self.input_shapes, step, past, length))
            times.append((time.perf_counter() - start) * 1e3)
            length += step.shape[1]
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] in stop_ids:
                break
            step = np.array([[tokens[-1]]], np.int64)
        return tokens, times[0], float(np.mean(times[1:])) if len(times) > 1 else 0.0
