"""``nsn-trt``: plan, check, build, inspect and run TensorRT engines of an nsn-export directory.

``plan`` and ``check`` run anywhere (no TensorRT); ``build`` and ``run`` need TensorRT and a GPU
(on a Jetson, JetPack 6 provides both)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..cli import MAX_NEW_TOKENS, parse_ranks, ranks_to_run, user_errors
from ..external_data import model_file
from ..speculative import MAX_DRAFT_TOKENS
from .plan import ShapeBounds

MAX_TOKENS = 1 << 20  # a million tokens: beyond any context a device engine is built for


def profile_options(command):
    """The plan's flags, shared by ``plan`` and ``build`` (trtexec: --minShapes/--optShapes/--maxShapes)."""
    options = [
        click.option("--profiles", default="2", help="rank ranges: 1-64,65-192,193-448, or a count of ranges with "
                                                     "equal FLOPs span"),
        click.option("--max-batch", default=1, type=click.IntRange(1, 4096)),
        click.option("--max-seq", default=512, type=click.IntRange(1, MAX_TOKENS),
                     help="longest prompt (prefill) or input"),
        click.option("--max-context", default=1024, type=click.IntRange(1, MAX_TOKENS),
                     help="longest KV cache plus new token (decoders)"),
        click.option("--opt-seq", default=64, type=click.IntRange(1, MAX_TOKENS), help="typical prompt / input length"),
        click.option("--opt-context", default=256, type=click.IntRange(1, MAX_TOKENS),
                     help="typical context when decoding"),
        click.option("--draft-tokens", default=0, type=click.IntRange(0, MAX_DRAFT_TOKENS),
                     help="self-speculative decoding: decode profiles verify up to this many drafts (and one more "
                          "token) in a call; 0: one token per decode call"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def bounds_from(max_batch, max_seq, max_context, opt_seq, opt_context, draft_tokens=0) -> ShapeBounds:
    return ShapeBounds(max_batch=max_batch, max_seq=max_seq, max_context=max_context, opt_seq=opt_seq,
                       opt_context=opt_context, draft_tokens=draft_tokens)


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


@click.group()
def trt_command():
    """TensorRT engines with an optimization profile per rank range (prefill and decode)."""


@trt_command.command("plan")
@click.argument("export_dir", type=click.Path(path_type=Path))
@profile_options
@click.option("--json", "as_json", is_flag=True)
@user_errors
def plan_command(export_dir, profiles, max_batch, max_seq, max_context, opt_seq, opt_context, draft_tokens, as_json):
    """Print the optimization profiles EXPORT_DIR's engine would have (no TensorRT needed)."""
    from .plan import plan_for_export, plan_json

    plan = plan_for_export(export_dir, profiles, bounds_from(max_batch, max_seq, max_context, opt_seq,
                                                                 opt_context, draft_tokens))
    if as_json:
        click.echo(plan_json(plan))
        return
    click.echo(f"{len(plan.ranges)} rank range(s) x {len(plan.profiles) // len(plan.ranges)} phase(s) = "
               f"{len(plan.profiles)} profiles; opt rank = the FLOPs midpoint of each range")
    print_table(plan.table())


@trt_command.command("check")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--trt-version", default="10.3", help="TensorRT version to check against (10.x)")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def check_command(export_dir, trt_version, as_json):
    """Will TensorRT build EXPORT_DIR with rank as a shape input? Exit 1 and each problem if not."""
    from .compat import check_graph

    if not model_file(export_dir).is_file():
        raise FileNotFoundError(f"{export_dir}: no model.onnx here; run nsn-export first")
    problems = check_graph(export_dir, trt_version)
    if as_json:
        click.echo(json.dumps([{"node": p.node, "problem": p.message, "fix": p.fix} for p in problems], indent=1))
    else:
        for problem in problems:
            click.echo(f"problem: {problem}")
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s): TensorRT {trt_version} would not build this graph "
                                   f"with rank profiles")
    if not as_json:
        click.echo(f"ok: TensorRT {trt_version} can build {export_dir} with rank as a shape input")


@trt_command.command("build")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--output", "output_path", type=click.Path(path_type=Path), required=True, help="engine directory")
@profile_options
@click.option("--fp16", is_flag=True, help="allow FP16 kernels (trtexec --fp16); TensorRT 10 only")
@click.option("--workspace-mib", default=1024, type=click.IntRange(1, 1 << 20), help="trtexec --memPoolSize=workspace:N")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="read and update this timing cache (trtexec --timingCacheFile); device-specific")
@click.option("--opt-level", default=3, type=click.IntRange(0, 5), help="trtexec --builderOptimizationLevel")
@click.option("--overwrite", is_flag=True, help="replace an existing engine directory")
@user_errors
def build_command(export_dir, output_path, profiles, max_batch, max_seq, max_context, opt_seq, opt_context,
                  draft_tokens, fp16, workspace_mib, timing_cache, opt_level, overwrite):
    """Build ONE engine for EXPORT_DIR with a prefill and a decode profile per rank range."""
    from tqdm import tqdm

    from ..atomic import check_output
    from .build import BuildOptions, build_engine
    from .plan import plan_for_export

    from ..metadata import read_model_info

    check_output(output_path, [export_dir], overwrite)
    plan = plan_for_export(export_dir, profiles, bounds_from(max_batch, max_seq, max_context, opt_seq,
                                                                 opt_context, draft_tokens))
    if read_model_info(export_dir).weights == "int8":
        click.echo("warning: this is an int8 export (DequantizeLinear of rank-sliced int8 factors); TensorRT builds "
                   "of int8 exports are not verified yet: if the build fails or runs in fp32, build the fp32 export "
                   "(docs/PERFORMANCE.md, int8)", err=True)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, step: int, steps: int) -> None:
        bar = bars.get(phase) or bars.setdefault(phase, tqdm(total=steps, desc=phase, file=sys.stderr, leave=False))
        bar.update(step - bar.n)

    options = BuildOptions(fp16=fp16, workspace_mib=workspace_mib, opt_level=opt_level,
                           timing_cache=str(timing_cache) if timing_cache else None)
    try:
        engine_dir = build_engine(export_dir, output_path, plan, options, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    click.echo(f"wrote {engine_dir} ({len(plan.profiles)} profiles for ranks "
               f"{', '.join(map(str, plan.ranges))})")


@trt_command.command("inspect")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@user_errors
def inspect_command(engine_dir, as_json):
    """Print an engine's manifest: TensorRT version, GPU, build flags and profiles (no GPU needed)."""
    from .engine import read_manifest
    from .plan import EnginePlan

    manifest = read_manifest(engine_dir)
    if as_json:
        click.echo(json.dumps(manifest, indent=1))
        return
    plan = EnginePlan.from_dict(manifest.get("plan", {}), source=str(engine_dir))
    click.echo(f"TensorRT {manifest.get('tensorrt_version')} on {manifest.get('gpu')} "
               f"(compute {manifest.get('compute_capability')}); build {manifest.get('build')}")
    print_table(plan.table())


@trt_command.command("run")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--ranks", default=None, help="comma-separated ranks to run at, in turn [default: the highest rank "
                                           "that costs no more than the dense model]")
@click.option("--prompt", default=None, help="text to continue (decoder engines)")
@click.option("--text", "texts", multiple=True, help="sentence to embed (encoder engines); repeatable")
@click.option("--max-new-tokens", default=32, type=click.IntRange(1, MAX_NEW_TOKENS),
              help="new tokens at most (with the prompt, within the model's context)")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def run_command(engine_dir, ranks, prompt, texts, max_new_tokens, as_json):
    """Run ENGINE_DIR at each of --ranks on --prompt or --text (mirrors nsn-run)."""
    from ..cli import check_run_inputs, run_once
    from .engine import NSNEngine

    if (prompt is None) == (not texts):
        raise click.UsageError("give exactly one of --prompt (decoders) or --text (encoders)")
    rank_list = parse_ranks(ranks)
    engine = NSNEngine(engine_dir)
    prompt = check_run_inputs(engine, prompt, list(texts), max_new_tokens)
    reports = []
    run_ranks, why = ranks_to_run(engine, rank_list)
    for rank in run_ranks:
        engine.rank = rank
        report = {**run_once(engine, prompt, list(texts), max_new_tokens, False, 1.0, 0, None), "why": why}
        report["profile_switches"] = engine.profile_switches
        reports.append(report)
    engine.close()
    click.echo(json.dumps(reports, indent=1) if as_json else "\n".join(
        f"{key}: {value}" for report in reports for key, value in report.items() if key != "embeddings"))
