"""``nsn-bench``: the performance comparison of docs/PERFORMANCE.md, as one command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from deploy.cli import MAX_CONTEXT_TOKENS, MAX_REPEATS, FiniteFloat, Threads, check_context, user_errors


def bench_markdown(report: dict) -> str:
    """Per-phase tables (markdown, as in docs/PERFORMANCE.md; they read fine in a terminal too)."""
    lines = []
    for phase in ("prefill", "decode"):
        lines += [f"**{phase}** (median ms; ratio to the specialist in brackets)", "",
                  "| rank | FLOPs | dynamic (plain ORT) | dynamic, mask mode | dynamic + weight views | specialist "
                  "| dense (Optimum) | views vs dense | specialist vs dense |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in report["rows"]:
            data = row[phase]
            ratio, speedup = data["ratio_vs_specialist"], data["speedup_vs_dense"]
            cells = " | ".join(f"{data[v]['median_ms']:.1f} ({ratio[v]:.2f})"
                               for v in ("dynamic", "dynamic_mask", "dynamic_views"))
            lines.append(f"| {row['rank']} | {row['flops_fraction']:.3f} | {cells} | {data['specialist']['median_ms']:.1f} "
                         f"| {data['dense']['median_ms']:.1f} | {speedup['dynamic_views']:.2f}x "
                         f"| {speedup['specialist']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def bench_summary(report: dict) -> str:
    """Switch cost, memory, bandwidth and the targets, one line each."""
    switch, memory = report["switch"], report["memory"]
    fractions = ", ".join(f"r{row['rank']}: {row['decode']['bandwidth_fraction']['dynamic_views']:.2f}"
                          for row in report["rows"])
    targets = ", ".join(f"{name} {check['value']} ({'met' if check['met'] else 'NOT met'})"
                        for name, check in report["targets"].items())
    return "\n".join([
        f"rank switch {switch['ranks'][0]}<->{switch['ranks'][1]} between decode calls: "
        f"{switch['added_ms_per_switch']:+.3f} ms per call (standard error {switch['standard_error_ms']:.3f} ms; "
        f"setter {switch['rank_setter_us']:.1f} us)",
        f"one weight-views session serving all ranks: RSS +{memory['views_session_rss_delta_bytes'] / 2**20:.0f} MiB "
        f"= {memory['views_session_rss_delta_over_all_weight_bytes']:.2f}x the full-rank model's weight bytes "
        f"({memory['all_weight_bytes'] / 2**20:.0f} MiB, of which factors {memory['factor_bytes'] / 2**20:.0f} MiB)",
        f"decode bandwidth fraction (views; copy bandwidth {report['machine']['copy_bandwidth_gbs']} GB/s): {fractions}",
        f"targets: {targets}",
    ])


def read_report(path: Path) -> dict:
    """An earlier ``--output`` of nsn-bench; a file that is not one is a clear error."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}); pass a file written by nsn-bench --output") from None
    if not isinstance(report, dict) or not {"rows", "switch", "memory", "targets", "machine"} <= set(report):
        raise ValueError(f"{path}: not an nsn-bench report (rows, switch, memory, targets, machine expected); "
                         f"pass a file written by nsn-bench --output")
    return report


@click.command(context_settings={"show_default": True})
@click.option("--shape", type=click.Choice(["tiny", "realistic"]), default="tiny",
              help="tiny: CI smoke test; realistic: 0.5B-class Llama-style decoder")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/bench"),
              help="exported graphs are cached here")
@click.option("--threads", default=2, type=Threads(), help="ONNX Runtime intra-op threads")
@click.option("--prefill-tokens", default=128, type=click.IntRange(1, MAX_CONTEXT_TOKENS))
@click.option("--cache-tokens", default=128, type=click.IntRange(1, MAX_CONTEXT_TOKENS),
              help="KV cache length before the decode step")
@click.option("--decode-runs", default=60, type=click.IntRange(1, 100 * MAX_REPEATS))
@click.option("--prefill-runs", default=12, type=click.IntRange(1, MAX_REPEATS))
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None, help="write JSON here")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--markdown", is_flag=True, help="print markdown tables (as in docs/PERFORMANCE.md)")
@click.option("--from-json", "from_json", type=click.Path(path_type=Path, exists=True), default=None,
              help="format an earlier --output instead of measuring again")
@user_errors
def bench_command(shape, work_dir, threads, prefill_tokens, cache_tokens, decode_runs, prefill_runs,
                  output_path, as_json, markdown, from_json):
    """Dynamic-rank graph vs per-rank specialist vs dense Optimum export, on ONNX Runtime CPU."""
    from deploy.atomic import atomic_file, check_output_files
    from deploy.extras import require_extra

    from .bench import run_benchmark

    start = time.perf_counter()
    report_progress = lambda m: click.echo(f"[{time.perf_counter() - start:7.1f}s] {m}", err=True)  # noqa: E731
    check_output_files({"--output": output_path}, [from_json, work_dir])
    if from_json:
        report = read_report(from_json)
    else:
        require_extra("export", "nsn-bench (it exports the models it compares)")
        report = run_benchmark(shape, work_dir, threads, prefill_tokens, cache_tokens, decode_runs, prefill_runs,
                               progress=report_progress)
    text = json.dumps(report, indent=1)
    if output_path and not from_json:
        atomic_file(output_path, text + "\n")
        report_progress(f"wrote {output_path}")
    if as_json:
        click.echo(text)
    else:
        click.echo(bench_markdown(report) + ("" if markdown else "\n" + bench_summary(report)))


@click.command(context_settings={"show_default": True})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), default=None,
              help="measure this nsn-trt engine of the export (needs TensorRT and a GPU)")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="text file or JSONL with text [default: English sentences from Python's own docs]")
@click.option("--ranks", default="auto", help="auto (a geometric ladder refined where quality changes fastest) "
                                              "or comma-separated ranks")
@click.option("--budget-s", default=240.0, type=FiniteFloat(1, 86_400), help="time budget of --ranks auto")
@click.option("--texts", default=256, type=click.IntRange(1, 100_000), help="texts to measure quality on")
@click.option("--batch", default=32, type=click.IntRange(1, 4096), help="sentences per timed batch (encoders)")
@click.option("--prompt-tokens", default=128, type=click.IntRange(1, MAX_CONTEXT_TOKENS),
              help="prefill length (decoders; within the model's context)")
@click.option("--context-tokens", default=128, type=click.IntRange(1, MAX_CONTEXT_TOKENS),
              help="KV cache before decode (decoders; within the model's context)")
@click.option("--repeats", default=7, type=click.IntRange(1, MAX_REPEATS), help="timed repetitions per rank, interleaved")
@click.option("--threads", default=None, type=Threads(), help="ONNX Runtime intra-op threads")
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=Path("frontier.json"))
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="quality against latency and FLOPs, levels and profile ranges marked (needs matplotlib)")
@click.option("--json", "as_json", is_flag=True, help="print the frontier instead of a table")
@user_errors
def calibrate_command(export_dir, engine_dir, data_path, ranks, budget_s, texts, batch, prompt_tokens,
                      context_tokens, repeats, threads, output_path, plot_path, as_json):
    """Measure EXPORT_DIR across ranks on this device; write frontier.json (and a plot)."""
    import sys

    from tqdm import tqdm

    from deploy.atomic import atomic_file, check_output_files
    from deploy.cli import checked_ranks, parse_ranks
    from deploy.extras import require_extra
    from deploy.frontier import check_same_weights
    from deploy.external_data import model_file
    from deploy.governor.sensors import SysfsSensors
    from deploy.text import english_sentences, load_records

    from .calibrate import Calibration, device_description

    model_path = model_file(export_dir)
    rank_list = None if ranks == "auto" else parse_ranks(ranks)
    check_output_files({"--output": output_path, "--plot": plot_path}, [export_dir, engine_dir, data_path])
    if plot_path is not None:  # before minutes of measuring
        require_extra("plot", "nsn-calibrate --plot")
    refuse_clobbering(output_path)
    sample = [r["text"] for r in load_records(data_path)] if data_path else english_sentences(texts)
    if engine_dir is not None:
        from deploy.tensorrt.engine import NSNEngine

        runtime = NSNEngine(engine_dir)
        check_same_weights(runtime.info.weights_sha256, str(engine_dir / "engine.json"), model_path)
        backend = {"runtime": f"TensorRT {runtime.providers[0]}", "engine": str(engine_dir)}
    else:
        from deploy.ort.session import NSNSession, ort

        runtime = NSNSession(export_dir, intra_op_threads=threads)
        backend = {"runtime": f"onnxruntime {ort.__version__} ({runtime.providers[0]})", "threads": threads,
                   "weight_views": runtime.weight_views}
    backend["device"] = device_description()
    if rank_list:
        rank_list = sorted(set(checked_ranks(rank_list, runtime.info.max_rank)))
    if runtime.info.task == "text-generation":
        check_context(runtime.max_length, prompt=prompt_tokens, context=context_tokens)
    sensors = SysfsSensors("/")
    if sensors.read().power_w is None:
        sensors = None
    calibration = Calibration(runtime, sample[:texts], batch, prompt_tokens, context_tokens, repeats, sensors)
    with tqdm(desc="calibrating", unit="step", file=sys.stderr) as bar:
        calibration.run(rank_list, budget_s, progress=lambda message: (bar.update(), bar.set_postfix_str(message[:60])))
    frontier = calibration.frontier(model_path, backend)
    atomic_file(output_path, json.dumps(frontier, indent=1, allow_nan=False) + "\n")
    if plot_path is not None:
        from .plot import plot_frontier

        plot_frontier(frontier, plot_path)
    if as_json:
        click.echo(json.dumps(frontier, indent=1))
        return
    click.echo(frontier_markdown(frontier))
    click.echo(f"\nwrote {output_path}: levels {frontier['levels']}, TensorRT profiles {frontier['profiles']}",
               err=True)


def refuse_clobbering(output_path: Path) -> None:
    """Replace an existing --output only if it is a frontier (never a model or another file)."""
    from deploy.frontier import read_frontier

    if output_path.exists():
        try:
            read_frontier(output_path)
        except (ValueError, OSError):
            raise ValueError(f"{output_path} exists and is not a frontier.json; it is not replaced: choose another "
                             f"--output") from None


def frontier_markdown(frontier: dict) -> str:
    """The frontier as a markdown table (reads fine in a terminal too)."""
    phases = list(frontier["rows"][0]["latency_ms"])
    lines = ["| rank | FLOPs | " + " | ".join(f"{p} ms (median / p90)" for p in phases)
             + f" | quality ({frontier['quality_metric']}) | power W | Pareto | level |",
             "|---:|---:|" + "---:|" * len(phases) + "---:|---:|:---:|:---:|"]
    for row in frontier["rows"]:
        latency = " | ".join(f"{row['latency_ms'][p]['median']:.1f} / {row['latency_ms'][p]['p90']:.1f}" for p in phases)
        lines.append(f"| {row['rank']} | {row['flops_fraction']:.3f} | {latency} | "
                     f"{'—' if row['quality'] is None else format(row['quality'], '.4f')} | "
                     f"{'—' if row['power_w'] is None else row['power_w']} | {'yes' if row['pareto'] else ''} | "
                     f"{'yes' if row['rank'] in frontier['levels'] else ''} |")
    return "\n".join(lines)
