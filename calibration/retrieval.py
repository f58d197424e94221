"""A labelled retrieval benchmark that is offline on every machine: the first sentence of the
docstring of each public class and function in a set of Python standard-library modules is the
query; its qualified name (``json.dumps``) is the right answer among all the names. Scored as top-1
accuracy of sentence embeddings (cosine). About 500 items, deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Iterable

import numpy as np

from deploy.text import DOC_MODULES, SENTENCE_END, stdlib_source_sentences


def docstring_pairs(min_words: int = 5) -> list[tuple[str, str]]:
    """(query, answer) pairs: a docstring's first sentence and the qualified name it documents."""
    pairs, seen = [], set()
    for module_name in DOC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(member) or inspect.isclass(member)):
                continue
            if getattr(member, "__module__", None) != module.__name__:
                continue  # imported from elsewhere: documented there
            first = SENTENCE_END.split(" ".join((inspect.getdoc(member) or "").split("\n\n")[0].split()))[0]
            if len(first.split()) >= min_words and first not in seen:
                seen.add(first)
                pairs.append((first, f"{module_name}.{name}"))
    return pairs


def unseen_sentences(held_out: Iterable[str] = (), count: int | None = None,
                     pairs: list[tuple[str, str]] | None = None) -> list[str]:
    """Sentences to calibrate or train on that the evaluation never sees: the standard library's
    docstring sentences (``stdlib_source_sentences``) without this benchmark's queries (those of
    ``pairs``, default ``docstring_pairs()``) and without ``held_out``. Deterministic for a Python version."""
    excluded = {query for query, _ in (docstring_pairs() if pairs is None else pairs)} | set(held_out)
    return [s for s in stdlib_source_sentences() if s not in excluded][:count]


def top1_accuracy(embed: Callable[[list[str]], np.ndarray], pairs: list[tuple[str, str]]) -> float:
    """The share of queries whose nearest answer (cosine of ``embed``'s vectors) is their own."""
    queries = np.asarray(embed([q for q, _ in pairs]), np.float64)
    answers = np.asarray(embed([a for _, a in pairs]), np.float64)
    queries /= np.maximum(np.linalg.norm(queries, axis=-1, keepdims=True), 1e-12)
    answers /= np.maximum(np.linalg.norm(answers, axis=-1, keepdims=True), 1e-12)
    return float(np.mean(np.argmax(queries @ answers.T, axis=1) == np.arange(len(pairs))))


def dense_embedder(model_path, like):
    """Mean-pooled embeddings from a dense encoder export, tokenised like the NSN session ``like``."""
    import onnxruntime as ort

    from deploy.ort.session import input_shapes
    from deploy.text import encoder_feeds, mean_pool

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = input_shapes(session)

    def embed(texts):
        feeds = encoder_feeds(like.tokenizer, texts, names)
        return mean_pool(session.run(["last_hidden_state"], feeds)[0], feeds["attention_mask"])

    return embed


def cosine_to(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """The mean cosine of each embedding to the reference's row (1.0: identical directions)."""
    norms = np.linalg.norm(embeddings, axis=-1) * np.linalg.norm(reference, axis=-1)
    return round(float((np.sum(embeddings * reference, -1) / norms).mean()), 4)
