"""The governor's policy file (TOML), validated with errors that name the key. The documented
example ships with the package: ``deploy/governor/example-policy.toml``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

SECTIONS = {
    "levels": {"ranks", "min_dwell_s", "up_margin", "safe_rank", "frontier"},
    "thermal": {"zones", "target_c", "emergency_c", "kp_per_c", "ki_per_c_s"},
    "battery": {"ladder", "hysteresis_pct", "runtime_h"},
    "power": {"budget_w"},
    "latency": {"target_ms"},
    "manual": {"rank_file"},
}


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
    rank_file: str | None = None
    source: str = "policy"


def example_policy_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("example-policy.toml")))


def number(section: dict, key: str, where: str, low: float = 0.0, high: float = float("inf"), default=None):
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{where}: {key} = {value!r} must be a number in [{low:g}, {high:g}]")
    return float(value)


def read_toml(path: Path, missing: str) -> dict:
    """A TOML file as a dict; ``missing`` completes the message when the file does not exist."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from None


def load_policy(path: str | Path | None = None) -> PolicyConfig:
    """Read and validate a policy file (the shipped example when ``path`` is None)."""
    path = Path(path) if path is not None else example_policy_path()
    data = read_toml(path, f"no such policy file; start from {example_policy_path()}")
    return policy_from_dict(data, str(path))


def policy_from_dict(data: dict, source: str = "policy") -> PolicyConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    for name, section in data.items():
        if not isinstance(section, dict):
            raise ValueError(f"{source}: [{name}] must be a table")
        extra = sorted(set(section) - SECTIONS[name])
        if extra:
            raise ValueError(f"{source}: [{name}] has unknown key(s) {extra}; known: {sorted(SECTIONS[name])}")
    config = PolicyConfig(source=source)
    levels = data.get("levels", {})
    ranks = levels.get("ranks", [])
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                              for r in ranks):
        raise ValueError(f"{source}: [levels] ranks = {ranks!r} must be a list of integers >= 1")
    config.ranks = ranks
    config.min_dwell_s = number(levels, "min_dwell_s", f"{source} [levels]", 0, 3600, 20.0)
    config.up_margin = number(levels, "up_margin", f"{source} [levels]", 0, 1, 0.05)
    config.safe_rank = int(number(levels, "safe_rank", f"{source} [levels]", 0, 1e9, 0))
    if "frontier" in levels:
        if not isinstance(levels["frontier"], str):
            raise ValueError(f"{source} [levels]: frontier = {levels['frontier']!r} must be the path of a frontier.json")
        config.frontier = levels["frontier"]
    if "thermal" in data:
        section, where = data["thermal"], f"{source} [thermal]"
        zones = section.get("zones", [])
        if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
            raise ValueError(f"{where}: zones = {zones!r} must be a list of thermal zone types, e.g. [\"tj-thermal\"]")
        config.thermal = {"zones": zones, "target_c": number(section, "target_c", where, -40, 150),
                          "emergency_c": number(section, "emergency_c", where, -40, 150),
                          "kp_per_c": number(section, "kp_per_c", where, 0, 10, 0.03),
                          "ki_per_c_s": number(section, "ki_per_c_s", where, 0, 10, 0.004)}
        if None not in (config.thermal["target_c"], config.thermal["emergency_c"]) and \
                config.thermal["target_c"] >= config.thermal["emergency_c"]:
            raise ValueError(f"{where}: target_c must be below emergency_c")
    if "battery" in data:
        section, where = data["battery"], f"{source} [battery]"
        ladder = section.get("ladder", [])
        if not isinstance(ladder, list) or not all(
                isinstance(s, list) and len(s) == 2 and 0 <= s[0] <= 100 and 0 <= s[1] <= 1 for s in ladder):
            raise ValueError(f"{where}: ladder = {ladder!r} must be [[capacity_pct, work_fraction], ...] with "
                             f"capacity in [0, 100] and work fraction in [0, 1]")
        config.battery = {"ladder": [tuple(s) for s in ladder],
                          "hysteresis_pct": number(section, "hysteresis_pct", where, 0, 50, 3.0),
                          "runtime_h": number(section, "runtime_h", where, 0.001, 1000)}
    if "power" in data:
        config.power_budget_w = number(data["power"], "budget_w", f"{source} [power]", 0.1, 10_000)
    if "latency" in data:
        config.latency_target_ms = number(data["latency"], "target_ms", f"{source} [latency]", 0.001, 1e6)
    if "manual" in data:
        rank_file = data["manual"].get("rank_file")
        if not isinstance(rank_file, str):
            raise ValueError(f"{source} [manual]: rank_file = {rank_file!r} must be a path")
        config.rank_file = rank_file
    return config
