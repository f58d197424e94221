"""Text data for training and evaluation: files, JSONL, and English text that ships with Python."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import torch

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
    sentences: list[str] = []
    seen: set[str] = set()
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if inspect.isclass(member) or inspect.isfunction(member):
                docs.append(inspect.getdoc(member) or "")
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
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples; causal LMs get ``labels = input_ids``, labelled records keep ``labels``."""

    def __init__(self, records: list[dict], tokenizer, max_length: int = 128, causal_lm: bool = False):
        self.items = []
        for record in records:
            item = dict(tokenizer(record["text"], truncation=True, max_length=max_length))
            if causal_lm:
                item["labels"] = list(item["input_ids"])
            elif "label" in record:
                item["labels"] = int(record["label"])
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(tokenizer):
    """Pad a list of tokenised examples into a batch; padded label positions become -100."""
    # Padding pre-tokenised examples is what we want here; silence transformers' advice against it.
    getattr(tokenizer, "deprecation_warnings", {})["Asking-to-pad-a-fast-tokenizer"] = True

    def collate_fn(items: list[dict]) -> dict:
        labels = [item.get("labels") for item in items]
        features = [{k: v for k, v in item.items() if k != "labels"} for item in items]
        batch = dict(tokenizer.pad(features, return_tensors="pt"))
        if labels[0] is None:
            return batch
        if isinstance(labels[0], int):
            batch["labels"] = torch.tensor(labels)
            return batch
        width = batch["input_ids"].shape[1]
        padded = torch.full((len(labels), width), -100, dtype=torch.long)
        for row, seq in enumerate(labels):
            padded[row, : len(seq)] = torch.tensor(seq)
        if tokenizer.padding_side == "left":
            padded = torch.stack([torch.roll(p, width - len(s)) for p, s in zip(padded, labels)])
        batch["labels"] = padded
        return batch
    return collate_fn


def make_batches(records: list[dict], tokenizer, causal_lm: bool, batch_size: int, max_length: int) -> list[dict]:
    """Tokenise ``records`` and pad them into batches of ``batch_size`` (for evaluation)."""
    dataset = TokenizedDataset(records, tokenizer, max_length=max_length, causal_lm=causal_lm)
    collate_fn = collate(tokenizer)
    return [collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)]
