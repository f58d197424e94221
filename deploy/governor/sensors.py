"""What the governor can measure: thermal zones, battery and mains, INA3221 power rails (Linux
sysfs under a root you can point at a fake tree), and the runtime's own latency.

Discovery happens once (``SysfsSensors(root)``: the files that exist, and what is absent); each
``read()`` is cheap and never raises. A value that cannot be read, is not a number, or is
physically impossible (below -40 or above 150 degC, capacity outside 0-100 %, negative or absurd
power) becomes ``None`` and is counted in ``Readings.invalid`` — never a sentinel like -256 degC.
The simulator produces the same ``Readings`` from raw sysfs-style strings through the same
``parse_*`` functions, so a policy cannot tell a simulated device from a real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..external_data import read_regular_text

TEMP_RANGE_C = (-40.0, 150.0)
MAX_POWER_W = 1000.0


@dataclass(frozen=True)
class Readings:
    """One timestamped reading of every sensor; ``None`` where a sensor is absent or gave garbage."""

    time_s: float
    temps_c: dict[str, float | None] = field(default_factory=dict)  # by thermal zone type
    battery_pct: float | None = None
    discharging: bool | None = None
    battery_power_w: float | None = None
    battery_energy_wh: float | None = None
    mains_online: bool | None = None
    rails_w: dict[str, float | None] = field(default_factory=dict)  # by INA3221 rail label
    latency_ms: float | None = None
    queue_s: float | None = None  # how long the oldest waiting request has waited (a server's queue)
    batch: int | None = None  # sequences decoded per step (a server's continuous batching)
    invalid: int = 0

    @property
    def power_w(self) -> float | None:
        """Total board power: the ``VDD_IN`` rail (Jetson), else the battery's draw."""
        if self.rails_w.get("VDD_IN") is not None:
            return self.rails_w["VDD_IN"]
        return self.battery_power_w

    def hottest_c(self, zones: list[str]) -> float | None:
        """The highest valid temperature among ``zones`` (all zones when empty)."""
        hottest = self.hottest(zones)
        return None if hottest is None else hottest[1]

    def hottest(self, zones: list[str]) -> tuple[str, float] | None:
        """(zone, temperature) of the hottest valid zone among ``zones`` (all zones when empty)."""
        values = [(v, k) for k, v in self.temps_c.items() if (not zones or k in zones) and v is not None]
        return (max(values)[1], max(values)[0]) if values else None


def parse_number(text: str | None, scale: float, low: float, high: float) -> float | None:
    """``text`` (a sysfs value) times ``scale`` if it is a number within [low, high], else ``None``."""
    try:
        value = float(str(text).strip()) * scale
    except (TypeError, ValueError):
        return None
    return value if low <= value <= high else None


def parse_temp_c(text):  # millidegrees Celsius
    return parse_number(text, 1e-3, *TEMP_RANGE_C)


def parse_pct(text):
    return parse_number(text, 1.0, 0.0, 100.0)


def parse_micro(text, high=MAX_POWER_W):  # µW -> W, µWh -> Wh, µA -> A, µV -> V
    return parse_number(text, 1e-6, 0.0, high)


def parse_milli(text, high=MAX_POWER_W):  # mA -> A, mV -> V
    return parse_number(text, 1e-3, 0.0, high)


def read_text(path: Path | None) -> str | None:
    """A sysfs value, or ``None`` when it cannot be read. Never blocks: a FIFO (or anything but a
    regular file) reads as ``None``, and at most a page is read."""
    if path is None:
        return None
    try:
        return read_regular_text(path, max_bytes=4096).strip()
    except (OSError, ValueError):
        return None


@dataclass
class ThermalZone:
    type: str
    temp: Path
    trips_c: dict[str, float]  # trip type (passive, hot, critical) -> lowest temperature of that type


@dataclass
class PowerSupply:
    name: str
    kind: str  # Battery or Mains
    path: Path


@dataclass
class Rail:
    label: str
    current: Path
    voltage: Path


class SysfsSensors:
    """Sensors found under ``root`` (default ``/``). ``latency_ms``, ``queue_s`` and ``batch`` may be
    set by the runtime or the server."""

    def __init__(self, root: str | Path = "/"):
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise ValueError(f"sysfs root {self.root} {what}; give the directory that holds sys/ (default /)")
        self.zones = self._thermal_zones()
        self.supplies = self._power_supplies()
        self.rails = self._rails()
        self.latency_ms: float | None = None
        self.queue_s: float | None = None
        self.batch: int | None = None
        self.invalid_total = 0

    def _thermal_zones(self) -> list[ThermalZone]:
        zones = []
        for zone in sorted((self.root / "sys/class/thermal").glob("thermal_zone*")):
            kind = read_text(zone / "type")
            if not kind or not (zone / "temp").exists():
                continue
            trips: dict[str, float] = {}
            for trip_type in zone.glob("trip_point_*_type"):
                temp = parse_temp_c(read_text(trip_type.with_name(trip_type.name.replace("_type", "_temp"))))
                name = read_text(trip_type)
                if name and temp is not None:
                    trips[name] = min(temp, trips.get(name, temp))
            zones.append(ThermalZone(kind, zone / "temp", trips))
        return zones

    def _power_supplies(self) -> list[PowerSupply]:
        supplies = []
        for supply in sorted((self.root / "sys/class/power_supply").glob("*")):
            kind = read_text(supply / "type")
            if kind in ("Battery", "Mains"):
                supplies.append(PowerSupply(supply.name, kind, supply))
        return supplies

    def _rails(self) -> list[Rail]:
        rails = []
        hwmons = [h for h in sorted((self.root / "sys/class/hwmon").glob("hwmon*")) if read_text(h / "name") == "ina3221"]
        hwmons += sorted((self.root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*"))
        seen = set()
        for hwmon in hwmons:
            for label in sorted(hwmon.glob("in*_label")):
                index = label.name[2:-len("_label")]
                name = read_text(label)
                if name and name not in seen and (hwmon / f"curr{index}_input").exists():
                    seen.add(name)
                    rails.append(Rail(name, hwmon / f"curr{index}_input", hwmon / f"in{index}_input"))
        return rails

    def describe(self) -> dict:
        """What was found (and what is absent), for ``nsn-governor sensors`` and the start-up log."""
        return {"root": str(self.root),
                "thermal_zones": {z.type: {"temp": str(z.temp), "trips_c": z.trips_c} for z in self.zones},
                "power_supplies": {s.name: s.kind for s in self.supplies},
                "rails": [r.label for r in self.rails],
                "absent": [kind for kind, found in (("thermal zones", self.zones), ("battery or mains", self.supplies),
                                                    ("INA3221 power rails", self.rails)) if not found]}

    def trip_c(self, zones: list[str], trip_type: str = "passive") -> float | None:
        """The lowest ``trip_type`` trip point among ``zones`` (the default limit of a policy)."""
        trips = [z.trips_c[trip_type] for z in self.zones if (not zones or z.type in zones) and trip_type in z.trips_c]
        return min(trips) if trips else None

    def read(self, now: float | None = None) -> Readings:
        """Every sensor once. Never raises: unreadable or impossible values are ``None`` and counted."""
        invalid = 0

        def counted(raw: str | None, parse, *args):
            nonlocal invalid
            value = parse(raw, *args) if raw is not None else None
            invalid += value is None
            return value

        temps = {z.type: counted(read_text(z.temp), parse_temp_c) for z in self.zones}
        battery = next((s for s in self.supplies if s.kind == "Battery"), None)
        mains = next((s for s in self.supplies if s.kind == "Mains"), None)
        values: dict = {}
        if battery is not None:
            path = battery.path
            values["battery_pct"] = counted(read_text(path / "capacity"), parse_pct)
            status = read_text(path / "status")
            values["discharging"] = None if status is None else status == "Discharging"
            power = read_text(path / "power_now")
            if power is not None:
                values["battery_power_w"] = counted(power, parse_micro)
            else:
                amps = parse_micro(read_text(path / "current_now"), 100.0)
                volts = parse_micro(read_text(path / "voltage_now"), 100.0)
                values["battery_power_w"] = amps * volts if amps is not None and volts is not None else None
            energy = read_text(path / "energy_now")
            if energy is not None:
                values["battery_energy_wh"] = counted(energy, parse_micro, 10_000.0)
            else:
                charge = parse_micro(read_text(path / "charge_now"), 10_000.0)
                volts = parse_micro(read_text(path / "voltage_now"), 100.0)
                values["battery_energy_wh"] = charge * volts if charge is not None and volts is not None else None
        if mains is not None:
            online = read_text(mains.path / "online")
            values["mains_online"] = None if online not in ("0", "1") else online == "1"
        rails = {}
        for rail in self.rails:
            amps = counted(read_text(rail.current), parse_milli, 100.0)
            volts = counted(read_text(rail.voltage), parse_milli, 100.0)
            rails[rail.label] = amps * volts if amps is not None and volts is not None else None
        self.invalid_total += invalid
        return Readings(time_s=time.monotonic() if now is None else now, temps_c=temps, rails_w=rails,
                        latency_ms=self.latency_ms, queue_s=self.queue_s, batch=self.batch, invalid=invalid,
                        **values)
