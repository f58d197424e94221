"""Tokenised datasets and padded batches for training and evaluation (reading data files and the
built-in English sentences is torch-free, in ``deploy.text``)."""

from __future__ import annotations

import torch

from deploy.text import english_sentences, load_records  # noqa: F401  (torch-free; used by the torch side too)


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
