"""The NSN facts an exported graph carries in its ``metadata_props`` (no checkpoint needed)."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass

import numpy as np

SUPPORTED_FORMAT_VERSIONS = ("1",)


class OptionValueError(ValueError):
    """A bad value given for a command-line option (``--profiles``, ``--ranks``, ``--max-seq``): the
    commands exit 2 on it, as on any other bad option value, and 1 on a bad file or a failed run."""


@dataclass(frozen=True)
class NSNModelInfo:
    max_rank: int
    task: str
    rank_mode: str
    layer_ranks: dict[str, int]
    trained_ranks: list[int]
    flops_per_rank: list[int]
    dense_flops: int
    attention_flops_per_context_token: int
    source_model: str
    weights_sha256: str = ""  # of model.onnx_data, written by nsn-export (empty in older exports)
    weights: str = "fp32"  # how the weights are stored: "fp32" or "int8" (a scale per rank component or row)

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "NSNModelInfo":
        version = props.get("nsn.format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(f"{source}: not an nsn-export graph or unknown NSN metadata version {version!r} "
                             f"(supported: {', '.join(SUPPORTED_FORMAT_VERSIONS)}); re-export it with nsn-export")
        try:
            info = cls(
                max_rank=int(props["nsn.max_rank"]),
                task=props["nsn.task"],
                rank_mode=props["nsn.rank_mode"],
                layer_ranks=json.loads(props["nsn.layer_ranks"]),
                trained_ranks=json.loads(props["nsn.trained_ranks"]),
                flops_per_rank=json.loads(props["nsn.flops_per_rank"]),
                dense_flops=int(props["nsn.dense_flops"]),
                attention_flops_per_context_token=int(props["nsn.attention_flops_per_context_token"]),
                source_model=props.get("nsn.source_model", ""),
                weights_sha256=props.get("nsn.weights_sha256", ""),
                weights=props.get("nsn.weights", "fp32"),
            )
        except KeyError as error:
            raise ValueError(f"{source}: the NSN metadata lacks {error.args[0]}; re-export it with nsn-export") from None
        except (ValueError, TypeError, RecursionError) as error:
            raise ValueError(f"{source}: damaged NSN metadata ({type(error).__name__}: {error}); re-export it with "
                             f"nsn-export") from None
        if not (1 <= info.max_rank <= 1_000_000 and isinstance(info.flops_per_rank, list)
                and len(info.flops_per_rank) == info.max_rank and info.task in ("text-generation", "feature-extraction")):
            raise ValueError(f"{source}: inconsistent NSN metadata (max_rank {info.max_rank}, task {info.task!r}, "
                             f"{len(info.flops_per_rank) if isinstance(info.flops_per_rank, list) else 'no'} FLOPs "
                             f"entries); re-export it with nsn-export")
        return info

    def flops(self, rank: int, context_length: int = 0) -> int:
        """FLOPs per token at ``rank`` with ``context_length`` tokens of attention context."""
        return self.flops_per_rank[rank - 1] + self.attention_flops_per_context_token * context_length

    def flops_fraction(self, rank: int, context_length: int = 0) -> float:
        dense = self.dense_flops + self.attention_flops_per_context_token * context_length
        return self.flops(rank, context_length) / dense

    def rank_for_budget(self, fraction: float, context_length: int = 0) -> int:
        """The largest rank whose FLOPs are within ``fraction`` of the dense model's."""
        within = [r for r in range(1, self.max_rank + 1) if self.flops_fraction(r, context_length) <= fraction]
        if not within:
            raise ValueError(f"even rank 1 needs {self.flops_fraction(1, context_length):.3f} of the dense FLOPs, "
                             f"above the budget {fraction}; raise the budget")
        return within[-1]


def within_dense(ranks, flops_of_rank, dense_flops: float) -> list[int]:
    """The ranks, ascending, whose ``flops_of_rank`` is at most ``dense_flops`` (the lowest rank if none is)."""
    ranks = sorted(ranks)
    return [r for r in ranks if flops_of_rank(r) <= dense_flops] or ranks[:1]


def validate_rank(rank, max_rank: int, what: str = "rank") -> int:
    """``rank`` as an int in ``[1, max_rank]``; anything else is a ``ValueError`` naming the range
    (an ``OptionValueError`` when ``what`` is a command-line option such as ``--ranks``).

    The one definition of a valid rank: the torch layer, the ONNX Runtime session and Optimum
    interop all call it."""
    error = OptionValueError if what.startswith("--") else ValueError
    value = rank
    if isinstance(value, np.ndarray):
        if value.size != 1 or value.dtype.kind not in "iu":
            raise error(f"{what} must be a single integer in [1, {max_rank}], got an array of shape "
                             f"{value.shape} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{what} must be an integer in [1, {max_rank}], got {rank!r} ({type(rank).__name__}); "
                         f"pass a Python int")
    if not 1 <= int(value) <= max_rank:
        raise error(f"{what} must be in [1, {max_rank}], got {int(value)}; choose a rank within that range")
    return int(value)


def read_model_info(path) -> NSNModelInfo:
    """The NSN facts of an export (its directory or its graph file: ``model.onnx``'s metadata, the
    weights not read) or of an nsn-trt engine directory (``engine.json``): what a command checks its
    options against before it loads the model."""
    from pathlib import Path

    from .external_data import load_graph, model_file

    path = Path(path)
    if (path / "engine.json").is_file():
        from .tensorrt.engine import read_manifest

        return NSNModelInfo.from_props(read_manifest(path).get("nsn", {}), source=str(path / "engine.json"))
    path = model_file(path)
    return NSNModelInfo.from_props({p.key: p.value for p in load_graph(path).metadata_props}, source=str(path))
