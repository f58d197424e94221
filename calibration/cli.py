"""``nsn-bench``: the performance comparison of docs/PERFORMANCE.md, as one command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from deploy.cli import user_errors


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
@click.option("--threads", default=2, type=click.IntRange(min=1), help="ONNX Runtime intra-op threads")
@click.option("--prefill-tokens", default=128, type=click.IntRange(min=1))
@click.option("--cache-tokens", default=128, type=click.IntRange(min=1), help="KV cache length before the decode step")
@click.option("--decode-runs", default=60, type=click.IntRange(min=1))
@click.option("--prefill-runs", default=12, type=click.IntRange(min=1))
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None, help="write JSON here")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--markdown", is_flag=True, help="print markdown tables (as in docs/PERFORMANCE.md)")
@click.option("--from-json", "from_json", type=click.Path(path_type=Path, exists=True), default=None,
              help="format an earlier --output instead of measuring again")
@user_errors
def bench_command(shape, work_dir, threads, prefill_tokens, cache_tokens, decode_runs, prefill_runs,
                  output_path, as_json, markdown, from_json):
    """Dynamic-rank graph vs per-rank specialist vs dense Optimum export, on ONNX Runtime CPU."""
    from deploy.atomic import atomic_file

    from .bench import run_benchmark

    start = time.perf_counter()
    report_progress = lambda m: click.echo(f"[{time.perf_counter() - start:7.1f}s] {m}", err=True)  # noqa: E731
    if from_json:
        report = read_report(from_json)
    else:
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
