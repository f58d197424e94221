"""``nsn-bench``: the performance comparison of docs/PERFORMANCE.md, as one command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


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


@click.command(context_settings={"show_default": True})
@click.option("--shape", type=click.Choice(["tiny", "realistic"]), default="tiny",
              help="tiny: CI smoke test; realistic: 0.5B-class Llama-style decoder")
@click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/bench"),
              help="exported graphs are cached here")
@click.option("--threads", default=2, help="ONNX Runtime intra-op threads")
@click.option("--prefill-tokens", default=128)
@click.option("--cache-tokens", default=128, help="KV cache length before the decode step")
@click.option("--decode-runs", default=60)
@click.option("--prefill-runs", default=12)
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None, help="write JSON here")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--markdown", is_flag=True, help="print markdown tables (as in docs/PERFORMANCE.md)")
@click.option("--from-json", "from_json", type=click.Path(path_type=Path, exists=True), default=None,
              help="format an earlier --output instead of measuring again")
def bench_command(shape, work_dir, threads, prefill_tokens, cache_tokens, decode_runs, prefill_runs,
                  output_path, as_json, markdown, from_json):
    """Dynamic-rank graph vs per-rank specialist vs dense Optimum export, on ONNX Runtime CPU."""
    from deploy.atomic import atomic_file

    from .bench import run_benchmark

    start = time.perf_counter()
    report_progress = lambda m: click.echo(f"[{time.perf_counter() - start:7.1f}s] {m}", err=True)  # noqa: E731
    if from_json:
        report = json.loads(from_json.read_text())
    else:
        try:
            report = run_benchmark(shape, work_dir, threads, prefill_tokens, cache_tokens, decode_runs, prefill_runs,
                                   progress=report_progress)
        except ValueError as error:
            raise click.ClickException(str(error)) from None
    text = json.dumps(report, indent=1)
    if output_path and not from_json:
        atomic_file(output_path, text + "\n")
        report_progress(f"wrote {output_path}")
    if as_json:
        click.echo(text)
    else:
        click.echo(bench_markdown(report) + ("" if markdown else "\n" + bench_summary(report)))
