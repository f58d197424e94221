"""The NSN configuration: everything beyond the base model that a checkpoint must remember."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FORMAT_VERSION = 1


@dataclass
class NSNConfig:
    """What was factorised and how it was trained.

    ``layer_ranks`` maps each factorised module's qualified name to its maximum rank ``R_l``.
    ``log_variances`` maps a trained rank to its learned uncertainty weight ``s_k``.
    """

    layer_ranks: dict[str, int]
    targets: str | list[str] = "all-linear"
    max_rank_spec: int | float | None = None
    trained_ranks: list[int] = field(default_factory=list)
    log_variances: dict[int, float] = field(default_factory=dict)
    base_model: str | None = None
    init: str = "svd"  # "svd", "whitened" (data-aware, on calibration activations) or "fisher" (and gradients)
    calibration_tokens: int = 0  # tokens the data-aware initialisation saw
    format_version: int = FORMAT_VERSION

    @property
    def max_rank(self) -> int:
        """The largest rank any layer has; the global rank ranges over ``[1, max_rank]``."""
        return max(self.layer_ranks.values())

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["log_variances"] = {str(k): v for k, v in self.log_variances.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "nsn_config.json") -> "NSNConfig":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source}: unknown NSN format_version {version!r}; this nsn-export reads version "
                f"{FORMAT_VERSION}. Upgrade nsn-export or re-create the checkpoint with nsn-adapt."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("layer_ranks",) if name not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}; the checkpoint is incomplete")
        values = {k: v for k, v in data.items() if k in known}
        values["layer_ranks"] = {str(k): int(v) for k, v in values["layer_ranks"].items()}
        values["log_variances"] = {int(k): float(v) for k, v in values.get("log_variances", {}).items()}
        values["trained_ranks"] = [int(r) for r in values.get("trained_ranks", [])]
        return cls(**values)
