"""Command-line tools: thin layers over the library. Every command spells shared options the same way."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import click

from deploy.atomic import check_output
from deploy.cli import MAX_CONTEXT_TOKENS, needs_extra, parse_ranks, user_errors
from deploy.external_data import model_file


def model_option(required=True, help="NSN checkpoint directory"):
    return click.option("--model", "model_path", type=click.Path(path_type=Path), required=required, help=help)


def output_option(help="output directory"):
    return click.option("--output", "output_path", type=click.Path(path_type=Path), required=True, help=help)


def overwrite_option():
    return click.option("--overwrite", is_flag=True, help="replace an existing output")


def parse_max_rank(value: str) -> int | float:
    """``"64"`` is an absolute rank (>= 1); ``"0.5"`` a fraction of each layer's ``min(d_in, d_out)``
    in (0, 1]. Checked before any model is loaded."""
    try:
        number: int | float = int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
    if (isinstance(number, int) and number >= 1) or (isinstance(number, float) and 0 < number <= 1):
        return number
    raise click.BadParameter(f"{value!r} is neither an int >= 1 (absolute rank) nor a fraction in (0, 1]; "
                             f"e.g. --max-rank 64 or --max-rank 0.5", param_hint="--max-rank")


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@click.argument("source", type=click.Path(path_type=Path))
@output_option("NSN checkpoint directory to write")
@click.option("--targets", default="all-linear",
              help="all-linear | attention | mlp, or comma-separated module names / regular expressions")
@click.option("--max-rank", "max_rank", default="1.0",
              help="int: absolute rank per layer; float in (0, 1]: fraction of min(d_in, d_out)")
@click.option("--calibration-data", type=click.Path(path_type=Path), default=None,
              help="text or JSONL: factorise each layer data-aware, best on these activations at every rank")
@click.option("--calibration-tokens", default=16384, type=click.IntRange(1, 100_000_000),
              help="tokens of --calibration-data to collect statistics on")
@click.option("--fisher", is_flag=True,
              help="also weigh each layer's outputs by the loss's gradients (a backward pass per calibration batch; "
                   "needs --calibration-data)")
@overwrite_option()
@user_errors
@needs_extra("export")
def adapt_command(source, output_path, targets, max_rank, calibration_data, calibration_tokens, fisher, overwrite):
    """Factorise SOURCE — a local Hugging Face model directory, or a GGUF file (converted once into
    a cached directory) — into an NSN checkpoint."""
    from tqdm import tqdm

    from .checkpoint import save_nsn
    from .data import load_records, make_batches
    from .importing import imported_dir
    from .models import is_causal_lm, load_hf_model, load_tokenizer
    from .surgery import adapt

    if fisher and calibration_data is None:
        raise click.UsageError("--fisher weighs the layers by gradients on calibration text; add --calibration-data "
                               "FILE (text or JSONL)")
    check_output(output_path, [source], overwrite)
    max_rank_value = parse_max_rank(max_rank)
    records = load_records(calibration_data) if calibration_data else None
    if source.suffix.lower() == ".gguf":
        source = imported_dir(source, progress=lambda message: click.echo(message, err=True))
    model = load_hf_model(source)
    calibration = None
    if records is not None:
        calibration = make_batches(records, load_tokenizer(source), is_causal_lm(model), 16, 128)
    target_spec = targets if targets in ("all-linear", "attention", "mlp") else targets.split(",")
    with tqdm(file=sys.stderr) as bar:
        report = adapt(model, target_spec, max_rank_value, progress=phase(bar, "factorising (SVD)", "layer"),
                       calibration=calibration, calibration_tokens=calibration_tokens, fisher=fisher,
                       calibration_progress=phase(bar, "collecting input statistics", "batch"),
                       fisher_progress=phase(bar, "collecting output gradients", "batch"))
    save_nsn(model, output_path, tokenizer_dir=source)
    click.echo(report.table())
    click.echo(f"wrote {output_path} (global rank range [1, {model.nsn_config.max_rank}])")


@click.command(context_settings={"show_default": True})
@model_option()
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="text file (one example per line) or JSONL with text (and label)")
@output_option("NSN checkpoint directory to write")
@click.option("--steps", default=100, type=click.IntRange(1, 10_000_000), help="optimiser steps")
@click.option("--batch-size", default=8, type=click.IntRange(1, 65_536))
@click.option("--lr", "learning_rate", default=5e-5)
@click.option("--max-length", default=128, type=click.IntRange(1, MAX_CONTEXT_TOKENS), help="tokens per example")
@click.option("--ranks", "ranks", default=None, help="lower ranks to sample (default: a grid of R/16 .. 7R/8)")
@click.option("--ranks-per-step", default=1, type=click.IntRange(1, 64), help="lower ranks sampled per step, besides the anchor")
@click.option("--schedule", type=click.Choice(["curriculum", "uniform"]), default="curriculum")
@click.option("--distill", type=click.Choice(["kl", "cosine", "mse"]), default=None,
              help="distil lower ranks to the full-rank output (for data without labels)")
@click.option("--teacher", "teacher_path", type=click.Path(path_type=Path), default=None,
              help="original dense model directory to distil every rank towards")
@overwrite_option()
@user_errors
@needs_extra("export")
def train_command(model_path, data_path, output_path, steps, batch_size, learning_rate, max_length, ranks,
                  ranks_per_step, schedule, distill, teacher_path, overwrite):
    """Train all ranks of an NSN checkpoint jointly (the paper's multi-rank objective)."""
    from .checkpoint import load_nsn, save_nsn
    from .data import TokenizedDataset, load_records
    from .models import is_causal_lm, load_hf_model, load_tokenizer
    from .objective import MultiRankObjective
    from .trainer import train_nsn

    check_output(output_path, [model_path, data_path, teacher_path], overwrite)
    lower_ranks = parse_ranks(ranks)
    model = load_nsn(model_path)
    tokenizer = load_tokenizer(model_path)
    records = load_records(data_path)
    causal = is_causal_lm(model)
    labelled = causal or "label" in records[0]
    if not labelled and distill is None:
        distill = "cosine"  # unlabelled encoder data: keep every rank's embeddings close to the teacher
    teacher = load_hf_model(teacher_path) if teacher_path else None
    objective = MultiRankObjective(model.nsn_config.max_rank, ranks=lower_ranks,
                                   samples_per_step=ranks_per_step, schedule=schedule, distill=distill)
    dataset = TokenizedDataset(records, tokenizer, max_length=max_length, causal_lm=causal)
    with tempfile.TemporaryDirectory(prefix="nsn-train-") as run_dir:  # Trainer's scratch space
        trainer = train_nsn(model, dataset, tokenizer, run_dir, objective, steps=steps, batch_size=batch_size,
                            learning_rate=learning_rate, teacher=teacher)
    if trainer.is_world_process_zero():  # under torchrun every process holds the same model
        save_nsn(model, output_path, tokenizer=tokenizer)
        click.echo(json.dumps(trainer.state.log_history[-1], indent=1))
        click.echo(f"wrote {output_path}; trained ranks {model.nsn_config.trained_ranks}")


def phase(bar, description: str, unit: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that shows one phase of work on a shared tqdm bar."""
    def advance(done: int, total: int) -> None:
        if getattr(bar, "phase", None) != description or bar.unit != unit or bar.total != total:
            bar.reset(total)
            bar.unit = unit
            bar.phase = description
            bar.set_description(description)
        bar.update(done - bar.n)
    return advance


def stage_printer():
    """Progress for multi-step work: each stage on stderr with the seconds since the start."""
    import time

    start = time.perf_counter()
    return lambda message: click.echo(f"[{time.perf_counter() - start:6.1f}s] {message}", err=True)


def checks_table(checks) -> str:
    return format_table([c.as_row() for c in checks])


@click.command(context_settings={"show_default": True})
@model_option()
@click.option("--opset", default=17, help="ONNX opset (14 or newer)")
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None,
              help="export directory [default: <model>-onnx]")
@click.option("--task", type=click.Choice(["auto", "text-generation", "feature-extraction"]), default="auto")
@click.option("--rank-mode", type=click.Choice(["slice", "mask"]), default="slice",
              help="slice: compute only the first rank components; mask: static shapes, zero the rest")
@click.option("--no-verify", is_flag=True, help="skip the comparison with PyTorch")
@click.option("--weights", type=click.Choice(["fp32", "int8"]), default="fp32",
              help="int8: factors and embeddings as int8, a scale per rank component or row (a quarter of the bytes; "
                   "every rank is still a prefix)")
@click.option("--dense", is_flag=True, help="export MODEL as it is (a Hugging Face directory or a GGUF file) with "
                                            "Optimum: the dense baseline nsn-bench --dense compares an NSN export with")
@click.option("--json", "as_json", is_flag=True, help="print the result (path, metadata, checks) as JSON")
@overwrite_option()
@user_errors
@needs_extra("export")
def export_command(model_path, opset, output_path, task, rank_mode, no_verify, weights, dense, as_json, overwrite):
    """Export an NSN checkpoint to ONE ONNX graph with a dynamic int64 rank input (or, with --dense,
    a plain model as Optimum exports it)."""
    from deploy.tensorrt.compat import check_graph

    from .checkpoint import load_nsn
    from .export import check_opset, export_dense_onnx, export_onnx

    output_path = output_path or model_path.with_name(model_path.name + "-onnx")
    check_output(output_path, [model_path], overwrite)
    check_opset(opset)
    progress = stage_printer()
    if dense:
        from .importing import imported_dir
        from .models import load_hf_model

        from .checkpoint import NSN_CONFIG_FILE

        if (model_path / NSN_CONFIG_FILE).is_file():
            raise click.BadParameter(f"{model_path} is an NSN checkpoint (it has {NSN_CONFIG_FILE}); --dense exports "
                                     f"the plain model it was adapted from: give that directory or GGUF file",
                                     param_hint="--model")
        source = imported_dir(model_path, progress=progress) if model_path.suffix.lower() == ".gguf" else model_path
        progress(f"loading {source}")
        path = export_dense_onnx(load_hf_model(source), output_path, opset=opset,
                                 task=None if task == "auto" else task)
        click.echo(json.dumps({"path": str(path), "dense": True}) if as_json else f"wrote {path} (dense, opset {opset})")
        return
    progress(f"loading {model_path}")
    model = load_nsn(model_path)
    result = export_onnx(model, output_path, opset=opset, rank_mode=rank_mode, task=None if task == "auto" else task,
                         overwrite=overwrite, tokenizer_dir=model_path, verify=not no_verify, progress=progress,
                         weights=weights)
    trt_problems = [str(p) for p in check_graph(result.path)]
    for problem in trt_problems:
        click.echo(f"warning: TensorRT would not build this graph with rank profiles: {problem}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), "task": result.task, "inputs": result.inputs,
                               "outputs": result.outputs, "metadata": result.metadata,
                               "checks": [c.as_row() for c in result.checks or []],
                               "tensorrt_problems": trt_problems}, indent=1))
        return
    if result.checks:
        click.echo(checks_table(result.checks))
    click.echo(f"wrote {result.path} (task {result.task}, rank in [1, {result.metadata['nsn.max_rank']}], "
               f"{rank_mode} mode, {weights} weights, opset {opset})")


@click.command(context_settings={"show_default": True})
@click.argument("onnx_path", type=click.Path(path_type=Path))
@model_option()
@click.option("--ranks", default=None, help="comma-separated ranks [default: min, max, trained, untrained, between]")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@user_errors
@needs_extra("export")
def verify_command(onnx_path, model_path, ranks, as_json):
    """Compare an exported graph with the PyTorch checkpoint at several ranks (prefill and decode)."""
    from .checkpoint import load_nsn
    from .verify import TOLERANCE, VerificationError, require_passed, verify_onnx

    onnx_path = model_file(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX file")
    rank_list = parse_ranks(ranks)
    checks = verify_onnx(onnx_path, load_nsn(model_path), ranks=rank_list, progress=stage_printer())
    click.echo(json.dumps([c.as_row() for c in checks], indent=1) if as_json else checks_table(checks))
    try:
        require_passed(checks)
    except VerificationError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"all {len(checks)} checks within the fp32 tolerance {TOLERANCE:g}", err=True)
