"""``nsn-governor``: what the sensors read, a live governed model, and the device simulator."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import click

from ..cli import FiniteFloat, user_errors
from ..extras import install_command


@click.group()
def governor_command():
    """Pick the model's rank from temperature, battery, power and latency."""


@governor_command.command("sensors")
@click.option("--sysfs-root", type=click.Path(path_type=Path), default=Path("/"), help="read sysfs under this root")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def sensors_command(sysfs_root, as_json):
    """What the governor finds and reads here, and what is missing."""
    from dataclasses import asdict

    from .config import load_policy
    from .sensors import SysfsSensors

    sensors = SysfsSensors(sysfs_root)
    found, readings = sensors.describe(), asdict(sensors.read())
    thermal = thermal_control(sensors, load_policy().thermal["zones"])
    if as_json:
        click.echo(json.dumps({"found": found, "readings": readings, "thermal_control": thermal}, indent=1))
        return
    for zone, info in found["thermal_zones"].items():
        value = readings["temps_c"].get(zone)
        click.echo(f"thermal  {zone:<16} {'unreadable' if value is None else f'{value:.1f} degC':<12} "
                   f"trips {info['trips_c'] or 'none'}")
    for name, kind in found["power_supplies"].items():
        click.echo(f"supply   {name:<16} {kind}")
    for rail, watts in readings["rails_w"].items():
        click.echo(f"rail     {rail:<16} {'unreadable' if watts is None else f'{watts:.2f} W'}")
    if readings["battery_pct"] is not None:
        click.echo(f"battery  {readings['battery_pct']:.0f} %, discharging={readings['discharging']}, "
                   f"power {readings['battery_power_w']} W, energy {readings['battery_energy_wh']} Wh")
    for kind in found["absent"]:
        click.echo(f"absent   {kind}")
    click.echo(f"governor thermal control {'on' if thermal['on'] else 'off'}: {thermal['reason']}")


def thermal_control(sensors, zones: list[str]) -> dict:
    """Whether the shipped policy's thermal control can run here, and why (its trip point)."""
    trip = sensors.trip_c(zones)
    if trip is None:
        return {"on": False, "trip_c": None, "reason": f"no passive trip point in zones {zones}; give target_c and "
                                                       f"emergency_c in the policy's [thermal] to turn it on"}
    return {"on": True, "trip_c": trip, "reason": f"holds {trip - 3:.1f} degC, 3 degC below the passive trip "
                                                  f"point {trip:.1f} degC"}


@governor_command.command("run")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="an nsn-export directory (ONNX Runtime) or an nsn-trt engine directory (TensorRT)")
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              help="policy TOML [default: the shipped example]")
@click.option("--sysfs-root", type=click.Path(path_type=Path), default=Path("/"))
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None, help="JSON-lines decision log")
@click.option("--rank-file", type=click.Path(path_type=Path), default=None,
              help="write the chosen rank here atomically (for an application in another process)")
@click.option("--period-s", default=1.0, type=FiniteFloat(0.01, 3600), help="seconds between governor ticks")
@click.option("--duration-s", default=None, type=FiniteFloat(0, 1e9), help="stop after this long")
@click.option("--prompt", default="The robot", help="text generated continuously (decoders)")
@click.option("--text", default="Robots adapt their compute to the battery.", help="text embedded (encoders)")
@user_errors
def run_command(model_dir, policy_path, sysfs_root, log_path, rank_file, period_s, duration_s, prompt, text):
    """Run the model continuously under the governor; print rank, temperature, power, tokens/s."""
    from ..atomic import check_output_files
    from ..runtime import open_runtime
    from .config import load_policy
    from .loop import Governor
    from .sensors import SysfsSensors

    check_output_files({"--log": log_path, "--rank-file": rank_file}, [model_dir, policy_path])
    policy = load_policy(policy_path)
    runtime = open_runtime(model_dir)
    sensors = SysfsSensors(sysfs_root)
    governor = Governor(sensors, policy, runtime, runtime.info.max_rank, runtime.level_flops, log_path=log_path,
                        rank_file=rank_file, dense_flops=runtime.info.dense_flops)
    click.echo(json.dumps({"sensors": sensors.describe(), "levels": governor.levels.ranks, "notes": governor.notes}),
               err=True)
    governor.start(period_s)
    start = last_print = time.monotonic()
    try:
        for _ in itertools.count():
            if duration_s is not None and time.monotonic() - start >= duration_s:
                break
            tick = time.perf_counter()
            if runtime.info.task == "text-generation":
                done = len(runtime.generate(prompt, max_new_tokens=16).token_ids)
            else:
                runtime.embed([text] * 8)
                done = 8
            if time.monotonic() - last_print < 1.0:
                continue
            last_print = time.monotonic()
            readings = sensors.read()
            click.echo(json.dumps({"t_s": round(time.monotonic() - start, 1), "rank": runtime.last_rank,
                                   "items_per_s": round(done / (time.perf_counter() - tick), 2),
                                   "temps_c": readings.temps_c, "power_w": readings.power_w}))
    except KeyboardInterrupt:
        pass
    finally:
        governor.stop()


@governor_command.command("bench")
@click.option("--sysfs-root", type=click.Path(path_type=Path), default=None,
              help="read this sysfs tree [default: a generated Jetson AGX Orin tree]")
@click.option("--ticks", default=2000, type=click.IntRange(1, 10_000_000))
@user_errors
def bench_command(sysfs_root, ticks):
    """Time one governor tick (read every sensor file, evaluate every policy, choose a rank)."""
    import statistics
    import tempfile

    from .config import load_policy
    from .loop import Governor
    from .sensors import SysfsSensors

    class Null:
        def set_rank(self, rank):
            pass

    with tempfile.TemporaryDirectory() as scratch:
        root = sysfs_root or write_orin_tree(Path(scratch))
        sensors = SysfsSensors(root)
        governor = Governor(sensors, load_policy(), Null(), 448, lambda r: 0.1 + 0.9 * r / 448, trip_c=99.0)
        times = []
        for tick in range(ticks):
            start = time.perf_counter()
            governor.step(float(tick))
            times.append((time.perf_counter() - start) * 1e3)
    files = 2 * len(sensors.zones) + 2 * len(sensors.rails) + 4 * len(sensors.supplies)
    click.echo(json.dumps({"ticks": ticks, "files_read_per_tick": files, "median_ms": round(statistics.median(times), 4),
                           "p99_ms": round(sorted(times)[int(0.99 * len(times))], 4)}))


def write_orin_tree(root: Path) -> Path:
    """A sysfs tree laid out like a Jetson AGX Orin's (thermal zones with trips, INA3221 rails), plus a
    battery, for ``bench``."""
    files = {}
    for i, kind in enumerate(["cpu-thermal", "gpu-thermal", "cv0-thermal", "soc0-thermal", "tj-thermal"]):
        zone = f"sys/class/thermal/thermal_zone{i}"
        files |= {f"{zone}/type": kind, f"{zone}/temp": str(50000 + 500 * i),
                  f"{zone}/trip_point_0_type": "passive", f"{zone}/trip_point_0_temp": "99000"}
    for index, label in enumerate(["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"], start=1):
        hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
        files |= {f"{hwmon}/in{index}_label": label, f"{hwmon}/curr{index}_input": "900",
                  f"{hwmon}/in{index}_input": "5000"}
    battery = "sys/class/power_supply/BAT0"
    files |= {f"{battery}/type": "Battery", f"{battery}/capacity": "80", f"{battery}/status": "Discharging",
              f"{battery}/power_now": "15000000", f"{battery}/energy_now": "40000000"}
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content + "\n")
    return root


@governor_command.command("simulate")
@click.argument("scenario_path", type=click.Path(path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              help="policy TOML [default: the scenario's, else the shipped example]")
@click.option("--json", "as_json", is_flag=True)
@click.option("--markdown", is_flag=True, help="print the runs as a markdown table (as the docs show them)")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="draw temperature, rank and battery against time (needs matplotlib)")
@user_errors
def simulate_command(scenario_path, policy_path, as_json, markdown, plot_path):
    """Run the governor and the baselines on a simulated device: SCENARIO is a TOML file or the name
    of a shipped one (battery-runtime, bursty-load, heat-soak, sensor-dropout)."""
    from ..atomic import check_output_files
    from .config import load_policy
    from .simulator import load_scenario, simulate
    from .simulator import scenario_path as resolve

    scenario_path = resolve(scenario_path)
    scenario = load_scenario(scenario_path)
    policy_path = policy_path or scenario.policy
    check_output_files({"--plot": plot_path}, [scenario_path, policy_path])
    policy = load_policy(policy_path)
    report = simulate(scenario, policy, keep_trace=plot_path is not None)
    report.pop("trace")
    traces = report.pop("traces")
    failures = report["governor"]["failures"]
    if failures:  # a verdict over failing ticks would be a verdict on the safe rank, not on the policy
        raise click.ClickException(f"{failures} governor tick(s) failed in {scenario_path} (each applied the safe "
                                   f"rank); no verdict. Run with a policy that loads and check the log above")
    if plot_path is not None:
        plot(traces, scenario, plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=1, allow_nan=False))
        return
    if markdown:
        click.echo(runs_markdown(report["runs"]))
        return
    click.echo(f"{report['scenario']} on {report['device']}, {report['duration_s']:.0f} s; levels {report['levels']}")
    columns = ["run", "tokens", "quality_tokens", "seconds_above_trip", "max_temp_c", "seconds_throttled", "switches",
               "switches_per_min", "battery_empty_s", "mean_rank"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in report["runs"])) for c in columns}
    click.echo("  ".join(c.rjust(widths[c]) for c in columns))
    for row in report["runs"]:
        click.echo("  ".join(str(row[c]).rjust(widths[c]) for c in columns))


def runs_markdown(runs: list[dict]) -> str:
    """The simulator's runs as the markdown table README.md and docs/GOVERNOR.md show (a test
    checks that the docs hold this command's output)."""
    def cell(value, unit=""):
        return "—" if value is None else f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"

    lines = ["| run | tokens | quality_tokens | s at/above trip | max °C | s throttled | switches/min | battery empty at "
             "| max queue wait | mean rank |", "|---|" + "---:|" * 9]
    for run in runs:
        lines.append(f"| {run['run']} | {run['tokens']} | {run['quality_tokens']} | {cell(run['seconds_above_trip'])} "
                     f"| {cell(run['max_temp_c'])} | {cell(run['seconds_throttled'])} | {cell(run['switches_per_min'])} "
                     f"| {cell(run['battery_empty_s'], ' s')} | {cell(run['max_queue_s'], ' s')} "
                     f"| {cell(run['mean_rank'])} |")
    return "\n".join(lines)


def plot(traces: dict, scenario, path: Path) -> None:
    """Temperature, rank (and battery) against time: the governor bold, the baselines beside it,
    fault and burst windows shaded; the rank axis spans [1, max rank] so a flat line looks flat."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(f"--plot needs matplotlib: {install_command('plot')}") from None
    import io

    from ..atomic import atomic_file

    figure, axes = plt.subplots(3 if scenario.battery_wh else 2, 1, sharex=True, figsize=(9, 7))
    for name, trace in traces.items():
        style = {"linewidth": 2.0, "color": "black", "zorder": 3} if name == "governor" else {"linewidth": 0.9,
                                                                                             "alpha": 0.7}
        times = [t / 60 for t, *_ in trace]
        axes[0].plot(times, [temp for _, temp, _, _ in trace], label=name, **style)
        axes[1].step(times, [rank for _, _, rank, _ in trace], where="post", **style)
        if scenario.battery_wh:
            axes[2].plot(times, [battery for *_, battery in trace], **style)
    for start, end, *_ in scenario.bursts:
        for axis in axes:
            axis.axvspan(start / 60, end / 60, color="tab:orange", alpha=0.12, linewidth=0)
    for start, end in scenario.dropouts + scenario.garbage:
        for axis in axes:
            axis.axvspan(start / 60, end / 60, color="tab:red", alpha=0.15, linewidth=0)
    axes[0].axhline(scenario.device.passive_trip_c, color="red", linestyle="--", label="passive trip")
    axes[0].set_ylabel("degC")
    axes[0].legend(loc="lower right", fontsize=7)
    axes[1].set_ylim(1, scenario.max_rank * 1.02)
    axes[1].set_ylabel("rank")
    if scenario.battery_wh:
        axes[2].set_ylim(0, 100)
        axes[2].set_ylabel("battery %")
    axes[-1].set_xlabel("minutes (shaded: orange bursts, red sensor faults)")
    figure.suptitle(scenario.name)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    atomic_file(path, buffer.getvalue())
