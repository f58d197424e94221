"""Rank policies: each maps readings to a ceiling on the model's *work fraction* (its FLOPs per token
relative to the full rank), with a reason. The governor takes the lowest ceiling and snaps it to a
rank level. Working in work fractions keeps every policy model-independent; ``Levels`` converts.

All units are in the names. Every policy is a small object whose state moves only through
``ceiling(readings, applied_work, step_up_work)`` — the work fraction applied now and the one a
climb would reach — so a test can step it through time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .sensors import Readings


@dataclass(frozen=True)
class Ceiling:
    work: float  # the largest work fraction allowed, in [0, 1]
    reason: str
    hard: bool = False  # a safety limit or a manual rank: applies at once, without hysteresis
    average: bool = False  # a limit on the average work (an energy budget), not on every instant
    safe: bool = False  # no trustworthy reading: the governor puts the policy's safe rank in ``work``
    policy: str = ""  # which policy set it (thermal, battery, power_w, latency_ms, manual, ...): set by the governor


class Levels:
    """The allowed ranks, ascending, with each one's work fraction (``work[i]`` in (0, 1])."""

    def __init__(self, ranks: list[int], flops_of_rank):
        if not ranks:
            raise ValueError("levels: give at least one rank")
        self.ranks = sorted(set(int(r) for r in ranks))
        top = flops_of_rank(self.ranks[-1])
        self.work = [flops_of_rank(r) / top for r in self.ranks]

    def index_for(self, work: float) -> int:
        """The highest level whose work fraction is within ``work`` (the lowest level if none is)."""
        within = [i for i, w in enumerate(self.work) if w <= work + 1e-12]
        return within[-1] if within else 0

    @classmethod
    def equal_work(cls, max_rank: int, flops_of_rank, count: int = 8) -> "Levels":
        """A default ladder of ``count`` ranks whose work fractions are evenly spaced from rank 1's to
        1, so every step up or down changes power and latency by about the same amount."""
        low, top = flops_of_rank(1), flops_of_rank(max_rank)
        targets = [low + (top - low) * k / max(count - 1, 1) for k in range(count)]
        ranks = {max((r for r in range(1, max_rank + 1) if flops_of_rank(r) <= t + 1e-9), default=1) for t in targets}
        return cls(sorted(ranks | {max_rank}), flops_of_rank)


class LinearByWork:
    """``y = a + b * work`` fitted from recent (work, y) samples — power in W, latency in ms — so
    a budget can be turned into a work fraction before any calibrated table exists. With one
    distinct work seen, ``y`` is assumed proportional to ``idle_share + (1 - idle_share) * work``."""

    def __init__(self, idle_share: float = 0.3, window: int = 600):
        self.idle_share, self.window = idle_share, window
        self.samples: list[tuple[float, float]] = []

    def add(self, work: float, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.samples.append((work, value))
            del self.samples[:-self.window]

    def coefficients(self) -> tuple[float, float] | None:
        if not self.samples:
            return None
        works = [w for w, _ in self.samples]
        mean_w = sum(works) / len(works)
        mean_y = sum(y for _, y in self.samples) / len(self.samples)
        spread = sum((w - mean_w) ** 2 for w in works)
        if spread > 1e-4:
            slope = sum((w - mean_w) * (y - mean_y) for w, y in self.samples) / spread
            if slope > 0:
                return mean_y - slope * mean_w, slope
        scale = mean_y / (self.idle_share + (1 - self.idle_share) * mean_w)
        return scale * self.idle_share, scale * (1 - self.idle_share)

    def work_within(self, budget: float) -> float | None:
        """The largest work fraction whose predicted value is within ``budget`` (None: no data)."""
        fit = self.coefficients()
        if fit is None:
            return None
        intercept, slope = fit
        return max(0.0, min(1.0, (budget - intercept) / slope))


@dataclass
class ThermalPolicy:
    """Hold the hottest of ``zones`` at ``target_c`` with a PI controller on the work fraction (velocity
    form: each tick the ceiling moves by ``kp`` per degC of error change plus ``ki`` per degC*s of
    error). At or above ``emergency_c``: work 0, the minimum rank, at once. No reading: the safe rank."""

    target_c: float
    emergency_c: float
    zones: list[str] = field(default_factory=list)
    kp_per_c: float = 0.03
    ki_per_c_s: float = 0.004
    deadband_c: float = 1.0  # no integration while within this of the target: no hunting between levels
    ceiling_work: float = 1.0
    last_error_c: float | None = None
    last_time_s: float | None = None

    name = "thermal"

    def ceiling(self, readings: Readings, applied_work: float, step_up_work: float) -> Ceiling:
        hottest = readings.hottest(self.zones)
        if hottest is None:
            self.last_error_c = None
            return Ceiling(0.0, f"no valid temperature from {self.zones or 'any zone'}: safe rank", hard=True, safe=True)
        zone, temp = hottest
        if temp >= self.emergency_c:
            self.ceiling_work, self.last_error_c = 0.0, None
            return Ceiling(0.0, f"{zone} {temp:.1f} degC >= emergency {self.emergency_c:.1f} degC", hard=True)
        error = self.target_c - temp
        dt = 1.0 if self.last_time_s is None else max(1e-3, readings.time_s - self.last_time_s)
        change = 0.0 if self.last_error_c is None else error - self.last_error_c
        integrated = 0.0 if abs(error) <= self.deadband_c else error - math.copysign(self.deadband_c, error)
        # Anti-windup: never more than one level above what is applied (climbing waits on the dwell).
        self.ceiling_work = min(max(self.ceiling_work + self.kp_per_c * change + self.ki_per_c_s * integrated * dt, 0.0),
                                1.0, step_up_work)
        self.last_error_c, self.last_time_s = error, readings.time_s
        # Clearly below the target the controller is not what limits the rank: say so, so another
        # policy's ceiling is the one reported and the climb back is not held by the windup cap.
        work = 1.0 if error > 2 * self.deadband_c and self.ceiling_work >= step_up_work else self.ceiling_work
        return Ceiling(work, f"{zone} {temp:.1f} degC, target {self.target_c:.1f} degC")


@dataclass
class BatteryLadder:
    """While discharging: below each capacity threshold (percent) a work ceiling applies; a band is
    left only ``hysteresis_pct`` above its threshold, so a reading wobbling at a boundary cannot
    chatter. ``steps`` are (threshold_pct, work) pairs."""

    steps: list[tuple[float, float]]
    hysteresis_pct: float = 3.0
    band: int | None = None  # index into steps sorted by threshold, descending

    def __post_init__(self):
        self.steps = sorted(((float(t), float(w)) for t, w in self.steps), reverse=True)

    name = "battery"

    def ceiling(self, readings: Readings, applied_work: float = 1.0, step_up_work: float = 1.0) -> Ceiling:
        if not readings.discharging:
            self.band = None
            return Ceiling(1.0, "not discharging")
        pct = readings.battery_pct
        if pct is None:
            return Ceiling(min((w for _, w in self.steps), default=1.0), "no valid battery capacity: lowest band",
                       hard=True)
        band = None
        for i, (threshold, _) in enumerate(self.steps):
            leave_at = threshold + (self.hysteresis_pct if self.band is not None and i >= self.band else 0.0)
            if pct < leave_at:
                band = i
        self.band = band
        if band is None:
            return Ceiling(1.0, f"battery {pct:.0f}%")
        threshold, work = self.steps[band]
        return Ceiling(work, f"battery {pct:.0f}% < {threshold:.0f}%")


@dataclass
class BatteryRuntime:
    """Keep serving until ``runtime_h`` after the governor started: each tick, the power the
    remaining energy allows over the remaining time, turned into a work fraction by the power
    model learned so far (re-planned as the battery drains)."""

    runtime_h: float
    start_s: float | None = None
    power: LinearByWork = field(default_factory=LinearByWork)

    name = "battery_runtime"

    def ceiling(self, readings: Readings, applied_work: float, step_up_work: float = 1.0) -> Ceiling:
        if self.start_s is None:
            self.start_s = readings.time_s
        if not readings.discharging:
            return Ceiling(1.0, "not discharging")
        self.power.add(applied_work, readings.power_w)
        remaining_s = self.start_s + self.runtime_h * 3600 - readings.time_s
        if readings.battery_energy_wh is None or readings.power_w is None:
            return Ceiling(1.0, "runtime target: no energy or power reading")
        if remaining_s <= 0:
            return Ceiling(1.0, "runtime target reached")
        allowed_w = readings.battery_energy_wh * 3600 / remaining_s
        work = self.power.work_within(allowed_w)
        return Ceiling(1.0 if work is None else work,
                       f"{readings.battery_energy_wh:.1f} Wh over {remaining_s / 3600:.2f} h allows {allowed_w:.2f} W",
                       average=work is not None)


def batch_bucket(batch: int | None) -> int:
    """Readings group by batch size in powers of two: 1, 2-3, 4-7, 8-15, ..."""
    return 1 << (max(int(batch or 1), 1).bit_length() - 1)


class ByBatch:
    """One ``LinearByWork`` per batch bucket: how long a step takes (and the power it draws) depends
    on how many sequences share it as well as on the rank; a server batching 8 streams must not be
    judged by what one stream costs."""

    def __init__(self):
        self.models: dict[int, LinearByWork] = {}

    def add(self, work: float, value: float | None, batch: int | None) -> None:
        self.models.setdefault(batch_bucket(batch), LinearByWork()).add(work, value)

    def model(self, batch: int | None) -> LinearByWork | None:
        """The model of ``batch``'s bucket, else of the nearest bucket with samples (None: no data)."""
        bucket = batch_bucket(batch)
        known = [b for b, model in self.models.items() if model.samples]
        if not known:
            return None
        return self.models[min(known, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), b))]


def at_batch(batch: int | None) -> str:
    return f" at batch {batch}" if batch and batch > 1 else ""


@dataclass
class BudgetPolicy:
    """The largest work fraction whose measured ``quantity`` (power_w or latency_ms) stays within
    ``budget``, from the model learned at the work fractions seen so far."""

    quantity: str
    budget: float
    model: ByBatch = field(default_factory=ByBatch)  # learned per batch size (``Readings.batch``)

    @property
    def name(self) -> str:
        return self.quantity  # power_w or latency_ms

    def ceiling(self, readings: Readings, applied_work: float, step_up_work: float = 1.0) -> Ceiling:
        value = readings.power_w if self.quantity == "power_w" else readings.latency_ms
        self.model.add(applied_work, value, readings.batch)
        model = self.model.model(readings.batch)
        work = model.work_within(self.budget) if model is not None else None
        unit = "W" if self.quantity == "power_w" else "ms"
        if work is None:
            return Ceiling(1.0, f"{self.quantity} budget {self.budget:g} {unit}: no measurement yet")
        shown = "n/a" if value is None else f"{value:.2f}"
        return Ceiling(work, f"{self.quantity} {shown} {unit}{at_batch(readings.batch)}, budget {self.budget:g} {unit}")


@dataclass
class QueuePolicy:
    """Keep a server's queue within ``target_s``. The oldest waiting request's wait ``w`` grows as
    ``g = dw/dt = arrivals / throughput - 1``. Looking ``horizon_s`` ahead, the queue may grow by at
    most ``g_ok = (target_s - w) / horizon_s``; when it grows faster, the work ceiling drops to
    ``applied * (1 + g_ok) / (1 + g)`` (throughput rises about as work falls): just enough for the
    load, using the latency the target allows, since quality is concave in rank and running lower
    than needed costs it for nothing. A queue that is empty or shrinking releases the ceiling (the
    governor climbs back one level per dwell).

    "Throughput rises as work falls" is refined by the step latency learned at the current batch
    size (``latency``, ``a + b * work`` per batch bucket, seeded from the frontier's
    ``decode_batch_N``): the queue drains ``(1 + g) / (1 + g_ok)`` times faster only when the
    step takes that many times less, and a step's fixed part ``a`` (weights read once whatever the
    rank) does not shrink with the rank, so the ceiling drops further than the proportional rule."""

    target_s: float
    horizon_s: float = 10.0
    last: tuple[float, float] | None = None  # (time_s, wait_s) of the previous reading
    latency: ByBatch = field(default_factory=ByBatch)
    name = "queue"

    def ceiling(self, readings: Readings, applied_work: float, step_up_work: float = 1.0) -> Ceiling:
        wait, last = readings.queue_s, self.last
        self.last = None if wait is None else (readings.time_s, wait)
        self.latency.add(applied_work, readings.latency_ms, readings.batch)
        if wait is None:
            return Ceiling(1.0, "no queue reading")
        growth = 0.0 if last is None else (wait - last[1]) / max(readings.time_s - last[0], 1e-3)
        allowed = (self.target_s - wait) / self.horizon_s
        if growth > allowed and wait > 0:
            faster = (1 + growth) / (1 + max(allowed, -0.5))  # how much faster the queue must drain
            model = self.latency.model(readings.batch)
            fit = model.coefficients() if model is not None else None
            if fit is None:
                work = applied_work / faster
            else:
                intercept, slope = fit
                work = ((intercept + slope * applied_work) / faster - intercept) / slope
            return Ceiling(min(max(work, 0.25 * applied_work), applied_work),
                           f"requests wait {wait:.1f} s, growing {growth:.2f} s/s{at_batch(readings.batch)} "
                           f"(target {self.target_s:g} s)")
        if growth > 0:
            return Ceiling(applied_work, f"requests wait {wait:.1f} s, growing {growth:.2f} s/s: holding")
        return Ceiling(1.0, f"requests wait {wait:.1f} s")
