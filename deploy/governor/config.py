"""The governor's policy file (TOML), validated with errors that name the key. The documented
example ships with the package: ``deploy/governor/example-policy.toml``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..external_data import read_regular_text
from ..schema import ListOf, Number, Pair, Table, Text, check, optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

TEMP_C = Number(-40, 150, "degC")
# The policy file: every section optional (a missing section turns its policy off).
POLICY_SCHEMA = Table({
    "levels": optional(Table({
        # empty: an equal-work ladder up to the model's max rank
        "ranks": optional(ListOf(Number(1, 1_000_000, integer=True), max_len=1024), list),
        "min_dwell_s": optional(Number(0, 3600, "s"), 20.0),
        "up_margin": optional(Number(0, 1), 0.05),
        "safe_rank": optional(Number(0, 1_000_000, integer=True), 0),  # 0: the lowest level
        "frontier": optional(Text(example="frontier.json")),
    }), dict),
    "thermal": optional(Table({
        "zones": optional(ListOf(Text(example="tj-thermal"), max_len=64), list),
        "target_c": optional(TEMP_C),
        "emergency_c": optional(TEMP_C),
        "kp_per_c": optional(Number(0, 10, "per degC"), 0.03),
        "ki_per_c_s": optional(Number(0, 10, "per degC s"), 0.004),
    })),
    "battery": optional(Table({
        "ladder": optional(ListOf(Pair((Number(0, 100, "%"), Number(0, 1)), ("capacity_pct", "work_fraction")),
                                  max_len=64), list),
        "hysteresis_pct": optional(Number(0, 50, "%"), 3.0),
        "runtime_h": optional(Number(0.001, 1000, "h")),
    })),
    "power": optional(Table({"budget_w": Number(0.1, 10_000, "W")})),
    "latency": optional(Table({"target_ms": Number(0.001, 1e6, "ms")})),
    "queue": optional(Table({"target_s": Number(0.01, 3600, "s")})),
    "manual": optional(Table({"rank_file": Text(example="/run/nsn/manual-rank")})),
})


@dataclass
class PolicyConfig:
    ranks: list[int] = field(default_factory=list)  # empty: a geometric ladder up to the model's max rank
    min_dwell_s: float = 20.0
    up_margin: float = 0.05
    safe_rank: int = 0  # 0: the lowest level
    frontier: str | None = None  # nsn-calibrate's frontier.json: its levels, and latency/power per rank
    thermal: dict | None = None
    battery: dict | None = None
    power_budget_w: float | None = None
    latency_target_ms: float | None = None
    queue_target_s: float | None = None
    rank_file: str | None = None
    source: str = "policy"


def example_policy_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("example-policy.toml")))


def read_toml(path: Path, missing: str) -> dict:
    """A TOML file as a dict; ``missing`` completes the message when the file does not exist."""
    try:
        return tomllib.loads(read_regular_text(path, max_bytes=1 << 20))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a policy or scenario") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from None


def load_policy(path: str | Path | None = None) -> PolicyConfig:
    """Read and validate a policy file (the shipped example when ``path`` is None)."""
    path = Path(path) if path is not None else example_policy_path()
    data = read_toml(path, f"no such policy file; start from {example_policy_path()}")
    return policy_from_dict(data, str(path), base_dir=path.parent)


def policy_from_dict(data: dict, source: str = "policy", base_dir: str | Path | None = None) -> PolicyConfig:
    """A validated policy (``POLICY_SCHEMA``); a relative ``frontier`` is resolved against
    ``base_dir`` (the policy file's directory), as a scenario's ``policy`` is against its own."""
    data = check(data, POLICY_SCHEMA, source)
    levels = data["levels"]
    frontier = levels["frontier"]
    if frontier is not None and base_dir is not None and not Path(frontier).is_absolute():
        frontier = str(Path(base_dir) / frontier)
    config = PolicyConfig(ranks=levels["ranks"], min_dwell_s=float(levels["min_dwell_s"]),
                          up_margin=float(levels["up_margin"]), safe_rank=levels["safe_rank"], frontier=frontier,
                          source=source)
    if data["thermal"] is not None:
        thermal = data["thermal"]
        if None not in (thermal["target_c"], thermal["emergency_c"]) and thermal["target_c"] >= thermal["emergency_c"]:
            raise ValueError(f"{source}: [thermal] target_c must be below emergency_c")
        config.thermal = thermal
    if data["battery"] is not None:
        config.battery = {**data["battery"], "ladder": [tuple(step) for step in data["battery"]["ladder"]]}
    if data["power"] is not None:
        config.power_budget_w = float(data["power"]["budget_w"])
    if data["latency"] is not None:
        config.latency_target_ms = float(data["latency"]["target_ms"])
    if data["queue"] is not None:
        config.queue_target_s = float(data["queue"]["target_s"])
    if data["manual"] is not None:
        config.rank_file = data["manual"]["rank_file"]
    return config
