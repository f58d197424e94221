"""Tokenisation on the device, through the ``tokenizers`` library and the exported tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers.Tokenizer`` stored next to the graph, or ``None`` when there is none."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


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


def encode_batch(tokenizer, texts: list[str], max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, right-padded to the longest text."""
    encodings = tokenizer.encode_batch(texts)
    rows = [e.ids[:max_length] for e in encodings]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask
