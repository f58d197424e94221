"""Verify an exported graph against PyTorch: ONNX Runtime and torch at several ranks, for prefill and
for a decode step that reuses the KV cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deploy.ort.session import input_shapes, open_session
from deploy.runtime import decoder_feeds

from .surgery import max_rank as model_max_rank
from .surgery import rank as at_rank

# fp32 tolerance: max |onnx - torch| over every output, relative to max |torch|.
TOLERANCE = 1e-4


class VerificationError(ValueError):
    """The exported graph does not match PyTorch within the tolerance."""


@dataclass
class RankCheck:
    rank: int
    kind: str
    phase: str
    max_abs_error: float
    max_rel_error: float
    passed: bool

    def as_row(self) -> dict:
        row = asdict(self)
        row["max_abs_error"] = f"{self.max_abs_error:.2e}"
        row["max_rel_error"] = f"{self.max_rel_error:.2e}"
        return row


def verification_ranks(top: int, trained: list[int]) -> list[tuple[int, str]]:
    """At least five ranks: the minimum, the maximum, a trained one, an untrained one, one in between."""
    chosen: dict[int, str] = {1: "min", top: "max"}
    trained_inner = [r for r in trained if r not in chosen]
    if trained_inner:
        chosen.setdefault(trained_inner[len(trained_inner) // 2], "trained")
    middle = max(1, top // 2)
    candidates = [middle, top // 4, (3 * top) // 4, middle + 1, 2, top - 1]
    for r in candidates:
        if 1 <= r <= top and r not in chosen and r not in trained:
            chosen[r] = "untrained"
            break
    for r in candidates:
        if 1 <= r <= top and r not in chosen:
            chosen[r] = "between"
            if len(chosen) >= 5:
                break
    return sorted(chosen.items())


def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """``(max abs error, max relative error)``; infinite when the graph produced NaN or inf."""
    if not np.all(np.isfinite(actual)):
        return float("inf"), float("inf")
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return diff, diff / max(scale, 1e-12)


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers cache object or legacy tuple."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [tuple(pair) for pair in cache]


def session_for(path: Path):
    """A plain CPU session on the graph as exported (no weight views, no int8 kernels), its weights
    checked first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # An int8 export's DequantizeLinear -> MatMul pairs would be fused into int8 kernels that also round
    # the activations; verification checks the graph's own arithmetic, so it keeps them apart.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return open_session(Path(path), options, ["CPUExecutionProvider"], weight_views=False)[0]


def verify_decoder(session, model, rank_value: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    generator = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    prompt = generator.integers(0, vocab, (2, 6)).astype(np.int64)
    step = generator.integers(0, vocab, (2, 1)).astype(np.int64)
    rank_feed = np.array(rank_value, np.int64)
    output_names = [o.name for o in session.get_outputs()]
    shapes = input_shapes(session)

    prefill = session.run(None, {**decoder_feeds(shapes, prompt), "rank": rank_feed})
    decode = session.run(None, {**decoder_feeds(shapes, step, prefill[1:], prompt.shape[1]), "rank": rank_feed})

    with torch.no_grad(), at_rank(model, rank_value):
        ids = torch.from_numpy(prompt)
        first = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                      position_ids=torch.arange(6).expand(2, 6), use_cache=True)
        expected_prefill = [first.logits] + [t for pair in cache_tensors(first.past_key_values) for t in pair]
        second = model(input_ids=torch.from_numpy(step), attention_mask=torch.ones(2, 7, dtype=torch.long),
                       position_ids=torch.full((2, 1), 6), past_key_values=first.past_key_values, use_cache=True)
        expected_decode = [second.logits] + [t for pair in cache_tensors(second.past_key_values) for t in pair]
    assert len(expected_prefill) == len(output_names), (len(expected_prefill), output_names)
    return {"prefill": worst(prefill, expected_prefill), "decode": worst(decode, expected_decode)}


def verify_encoder(session, model, rank_value: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    generator = np.random.default_rng(seed)
    ids = generator.integers(0, model.config.vocab_size, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # one padded row
    feeds = {"input_ids": ids, "attention_mask": mask, "rank": np.array(rank_value, np.int64)}
    if "token_type_ids" in {i.name for i in session.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(ids)
    actual = session.run(["last_hidden_state"], feeds)
    with torch.no_grad(), at_rank(model, rank_value):
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    return {"encode": worst(actual, [expected])}


def worst(actual: list[np.ndarray], expected: list[torch.Tensor]) -> tuple[float, float]:
    errors = [compare(a, e.detach().numpy()) for a, e in zip(actual, expected)]
    return max(e[0] for e in errors), max(e[1] for e in errors)


def verify_onnx(onnx_path: str | Path, model, ranks: list[int] | None = None, tolerance: float = TOLERANCE,
                progress: Callable[[str], None] | None = None) -> list[RankCheck]:
    """Compare ONNX Runtime with PyTorch at ``ranks`` (default: ``verification_ranks``).

    Returns one ``RankCheck`` per rank and phase; raise on failure with ``require_passed``.
    """
    report = progress or (lambda message: None)
    if ranks is not None and not ranks:
        raise ValueError("no ranks to verify; give at least one, e.g. --ranks 1,8,16")
    session = session_for(Path(onnx_path))
    task = session.get_modelmeta().custom_metadata_map.get("nsn.task", "feature-extraction")
    top = model_max_rank(model)
    plan = verification_ranks(top, model.nsn_config.trained_ranks) if ranks is None else [(r, "given") for r in ranks]
    run = verify_decoder if task == "text-generation" else verify_encoder
    model.eval()
    checks = []
    for rank_value, kind in plan:
        report(f"verifying rank {rank_value} ({kind})")
        for phase, (abs_error, rel_error) in run(session, model, rank_value).items():
            checks.append(RankCheck(rank_value, kind, phase, abs_error, rel_error, rel_error <= tolerance))
    return checks


def require_passed(checks: list[RankCheck], tolerance: float = TOLERANCE) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        worst_check = max(failed, key=lambda c: c.max_rel_error)
        if worst_check.max_rel_error == float("inf"):
            raise VerificationError(
                f"ONNX Runtime produced NaN or inf at rank {worst_check.rank} ({worst_check.phase}) where PyTorch "
                f"is finite; the weights file (model.onnx_data) is damaged or from another export: re-export")
        raise VerificationError(
            f"{len(failed)} check(s) exceed the fp32 tolerance {tolerance:g} (max |onnx - torch| / max |torch|); "
            f"worst: rank {worst_check.rank} {worst_check.phase} relative error {worst_check.max_rel_error:.2e}")
