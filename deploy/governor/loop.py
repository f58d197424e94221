"""The governor loop: read sensors -> every policy's ceiling -> the lowest, snapped to a rank level
with hysteresis -> ``target.set_rank``. ``step(now)`` is one tick with injected time (tests and
the simulator never sleep); ``start()``/``stop()`` run it on a background thread.

A runtime applies a new rank at its next call boundary (``NSNSession``/``NSNEngine`` read their rank
once per call), so a switch never lands in the middle of a call. Any failure inside a tick is
logged and becomes the safe rank; nothing propagates into the inference thread.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from ..atomic import atomic_file
from ..external_data import read_regular_text
from ..frontier import latency_by_batch
from ..metadata import validate_rank, within_dense
from .config import PolicyConfig
from .policy import BatteryLadder, BatteryRuntime, BudgetPolicy, Ceiling, Levels, QueuePolicy, ThermalPolicy
from .sensors import Readings

log = logging.getLogger("nsn.governor")


@dataclass
class Decision:
    time_s: float
    rank: int
    switched: bool
    ceilings: list[dict]
    readings: dict
    cross_profile: bool = False

    def as_json(self) -> str:
        return json.dumps(asdict(self), default=str)


def readings_summary(readings: Readings | None) -> dict:
    if readings is None:
        return {}
    return {"temps_c": readings.temps_c, "battery_pct": readings.battery_pct, "power_w": readings.power_w,
            "rails_w": readings.rails_w, "latency_ms": readings.latency_ms, "queue_s": readings.queue_s,
            "batch": readings.batch, "invalid": readings.invalid}


def levels_for(config: PolicyConfig, max_rank: int, flops_of_rank: Callable[[int], float]) -> Levels:
    """The policy's rank levels, or an equal-work ladder up to ``max_rank`` when it lists none."""
    return Levels(config.ranks, flops_of_rank) if config.ranks else Levels.equal_work(max_rank, flops_of_rank)


class Governor:
    """Govern ``target`` (anything with ``set_rank``; an ``NSNSession``, an ``NSNEngine``, the
    simulator) from ``sensors`` (anything with ``read(now) -> Readings``) under ``config``.

    ``flops_of_rank`` and ``max_rank`` come from the model or the runtime (``level_flops`` and
    ``info.max_rank``). With ``dense_flops``, levels that cost more than the dense model are left out
    unless the policy lists its ranks itself: the default ceiling is never costlier than dense.
    ``log_path`` appends one JSON line per tick; ``rank_file`` receives the chosen rank atomically
    (out-of-process mode)."""

    def __init__(self, sensors, config: PolicyConfig, target, max_rank: int, flops_of_rank: Callable[[int], float],
                 log_path: str | Path | None = None, rank_file: str | Path | None = None,
                 on_decision: Callable[[Decision], None] | None = None, trip_c: float | None = None,
                 dense_flops: float | None = None):
        self.sensors, self.config, self.target, self.max_rank = sensors, config, target, max_rank
        self.notes: list[str] = []  # policies turned off here, levels left out, and why (shown at start-up)
        frontier = None
        listed = bool(config.ranks)
        if config.frontier:
            from ..frontier import read_frontier

            frontier = read_frontier(config.frontier, getattr(target, "model_path", None))
            if not config.ranks:
                config = replace(config, ranks=list(frontier["levels"]))
        top = max_rank  # of the ladder
        if dense_flops is not None and not listed:
            candidates = config.ranks or list(range(1, max_rank + 1))
            kept = within_dense(candidates, flops_of_rank, dense_flops)
            if kept[-1] < max(candidates):
                self.notes.append(f"levels above rank {kept[-1]} cost more than the dense model here and are left "
                                  f"out; list ranks under [levels] in the policy to run them")
                log.info(self.notes[-1])
                config, top = (replace(config, ranks=kept), max_rank) if config.ranks else (config, kept[-1])
        self.levels = levels_for(config, top, flops_of_rank)
        if self.levels.ranks[-1] > max_rank:
            raise ValueError(f"{config.source}: [levels] ranks go to {self.levels.ranks[-1]}, above the model's "
                             f"maximum rank {max_rank}")
        if config.safe_rank > max_rank:
            raise ValueError(f"{config.source}: [levels] safe_rank = {config.safe_rank} must be in [0, {max_rank}] "
                             f"(0: the lowest level; {max_rank}: the model's maximum rank)")
        self.safe_index = self.level_at_most(config.safe_rank) if config.safe_rank else 0
        self.policies = self._policies(config, trip_c)
        if frontier is not None:
            self._seed_from(frontier, flops_of_rank)
        self.log_file = open(log_path, "a", buffering=1) if log_path else None
        self.rank_file = Path(rank_file) if rank_file else None
        self.on_decision = on_decision
        self.manual_rank: int | None = None
        self._last_warning: str | None = None
        self.index = len(self.levels.ranks) - 1
        self.last_change_s: float | None = None
        self.last_step_s: float | None = None
        self.work_credit = 0.0  # work x seconds below an average ceiling (see choose)
        self.switches = self.cross_profile_switches = self.failures = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._apply(self.index)

    def _policies(self, config: PolicyConfig, trip_c: float | None) -> list:
        policies = []
        if config.thermal is not None:
            zones = config.thermal["zones"]
            passive = trip_c if trip_c is not None else getattr(self.sensors, "trip_c", lambda z: None)(zones)
            target = config.thermal["target_c"] or (passive - 3.0 if passive is not None else None)
            emergency = config.thermal["emergency_c"] or (passive + 5.0 if passive is not None else None)
            if target is None or emergency is None:
                # Off a Jetson (a laptop, CI) there may be no trip point: run without thermal control
                # and say so, rather than refuse to start or hold the safe rank for ever.
                self.notes.append(f"thermal control off: no passive trip point was found for zones {zones}; "
                                  f"set target_c and emergency_c in [thermal] of the policy to turn it on")
                log.warning(self.notes[-1])
            else:
                present = [z.type for z in getattr(self.sensors, "zones", [])]
                if hasattr(self.sensors, "zones") and not any(not zones or z in zones for z in present):
                    log.warning("none of the thermal zones %s exists here (found %s): the thermal policy will hold "
                                "the safe rank", zones, present)
                policies.append(ThermalPolicy(target, emergency, zones, config.thermal["kp_per_c"],
                                              config.thermal["ki_per_c_s"]))
        if config.battery is not None:
            if config.battery["ladder"]:
                policies.append(BatteryLadder(config.battery["ladder"], config.battery["hysteresis_pct"]))
            if config.battery["runtime_h"]:
                policies.append(BatteryRuntime(config.battery["runtime_h"]))
        if config.power_budget_w is not None:
            policies.append(BudgetPolicy("power_w", config.power_budget_w))
        if config.latency_target_ms is not None:
            policies.append(BudgetPolicy("latency_ms", config.latency_target_ms))
        if config.queue_target_s is not None:
            policies.append(QueuePolicy(config.queue_target_s))
        return policies

    def _seed_from(self, frontier: dict, flops_of_rank) -> None:
        """Start the latency and power models from the calibrated table instead of from nothing: the
        latency at each batch size measured (``decode``, ``decode_batch_4``, ...), the power at one."""
        top = flops_of_rank(self.levels.ranks[-1])
        for policy in self.policies:
            if isinstance(policy, QueuePolicy):
                model, quantity = policy.latency, "latency_ms"
            elif isinstance(policy, BudgetPolicy):
                model, quantity = policy.model, policy.quantity
            else:
                continue
            for row in frontier["rows"]:
                measured = latency_by_batch(row) if quantity == "latency_ms" else {1: row.get("power_w")}
                for batch, value in measured.items():
                    model.add(flops_of_rank(row["rank"]) / top, value, batch)

    def level_at_most(self, rank: int) -> int:
        """The highest level at or below ``rank`` (the lowest level if none is)."""
        return max((i for i, r in enumerate(self.levels.ranks) if r <= rank), default=0)

    @property
    def rank(self) -> int:
        return self.levels.ranks[self.index]

    def override(self, rank: int | None) -> None:
        """Manual override: cap the rank at ``rank`` (None releases it; a cap above the top level is the
        top level). Safety limits still apply."""
        self.manual_rank = None if rank is None else validate_rank(rank, self.max_rank, "override rank")

    def _manual_ceiling(self) -> Ceiling | None:
        rank, source = self.manual_rank, "manual rank"
        if self.config.rank_file:
            path = Path(self.config.rank_file)
            try:
                text = read_regular_text(path, max_bytes=64).strip()
            except FileNotFoundError:
                text = None  # no file: no manual cap
            except (OSError, ValueError) as error:
                text = f"<unreadable: {error}>"
            if text is not None:
                if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
                    return self._say_once(Ceiling(self.levels.work[self.safe_index],
                                                  f"manual rank file {path} holds {text[:40]!r}, not a rank in "
                                                  f"[1, {self.levels.ranks[-1]}]: safe rank", hard=True))
                rank, source = int(text), f"manual rank file {path}"
        self._last_warning = None
        if rank is None:
            return None
        return Ceiling(self.levels.work[self.level_at_most(rank)], f"{source}: {rank}", hard=True)

    def _say_once(self, ceiling: Ceiling) -> Ceiling:
        """Log a ceiling's reason once while it stays the same (not on every tick)."""
        if ceiling.reason != self._last_warning:
            log.warning(ceiling.reason)
            self._last_warning = ceiling.reason
        return ceiling

    def ceilings(self, readings: Readings) -> list[Ceiling]:
        applied = self.levels.work[self.index]
        step_up = self.levels.work[min(self.index + 1, len(self.levels.work) - 1)] * (1 + self.config.up_margin)
        found = [replace(policy.ceiling(readings, applied, step_up), policy=policy.name) for policy in self.policies]
        found = [replace(c, work=self.levels.work[self.safe_index]) if c.safe else c for c in found]
        manual = self._manual_ceiling()
        found += [replace(manual, policy="manual")] if manual else []
        return found or [Ceiling(1.0, "no policy", policy="none")]

    def choose(self, ceilings: list[Ceiling], now: float) -> int:
        """Down at once to the level the lowest ceiling allows; up one level at a time, only past the
        up margin and after ``min_dwell_s`` at the current level. When the binding ceiling limits the
        *average* work (an energy budget) and lies between two levels, alternate between them so the
        average meets it (a work credit, like sigma-delta modulation), still at most one switch per dwell."""
        lowest = min(ceilings, key=lambda c: c.work)
        wanted = self.levels.index_for(lowest.work)
        dt = 0.0 if self.last_step_s is None else now - self.last_step_s
        self.last_step_s = now
        dwelt = self.last_change_s is None or now - self.last_change_s >= self.config.min_dwell_s
        if lowest.average:
            self.work_credit += (lowest.work - self.levels.work[self.index]) * dt
            instant = min((c.work for c in ceilings if not c.average), default=1.0)
            above = wanted + 1
            if self.index > above or (self.index == above and self.work_credit < 0 and dwelt):
                return wanted
            if (self.index == wanted and dwelt and self.work_credit > 0 and above < len(self.levels.work)
                    and self.levels.work[above] <= instant):
                return above
            return self.index
        self.work_credit = 0.0
        if wanted < self.index or lowest.hard:  # a hard limit (safety, manual) applies at once
            return wanted
        if wanted > self.index:
            next_work = self.levels.work[self.index + 1]
            if dwelt and lowest.work >= min(1.0, next_work * (1 + self.config.up_margin)):
                return self.index + 1
        return self.index

    def step(self, now: float | None = None) -> Decision:
        """One tick. Never raises: a failure is logged and applies the safe rank."""
        now = time.monotonic() if now is None else now
        readings, ceilings = None, []
        try:
            if hasattr(self.target, "last_latency_ms") and hasattr(self.sensors, "latency_ms"):
                self.sensors.latency_ms = self.target.last_latency_ms
            if hasattr(self.target, "queue_s") and hasattr(self.sensors, "queue_s"):  # a server's queue
                self.sensors.queue_s = self.target.queue_s
            if hasattr(self.target, "batch_size") and hasattr(self.sensors, "batch"):  # and its batch
                self.sensors.batch = self.target.batch_size or None
            readings = self.sensors.read(now)
            ceilings = self.ceilings(readings)
            index = self.choose(ceilings, now)
        except Exception as error:  # the governor must never take the model down with it
            self.failures += 1
            log.exception("governor tick failed; applying the safe rank")
            ceilings = [Ceiling(self.levels.work[self.safe_index], f"governor error: {type(error).__name__}: {error}",
                                hard=True, policy="error")]
            index = self.safe_index
        switched = index != self.index
        cross = False
        if switched:
            cross = self._crosses_profile(self.levels.ranks[self.index], self.levels.ranks[index])
            self.index, self.last_change_s = index, now
            self.switches += 1
            self.cross_profile_switches += cross
            self._apply(index)
        decision = Decision(now, self.rank, switched, [asdict(c) for c in ceilings], readings_summary(readings), cross)
        if self.log_file is not None:
            self.log_file.write(decision.as_json() + "\n")
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision

    def _crosses_profile(self, old: int, new: int) -> bool:
        plan = getattr(self.target, "plan", None)  # an NSNEngine: count switches between its profiles
        return plan is not None and plan.profile_for(old, "decode").index != plan.profile_for(new, "decode").index

    def _apply(self, index: int) -> None:
        """Set the level's rank; if that fails, the safe rank (never leave the model where it was)."""
        rank = self.levels.ranks[index]
        try:
            self.target.set_rank(rank)
        except Exception:
            self.failures += 1
            log.exception("set_rank(%s) failed; applying the safe rank", rank)
            self.index = self.safe_index
            rank = self.levels.ranks[self.safe_index]
            try:
                self.target.set_rank(rank)
            except Exception:
                log.exception("set_rank(%s) (the safe rank) failed too", rank)
        if self.rank_file is not None:
            try:
                atomic_file(self.rank_file, f"{rank}\n")
            except OSError:
                self.failures += 1
                log.exception("cannot write the rank file %s", self.rank_file)

    def start(self, period_s: float = 1.0) -> None:
        """Tick every ``period_s`` on a daemon thread until ``stop()``."""
        if self._thread is not None:
            raise RuntimeError("the governor is already running")
        self._stop.clear()

        def run():
            while not self._stop.is_set():
                self.step()
                self._stop.wait(period_s)

        self._thread = threading.Thread(target=run, name="nsn-governor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
