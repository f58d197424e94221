"""Tokenisation on the device, through the ``tokenizers`` library and the exported tokenizer.json.

Every file is read from inside the model directory (``confined_path``) and a damaged one is a
``ValueError`` that names it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .external_data import confined_path, read_json_object

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
