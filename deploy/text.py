"""Tokenisation on the device, through the ``tokenizers`` library and the exported tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers.Tokenizer`` stored next to the graph, or ``None`` when there is none."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # we pad per batch ourselves, with a matching attention mask
    tokenizer.no_truncation()
    return tokenizer


def stop_token_ids(model_dir: str | Path) -> set[int]:
    """End-of-sequence ids named by ``generation_config.json`` or ``config.json``."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
    return ids


def encoder_feeds(tokenizer, texts: list[str], input_names, max_length: int = 512) -> dict[str, np.ndarray]:
    """An encoder's standard inputs for ``texts`` (those among ``input_names``): token ids,
    attention mask and token type ids, right-padded to the longest text."""
    tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids, mask, types = (np.zeros((len(encodings), width), np.int64) for _ in range(3))
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = e.attention_mask
        types[i, : len(e.ids)] = e.type_ids
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: value for name, value in feeds.items() if name in input_names}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: the mean of the token states where ``mask`` is 1."""
    weights = mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
