"""Text on the device: tokenisation through the ``tokenizers`` library and the exported
tokenizer.json, data files (text or JSONL), and English sentences that ship with Python.

Every file is read from inside the model directory (``confined_path``) and a damaged one is a
``ValueError`` that names it.
"""

from __future__ import annotations

import ast
import importlib
import json
import inspect
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .external_data import NotRegularFileError, confined_path, read_json_object, read_regular_bytes

DEFAULT_MAX_LENGTH = 512


class TruncationWarning(UserWarning):
    """Some texts were longer than the model's maximum length and were cut."""


def read_model_json(model_dir: str | Path, name: str) -> dict:
    """A JSON object from the model directory (``{}`` when the file is absent)."""
    path = confined_path(model_dir, name)
    return read_json_object(path, "the file is corrupt, re-export the model") if path.is_file() else {}


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers.Tokenizer`` stored next to the graph, or ``None`` when there is none."""
    from tokenizers import Tokenizer

    path = confined_path(model_dir, "tokenizer.json")
    if not path.is_file():
        return None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises its own exception type
        raise ValueError(f"{path}: not a usable tokenizer ({error}); re-export the model with its tokenizer") from None
    tokenizer.no_padding()  # we pad per batch ourselves, with a matching attention mask
    tokenizer.no_truncation()
    return tokenizer


def stop_token_ids(model_dir: str | Path) -> set[int]:
    """End-of-sequence ids named by ``generation_config.json`` or ``config.json``."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        value = read_model_json(model_dir, name).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids


def model_max_length(model_dir: str | Path) -> int:
    """The longest input the model was built for: the smaller of the tokenizer's
    ``model_max_length`` and the config's ``max_position_embeddings`` (512 when neither says)."""
    limits = [read_model_json(model_dir, "tokenizer_config.json").get("model_max_length"),
              read_model_json(model_dir, "config.json").get("max_position_embeddings")]
    sane = [int(v) for v in limits if isinstance(v, (int, float)) and 1 <= v < 1_000_000]
    return min(sane) if sane else DEFAULT_MAX_LENGTH


def model_vocab_size(model_dir: str | Path, tokenizer=None) -> int | None:
    """The number of token ids the model embeds: ``config.json``'s ``vocab_size``, else the
    tokenizer's; ``None`` when neither says."""
    vocab = read_model_json(model_dir, "config.json").get("vocab_size")
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        return vocab
    return tokenizer.get_vocab_size() if tokenizer is not None else None


@dataclass
class TokenIdEncoding:
    """Token ids given by the caller, shaped like a ``tokenizers`` encoding."""
    ids: list[int]
    overflowing: bool = False

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.ids)

    @property
    def type_ids(self) -> list[int]:
        return [0] * len(self.ids)


def check_token_ids(ids, vocab_size: int | None, what: str = "token ids") -> list[int]:
    """``ids`` as a non-empty list of ints in ``[0, vocab_size)``; anything else is a ``ValueError``."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"{what} must be a list of integers, got {type(ids).__name__}")
    values = list(ids)
    if not values:
        raise ValueError(f"{what} is empty; give at least one token")
    upper = f"{vocab_size - 1}" if vocab_size else "the vocabulary's size - 1"
    for value in values:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{what} must be integers in [0, {upper}], got {value!r} ({type(value).__name__})")
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            raise ValueError(f"{what} must be in [0, {upper}] (the model's vocabulary), got {int(value)}")
    return [int(v) for v in values]


def encode_token_ids(sequences: list, max_length: int, vocab_size: int | None) -> list[TokenIdEncoding]:
    """Caller-given token id sequences, checked and cut at ``max_length`` (``TruncationWarning``)."""
    encodings = []
    for index, ids in enumerate(sequences):
        values = check_token_ids(ids, vocab_size, f"input {index}")
        encodings.append(TokenIdEncoding(values[:max_length], overflowing=len(values) > max_length))
    cut = sum(1 for e in encodings if e.overflowing)
    if cut:
        warnings.warn(f"{cut} of {len(sequences)} input(s) were longer than {max_length} tokens and were truncated",
                      TruncationWarning, stacklevel=3)
    return encodings


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list:
    """Token encodings cut at ``max_length``; warns (``TruncationWarning``) how many were cut."""
    tokenizer.enable_truncation(max_length)
    try:
        encodings = tokenizer.encode_batch(texts)
    finally:
        tokenizer.no_truncation()
    cut = sum(1 for e in encodings if e.overflowing)
    if cut:
        warnings.warn(f"{cut} of {len(texts)} text(s) were longer than {max_length} tokens and were truncated",
                      TruncationWarning, stacklevel=3)
    return encodings


def pad_encodings(encodings: list, input_names) -> dict[str, np.ndarray]:
    """An encoder's standard inputs (those among ``input_names``): token ids, attention mask and
    token type ids, right-padded to the longest encoding."""
    width = max(len(e.ids) for e in encodings)
    ids, mask, types = (np.zeros((len(encodings), width), np.int64) for _ in range(3))
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = e.attention_mask
        types[i, : len(e.ids)] = e.type_ids
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: value for name, value in feeds.items() if name in input_names}


def encoder_feeds(tokenizer, texts: list[str], input_names, max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """``pad_encodings`` of ``texts`` as one batch."""
    return pad_encodings(encode_texts(tokenizer, texts, max_length), input_names)


def length_sorted_batches(encodings: list, batch_size: int) -> list[list[int]]:
    """Indices of ``encodings`` in batches of at most ``batch_size``, shortest first, so a long
    text pads only its neighbours in length, not every text."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: the mean of the token states where ``mask`` is 1."""
    weights = mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


# Standard-library modules whose documentation is plain English prose, available offline.
DOC_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "gettext",
    "heapq", "http.client", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging",
    "mailbox", "pathlib", "pickle", "pydoc", "queue", "random", "shutil", "smtplib", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "wave", "zipfile",
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def english_sentences(count: int | None = None, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Deterministic English sentences from the docstrings of Python's standard library."""
    docs = []
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if inspect.isclass(member) or inspect.isfunction(member):
                docs.append(inspect.getdoc(member) or "")
    return prose_sentences(docs, count, min_words, max_words)


def stdlib_source_sentences(count: int | None = None, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Many more sentences (tens of thousands): every docstring in the standard library's source
    files, read with ``ast`` — nothing is imported or run. Deterministic for a Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        docs.extend(ast.get_docstring(node) or "" for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return prose_sentences(docs, count, min_words, max_words)


def prose_sentences(docs: list[str], count: int | None, min_words: int, max_words: int) -> list[str]:
    """The distinct sentences of ``docs`` that read as prose: ``min_words``..``max_words`` words,
    starting with a capital, nearly all letters (no code, no tables)."""
    sentences: list[str] = []
    seen: set[str] = set()
    for doc in docs:
        for paragraph in doc.split("\n\n"):
            text = " ".join(paragraph.split())
            for sentence in SENTENCE_END.split(text):
                words = sentence.split()
                letters = sum(ch.isalpha() or ch == " " for ch in sentence)
                if (min_words <= len(words) <= max_words and letters > 0.9 * len(sentence)
                        and sentence[0].isupper() and sentence not in seen):
                    seen.add(sentence)
                    sentences.append(sentence)
                    if count is not None and len(sentences) >= count:
                        return sentences
    return sentences


def load_records(path: str | Path) -> list[dict]:
    """Examples from a ``.jsonl`` file (objects with ``text`` and optionally ``label``) or a text
    file (one example per non-empty line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        lines = [line for line in read_regular_bytes(path).decode("utf-8").splitlines() if line.strip()]
    except NotRegularFileError as error:
        raise ValueError(f"data {error}: a text or JSONL file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    if not lines:
        raise ValueError(f"{path}: no examples (the file is empty or blank); give one example per line")
    if path.suffix != ".jsonl":
        return [{"text": line} for line in lines]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{number}: each line must be an object with a "text" string')
        records.append(record)
    return records
