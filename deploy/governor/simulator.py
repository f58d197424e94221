"""A simulated Jetson for the governor: the real ``Governor`` and policies run against it through
the same ``Readings`` (built from sysfs-style strings by the same parsers), and never sleep.

The device (all parameters per preset, approximate and labelled so — they are not measurements):
- an application asks for ``demand`` tokens/s; the model serves up to its capacity at rank r,
  ``tokens_per_s_full * clock / (fixed_work + (1 - fixed_work) * work(r))``;
- board power ``idle_w + dynamic_w * busy * clock**2``, busy = served / capacity;
- a thermal RC model, ``C dT/dt = P - (T - T_ambient) / R_th``;
- the hardware's own throttling at the passive trip: clocks drop to ``throttle_clock`` (fewer
  tokens/s) until the temperature is 2 degC below the trip — as on a real Jetson, letting it throttle
  costs throughput;
- a battery drained by power x time; sensor faults (dropouts, garbage) in windows.

A scenario is a TOML file (``deploy/governor/scenarios/*.toml``); ``simulate`` runs the policy and
the baselines on it in one process and reports, per run: tokens, quality_tokens, seconds_above_trip,
max_temp_c, seconds_throttled, switches, switches_per_min, switches_per_min_after_1min,
battery_empty_s, mean_rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from ..schema import ListOf, Number, Pair, Table, Text, check, optional
from .config import PolicyConfig, load_policy, read_toml
from .loop import Governor, levels_for
from .sensors import Readings, parse_micro, parse_pct, parse_temp_c


@dataclass(frozen=True)
class Device:
    name: str
    idle_w: float
    dynamic_w: float
    r_th_c_per_w: float
    c_j_per_c: float
    passive_trip_c: float = 85.0
    throttle_clock: float = 0.6
    tokens_per_s_full: float = 20.0
    fixed_work: float = 0.15  # share of a token's time that does not shrink with the rank


# Approximate, for simulation only: power in the board's power mode, thermal constants of a
# devkit with its stock fan, a 0.5B-class decoder's throughput. Not measurements.
PRESETS = {
    "orin-nano-15w": Device("Jetson Orin Nano 15 W (approximate)", 4.0, 10.0, 4.2, 45.0, tokens_per_s_full=12.0),
    "orin-nx-25w": Device("Jetson Orin NX 25 W (approximate)", 6.0, 17.0, 2.5, 90.0, tokens_per_s_full=25.0),
    "agx-orin-60w": Device("Jetson AGX Orin 60 W (approximate)", 12.0, 44.0, 1.0, 220.0, tokens_per_s_full=60.0),
}


def schedule_value(points: list[list[float]], t: float) -> float:
    """Piecewise-linear value of ``[[t0, v0], [t1, v1], ...]`` at time ``t`` (held outside)."""
    if t <= points[0][0]:
        return points[0][1]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-9)
    return points[-1][1]


def in_windows(windows: list[list[float]], t: float) -> bool:
    return any(start <= t < end for start, end in windows)


@dataclass
class Scenario:
    name: str
    duration_s: float
    device: Device
    ambient: list[list[float]]
    demand: list[list[float]]  # tokens/s over time
    bursts: list[list[float]] = field(default_factory=list)  # [start_s, end_s, extra tokens/s]
    battery_wh: float | None = None
    battery_pct: float = 100.0
    dropouts: list[list[float]] = field(default_factory=list)
    garbage: list[list[float]] = field(default_factory=list)
    max_rank: int = 448
    model_fixed_work: float = 0.1  # FLOPs share that does not depend on the rank (embeddings, attention)
    latency_target_s: float = 5.0  # a token counts as useful only if it waited no longer than this
    quality: dict[int, float] = field(default_factory=dict)  # rank -> quality (default: a concave curve)
    policy: str | None = None  # a policy file next to the scenario

    def flops_of_rank(self, rank: int) -> float:
        return self.model_fixed_work + (1 - self.model_fixed_work) * rank / self.max_rank

    def quality_of(self, rank: int) -> float:
        if not self.quality:
            return 1.0 - (1.0 - rank / self.max_rank) ** 3  # approximate: steep near rank 1, flat near R
        ranks = sorted(self.quality)
        return schedule_value([[r, self.quality[r]] for r in ranks], rank)


MAX_DURATION_S = 24 * 3600  # a day of simulated time, one tick per second
MAX_SIM_RANK = 65_536


def schedule(value: Number, name: str) -> ListOf:
    """``[[time_s, value], ...]``: a piecewise-linear value over time."""
    return ListOf(Pair((Number(0, MAX_DURATION_S, "s"), value), ("time_s", name)), min_len=1, max_len=10_000)


def windows(*extra) -> ListOf:
    """``[[start_s, end_s, ...], ...]``: time windows (faults, bursts)."""
    names = ("start_s", "end_s") + tuple(name for name, _ in extra)
    items = (Number(0, MAX_DURATION_S, "s"), Number(0, MAX_DURATION_S, "s")) + tuple(spec for _, spec in extra)
    return ListOf(Pair(items, names), max_len=10_000)


SCENARIO_SCHEMA = Table({
    "name": optional(Text(example="heat soak")),
    "duration_s": Number(0, MAX_DURATION_S, "s", low_open=True),
    "policy": optional(Text(example="my-policy.toml")),
    "device": optional(Table({
        "preset": optional(Text(choices=tuple(PRESETS)), "orin-nx-25w"),
        "idle_w": optional(Number(0, 1000, "W")),
        "dynamic_w": optional(Number(0, 1000, "W")),
        "r_th_c_per_w": optional(Number(0, 100, "degC/W", low_open=True)),
        "c_j_per_c": optional(Number(0, 1e6, "J/degC", low_open=True)),
        "passive_trip_c": optional(Number(-40, 150, "degC")),
        "throttle_clock": optional(Number(0, 1, low_open=True)),
        "tokens_per_s_full": optional(Number(0, 1e6, "tokens/s", low_open=True)),
        "fixed_work": optional(Number(0, 0.99)),
    }), dict),
    "ambient": optional(Table({"schedule": optional(schedule(Number(-40, 80, "degC"), "ambient_c"))}), dict),
    "load": optional(Table({"demand_tokens_per_s": optional(schedule(Number(0, 1e6, "tokens/s"), "tokens_per_s")),
                            "bursts": optional(windows(("extra_tokens_per_s", Number(0, 1e6, "tokens/s"))), list),
                            "latency_target_s": optional(Number(0, 3600, "s", low_open=True), 5.0)}),
                     dict),
    "battery": optional(Table({"capacity_wh": Number(0, 10_000, "Wh", low_open=True),
                               "initial_pct": optional(Number(0, 100, "%"), 100.0)})),
    "faults": optional(Table({"dropouts": optional(windows(), list), "garbage": optional(windows(), list)}), dict),
    "model": optional(Table({"max_rank": optional(Number(1, MAX_SIM_RANK, integer=True), 448),
                             "fixed_work": optional(Number(0, 0.99), 0.1)}), dict),
    "quality": optional(Table({"ranks": ListOf(Number(1, MAX_SIM_RANK, integer=True), min_len=1),
                               "values": ListOf(Number(0, 1), min_len=1)})),
})


def shipped_scenarios() -> list[str]:
    """The names of the scenarios that ship with the package (``heat-soak``, ...)."""
    return sorted(p.stem for p in scenario_dir().glob("*.toml") if not p.stem.endswith("-policy"))


def scenario_path(name_or_path: str | Path) -> Path:
    """A scenario file: a path, or the name of a shipped one (``heat-soak``) that no file here shadows."""
    path = Path(name_or_path)
    if not path.exists() and path.suffix != ".toml" and path.name == str(name_or_path):
        shipped = scenario_dir() / f"{path.name}.toml"
        if shipped.is_file():
            return shipped
    return path


def load_scenario(path: str | Path) -> Scenario:
    """A validated scenario (``SCENARIO_SCHEMA``) from a file or a shipped scenario's name; its
    ``policy`` is resolved against its directory."""
    path = scenario_path(path)
    data = check(read_toml(path, f"no such scenario file; the shipped ones, by name: {', '.join(shipped_scenarios())}"),
                 SCENARIO_SCHEMA, str(path))
    device_data = data["device"]
    device = replace(PRESETS[device_data["preset"]],
                     **{k: float(v) for k, v in device_data.items() if k != "preset" and v is not None})
    ambient = data["ambient"]["schedule"] or [[0, 25.0]]
    demand = data["load"]["demand_tokens_per_s"] or [[0, 0.8 * device.tokens_per_s_full]]
    for key, points in (("ambient.schedule", ambient), ("load.demand_tokens_per_s", demand)):
        if any(b[0] < a[0] for a, b in zip(points, points[1:])):
            raise ValueError(f"{path}: {key} times must not decrease; list the points in time order")
    for key, spans in (("load.bursts", data["load"]["bursts"]), ("faults.dropouts", data["faults"]["dropouts"]),
                       ("faults.garbage", data["faults"]["garbage"])):
        if any(span[1] < span[0] for span in spans):
            raise ValueError(f"{path}: {key} has a window that ends before it starts; write [start_s, end_s]")
    model, quality = data["model"], data["quality"]
    if quality is not None:
        if len(quality["ranks"]) != len(quality["values"]):
            raise ValueError(f"{path}: quality.ranks has {len(quality['ranks'])} entries and quality.values "
                             f"{len(quality['values'])}; give one value per rank")
        if max(quality["ranks"]) > model["max_rank"]:
            raise ValueError(f"{path}: quality.ranks go to {max(quality['ranks'])}, above model.max_rank "
                             f"{model['max_rank']}")
    battery = data["battery"]
    return Scenario(
        name=data["name"] or path.stem, duration_s=float(data["duration_s"]), device=device,
        ambient=ambient, demand=demand,
        bursts=data["load"]["bursts"],
        battery_wh=None if battery is None else float(battery["capacity_wh"]),
        battery_pct=100.0 if battery is None else float(battery["initial_pct"]),
        dropouts=data["faults"]["dropouts"], garbage=data["faults"]["garbage"],
        max_rank=model["max_rank"], model_fixed_work=float(model["fixed_work"]),
        latency_target_s=float(data["load"]["latency_target_s"]),
        quality={} if quality is None else dict(zip(quality["ranks"], map(float, quality["values"]))),
        policy=str(path.parent / data["policy"]) if data["policy"] else None)


def scenario_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath("scenarios")))


class SimulatedDevice:
    """The device's state, its sensors (``read``) and the model's rank (``set_rank``)."""

    def __init__(self, scenario: Scenario, initial_rank: int):
        self.s, self.d = scenario, scenario.device
        self.rank = initial_rank
        self.temp_c = schedule_value(scenario.ambient, 0.0)
        self.throttled = False
        self.energy_wh = None if scenario.battery_wh is None else scenario.battery_wh * scenario.battery_pct / 100
        self.latency_ms: float | None = None
        self.backlog_tokens = 0.0  # requested, not yet served (a FIFO)
        self.queue_s = 0.0  # how long the backlog takes to serve at the current capacity
        self.power_w = self.serve(0.0, 0.0)[1]  # what the sensors read before the first tick

    # the runtime interface the governor drives
    def set_rank(self, rank: int) -> None:
        self.rank = rank

    # the sensor interface the governor reads (sysfs-style raw strings through the real parsers)
    def trip_c(self, zones) -> float:
        return self.d.passive_trip_c

    def read(self, now: float) -> Readings:
        if in_windows(self.s.dropouts, now):
            raw_temp = None
        elif in_windows(self.s.garbage, now):
            raw_temp = "-273000" if int(now) % 2 else "not-a-number"
        else:
            raw_temp = str(int(self.temp_c * 1000))
        temp = parse_temp_c(raw_temp) if raw_temp is not None else None
        invalid = int(raw_temp is not None and temp is None)
        battery = {}
        if self.energy_wh is not None:
            battery = {"battery_pct": parse_pct(str(round(100 * self.energy_wh / self.s.battery_wh, 1))),
                       "discharging": self.energy_wh > 0,
                       "battery_power_w": parse_micro(str(int(self.power_w * 1e6))),
                       "battery_energy_wh": parse_micro(str(int(self.energy_wh * 1e6)), 10_000.0)}
        return Readings(time_s=now, temps_c={"tj-thermal": temp}, latency_ms=self.latency_ms, invalid=invalid,
                        rails_w={"VDD_IN": self.power_w}, queue_s=self.queue_s, **battery)

    def serve(self, now: float, dt: float) -> tuple[float, float, float]:
        """(tokens served in ``dt``, board power in W, capacity in tokens/s) at the current rank and
        clocks: the backlog first, then what arrived (a FIFO)."""
        d, s = self.d, self.s
        clock = d.throttle_clock if self.throttled else 1.0
        work = s.flops_of_rank(self.rank) / s.flops_of_rank(s.max_rank)
        capacity = d.tokens_per_s_full * clock / (d.fixed_work + (1 - d.fixed_work) * work)
        demand = schedule_value(s.demand, now) + sum(extra for start, end, extra in s.bursts if start <= now < end)
        if dt == 0:
            busy = min(demand / capacity, 1.0)
            return 0.0, d.idle_w + d.dynamic_w * busy * clock ** 2, capacity
        waiting = self.backlog_tokens + demand * dt
        served = min(waiting, capacity * dt)
        self.backlog_tokens = waiting - served
        return served, d.idle_w + d.dynamic_w * served / (capacity * dt) * clock ** 2, capacity

    def advance(self, now: float, dt: float) -> dict:
        """One ``dt`` of serving at the current rank; returns what happened."""
        d, s = self.d, self.s
        if self.energy_wh is not None and self.energy_wh <= 0:
            return {"tokens": 0.0, "power_w": 0.0, "empty": True, "timely": False}
        timely = self.queue_s <= s.latency_target_s  # what is served now waited about queue_s
        served, self.power_w, capacity = self.serve(now, dt)
        self.queue_s = self.backlog_tokens / capacity
        ambient = schedule_value(s.ambient, now)
        self.temp_c += dt * (self.power_w - (self.temp_c - ambient) / d.r_th_c_per_w) / d.c_j_per_c
        if self.temp_c >= d.passive_trip_c:
            self.throttled = True
        elif self.temp_c < d.passive_trip_c - 2.0:
            self.throttled = False
        self.latency_ms = 1000.0 / capacity
        if self.energy_wh is not None:
            self.energy_wh -= self.power_w * dt / 3600
        return {"tokens": served, "power_w": self.power_w, "empty": False, "timely": timely}


@dataclass
class Run:
    name: str
    tokens: float = 0.0
    quality_tokens: float = 0.0
    seconds_above_trip: float = 0.0
    max_temp_c: float = -math.inf
    seconds_throttled: float = 0.0
    switches: int = 0
    switches_after_1min: int = 0
    battery_empty_s: float | None = None
    rank_seconds: float = 0.0
    max_queue_s: float = 0.0
    duration_s: float = 0.0
    trace: list[tuple[float, float, int, float | None]] = field(default_factory=list)  # t, temp, rank, battery %

    def summary(self) -> dict:
        minutes = self.duration_s / 60
        return {"run": self.name, "tokens": round(self.tokens), "quality_tokens": round(self.quality_tokens),
                "seconds_above_trip": self.seconds_above_trip, "max_temp_c": round(self.max_temp_c, 1),
                "seconds_throttled": self.seconds_throttled, "switches": self.switches,
                "switches_per_min": round(self.switches / minutes, 2),
                "switches_per_min_after_1min": round(self.switches_after_1min / max(minutes - 1, 1e-9), 2),
                "battery_empty_s": self.battery_empty_s, "mean_rank": round(self.rank_seconds / self.duration_s, 1),
                "max_queue_s": round(self.max_queue_s, 1)}


def run_scenario(scenario: Scenario, name: str, choose_rank, initial_rank: int, dt: float = 1.0,
                 keep_trace: bool = False) -> Run:
    """Simulate ``scenario``; ``choose_rank(device, now)`` sets the rank each tick (a governor or a baseline)."""
    device = SimulatedDevice(scenario, initial_rank)
    run = Run(name, duration_s=scenario.duration_s)
    previous = device.rank
    now = 0.0
    while now < scenario.duration_s:
        choose_rank(device, now)
        if device.rank != previous:
            run.switches += 1
            run.switches_after_1min += now >= 60
            previous = device.rank
        result = device.advance(now, dt)
        if result["empty"] and run.battery_empty_s is None:
            run.battery_empty_s = now
        run.tokens += result["tokens"]
        if result["timely"]:  # a token that waited past the latency target is of no use to anyone
            run.quality_tokens += result["tokens"] * scenario.quality_of(device.rank)
        run.max_queue_s = max(run.max_queue_s, device.queue_s)
        run.seconds_above_trip += dt * (device.temp_c >= scenario.device.passive_trip_c)
        run.seconds_throttled += dt * device.throttled
        run.max_temp_c = max(run.max_temp_c, device.temp_c)
        run.rank_seconds += device.rank * dt
        if keep_trace:
            battery = None if device.energy_wh is None else 100 * device.energy_wh / scenario.battery_wh
            run.trace.append((now, device.temp_c, device.rank, battery))
        now += dt
    return run


def simulate(scenario: Scenario, policy: PolicyConfig | None = None, keep_trace: bool = False) -> dict:
    """The policy and the baselines on one scenario: fixed full rank, fixed minimum rank, a threshold
    rule without hysteresis, and the oracle (the best constant level that never crossed the trip)."""
    policy = policy or load_policy(scenario.policy)
    holder: dict = {}

    def governed(device, now):  # the device is both the governor's sensors and its target
        if "governor" not in holder:
            holder["governor"] = Governor(device, policy, device, scenario.max_rank, scenario.flops_of_rank,
                                          trip_c=scenario.device.passive_trip_c)
        holder["governor"].step(now)

    levels = levels_for(policy, scenario.max_rank, scenario.flops_of_rank)
    low, high = levels.ranks[0], levels.ranks[-1]
    target_c = (policy.thermal or {}).get("target_c") or scenario.device.passive_trip_c - 3

    def fixed(rank):
        return lambda device, now: device.set_rank(rank)

    def threshold(device, now):
        device.set_rank(high if device.temp_c < target_c else low)

    runs = [run_scenario(scenario, "governor", governed, high, keep_trace=keep_trace),
            run_scenario(scenario, f"fixed full rank {high}", fixed(high), high, keep_trace=keep_trace),
            run_scenario(scenario, f"fixed minimum rank {low}", fixed(low), low, keep_trace=keep_trace),
            run_scenario(scenario, "threshold, no hysteresis", threshold, high, keep_trace=keep_trace)]
    constant = [run_scenario(scenario, f"oracle: constant rank {r}", fixed(r), r, keep_trace=keep_trace)
                for r in levels.ranks]
    safe = [r for r in constant if r.seconds_above_trip == 0 and (scenario.battery_wh is None or
                                                                  r.battery_empty_s is None)]
    runs.append(max(safe, key=lambda r: r.quality_tokens) if safe else constant[0])
    return {"scenario": scenario.name, "device": scenario.device.name, "duration_s": scenario.duration_s,
            "levels": levels.ranks, "runs": [r.summary() for r in runs],
            "governor": {"failures": holder["governor"].failures, "switches": holder["governor"].switches},
            "trace": runs[0].trace if keep_trace else None,
            "traces": {r.name: r.trace for r in runs} if keep_trace else None}
