"""Command-line tools: thin layers over the library. Every command spells shared options the same way."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import click

from deploy.atomic import check_output
from deploy.cli import MAX_CONTEXT_TOKENS, MAX_REPEATS, checked_ranks, needs_extra, parse_ranks, user_errors
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


@click.command(context_settings={"show_default": True})
@model_option()
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="text file or JSONL (with label for classifiers)")
@click.option("--retrieval", is_flag=True,
              help="also score the retrieval benchmarks, top-1: docstring sentence -> qualified name (in domain) and, "
                   "where Debian's manual pages are installed, NAME line -> command (out of domain)")
@click.option("--ranks", default=None, help="comma-separated ranks (default: R/8, R/4, R/2, 3R/4, R)")
@click.option("--batch-size", default=16, type=click.IntRange(1, 65_536))
@click.option("--max-length", default=128, type=click.IntRange(1, MAX_CONTEXT_TOKENS))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@user_errors
@needs_extra("export")
def eval_command(model_path, data_path, retrieval, ranks, batch_size, max_length, as_json):
    """Evaluate an NSN checkpoint at several ranks: loss, accuracy / perplexity, embedding cosine,
    retrieval top-1, FLOPs fraction."""
    from tqdm import tqdm

    from .checkpoint import load_nsn
    from .data import load_records, make_batches
    from .evaluate import evaluate_ranks
    from .flops import flops_fraction
    from .models import is_causal_lm, load_tokenizer

    if data_path is None and not retrieval:
        raise click.UsageError("give --data FILE, --retrieval, or both")
    given_ranks = parse_ranks(ranks)
    records = load_records(data_path) if data_path else None
    model = load_nsn(model_path)
    if retrieval and is_causal_lm(model):
        raise click.UsageError("--retrieval scores sentence embeddings: it needs an encoder checkpoint")
    top = model.nsn_config.max_rank
    default_ranks = sorted({max(1, top * k // 8) for k in (1, 2, 4, 6, 8)})
    rank_list = checked_ranks(given_ranks, top) if given_ranks else default_ranks
    tokenizer = load_tokenizer(model_path)
    rows = [{"rank": r, "flops_fraction": round(flops_fraction(model, r), 4)} for r in rank_list]
    with tqdm(total=len(rank_list) * (bool(records) + retrieval), desc="evaluating ranks", unit="rank",
              file=sys.stderr) as bar:
        if records:
            batches = make_batches(records, tokenizer, is_causal_lm(model), batch_size, max_length)
            rows = evaluate_ranks(model, batches, rank_list, progress=lambda _: bar.update())
        if retrieval:
            from calibration.corpus import manpage_pairs
            from calibration.retrieval import docstring_pairs, top1_accuracy

            pairs, man_pairs = docstring_pairs(), manpage_pairs()
            for row in rows:
                embed = embedder(model, tokenizer, row["rank"], batch_size, max_length)
                row["retrieval_top1"] = round(top1_accuracy(embed, pairs), 4)
                if man_pairs:  # out of domain: no manual page is training text
                    row["manpage_top1"] = round(top1_accuracy(embed, man_pairs), 4)
                bar.update()
    click.echo(json.dumps(rows, indent=1) if as_json else format_table(rows))
    if retrieval and not as_json:
        click.echo(f"\nretrieval_top1: {len(pairs)} standard-library docstring sentences -> the name they document "
                   f"(in domain); " + (f"manpage_top1: {len(man_pairs)} manual pages' NAME lines -> their command "
                                       f"(out of domain)." if man_pairs else "manpage_top1: omitted, no manual pages "
                                                                             "under /usr/share/man here."), err=True)


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


def embedder(model, tokenizer, rank_value: int | None, batch_size: int, max_length: int):
    """``embed(texts)``: a torch model's sentence embeddings (mean-pooled) at ``rank_value``."""
    import torch

    from .data import make_batches
    from .evaluate import outputs_at

    def embed(texts):
        batches = make_batches([{"text": t} for t in texts], tokenizer, False, batch_size, max_length)
        return torch.cat(outputs_at(model, batches, rank_value)[1]).float().numpy()

    return embed


@click.command(context_settings={"show_default": True})
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=Path("runs/quickstart"),
              help="work directory (checkpoint and export are written here)")
@model_option(required=False, help="use this NSN checkpoint of MiniLM instead of adapting the built-in one")
@click.option("--sentences", default=64, type=click.IntRange(1, 100_000), help="English sentences (from Python's own docs) to embed")
@click.option("--ranks", default="24,48,96,128,192,288,384", help="comma-separated ranks to compare")
@click.option("--repeats", default=5, type=click.IntRange(1, MAX_REPEATS), help="timed ONNX Runtime runs per rank (median reported)")
@click.option("--init", "init", type=click.Choice(["data-aware", "svd"]), default=None,
              help="how the built-in model is factorised (not with --model): data-aware (the default), whitened by "
                   "the input statistics of standard-library docstring sentences (about 15 s), or plain SVD truncation")
@click.option("--calibration-tokens", default=16384, type=click.IntRange(1, 100_000_000), help="tokens for --init data-aware")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@user_errors
@needs_extra("export")
def quickstart_command(output_path, model_path, sentences, ranks, repeats, init, calibration_tokens, as_json):
    """The whole path on the built-in MiniLM encoder: adapt (data-aware) -> export (opset 17) -> verify -> run.

    Prints per rank the FLOPs fraction, ONNX Runtime latency, the cosine similarity of the sentence
    embeddings to the dense PyTorch model's and top-1 on the built-in retrieval benchmark.
    """
    if init is not None and model_path is not None:
        raise click.UsageError(f"--init {init} factorises the built-in model, but --model {model_path} is already "
                               "an NSN checkpoint: drop --init, or drop --model to adapt the built-in model")
    init = init or "data-aware"
    import statistics
    import time

    import numpy as np

    from deploy import NSNSession

    from .checkpoint import load_nsn, save_nsn
    from .data import english_sentences, make_batches
    from .evaluate import outputs_at
    from .export import export_dense_onnx, export_onnx
    from .models import default_model_dir, load_hf_model, load_tokenizer
    from .surgery import adapt

    rank_list = parse_ranks(ranks)
    progress = stage_printer()
    source = default_model_dir()
    progress(f"loading all-MiniLM-L6-v2 from {source}")
    tokenizer = load_tokenizer(source)
    texts = english_sentences(sentences)
    batches = make_batches([{"text": t} for t in texts], tokenizer, False, len(texts), 128)
    model = load_hf_model(source)
    dense = outputs_at(model, batches, None)[1][0].numpy()
    dense_path = export_dense_onnx(model, output_path / "minilm-dense-onnx")
    progress(f"exported the dense model with Optimum -> {dense_path} (the baseline without NSN)")
    from calibration.retrieval import docstring_pairs, top1_accuracy, unseen_sentences

    pairs = docstring_pairs()
    trained = model_path is not None
    if model_path is None:
        calibration = None
        if init == "data-aware":
            calibration = make_batches([{"text": t} for t in unseen_sentences(texts, pairs=pairs)], tokenizer,
                                       False, 16, 64)
            progress(f"collecting input statistics over {calibration_tokens} tokens of standard-library docstring "
                     "sentences (none of them evaluated below)")
        # the dense baseline is taken: factorise in place
        report = adapt(model, "all-linear", 1.0, calibration=calibration, calibration_tokens=calibration_tokens)
        model_path = save_nsn(model, output_path / "minilm-nsn", tokenizer_dir=source)
        how = (f"whitened SVD on {model.nsn_config.calibration_tokens} tokens" if calibration is not None
               else "plain SVD")
        progress(f"adapted {len(report.layers)} linear layers ({how}; R_l = min(d_in, d_out)) -> {model_path}")
    else:
        model = load_nsn(model_path)
    export_dir = output_path / "minilm-nsn-onnx"
    result = export_onnx(model, export_dir, opset=17, overwrite=True, tokenizer_dir=model_path, progress=progress)
    worst = max(c.max_rel_error for c in result.checks)
    progress(f"exported and verified {result.path} at ranks {sorted({c.rank for c in result.checks})} "
             f"(worst relative error {worst:.1e})")

    def timed(embed) -> tuple[np.ndarray, float]:
        embeddings, timings = embed(), []
        for _ in range(repeats):
            start = time.perf_counter()
            embed()
            timings.append((time.perf_counter() - start) * 1e3)
        return embeddings, round(statistics.median(timings), 2)

    def cosine(embeddings: np.ndarray) -> float:
        norms = np.linalg.norm(embeddings, axis=-1) * np.linalg.norm(dense, axis=-1)
        return round(float((np.sum(embeddings * dense, -1) / norms).mean()), 4)

    session = NSNSession(export_dir)
    baseline = dense_embedder(dense_path, session)
    embeddings, latency = timed(lambda: baseline(texts))
    rows = [{"rank": "dense", "flops_fraction": 1.0, "ort_latency_ms": latency, "cosine_to_dense": cosine(embeddings),
             "retrieval_top1": round(top1_accuracy(lambda batch: np.concatenate(
                 [baseline(batch[i:i + 64]) for i in range(0, len(batch), 64)]), pairs), 3)}]
    for rank_value in rank_list:
        session.rank = rank_value
        # one batch of every sentence, as the dense baseline runs them
        embeddings, latency = timed(lambda: session.embed(texts, normalize=False, batch_size=max(1, len(texts))))
        rows.append({"rank": rank_value, "flops_fraction": round(session.info.flops_fraction(rank_value), 4),
                     "ort_latency_ms": latency, "cosine_to_dense": cosine(embeddings),
                     "retrieval_top1": round(top1_accuracy(session.embed, pairs), 3)})
    progress(f"ran {len(texts)} sentences per call on {session.providers[0]}")
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(format_table(rows))
    start = "data-aware initialisation" if init == "data-aware" else "plain SVD truncation"
    state = (f"the checkpoint {model_path}" if trained else f"UNTRAINED ({start}): low ranks get much better "
             "with multi-rank training (nsn-train, scripts/distill_minilm.py)")
    click.echo(f"\nretrieval_top1: share of {len(pairs)} standard-library docstring sentences whose nearest "
               f"qualified name (e.g. json.dumps) is the one they document."
               f"\ncosine_to_dense: sentence embeddings against the dense PyTorch model's (1.0 = identical); "
               f"model: {state}.\nflops_fraction: FLOPs per token against the dense model; above 1, a factorised "
               f"layer (2r(d_in + d_out) at rank r) costs more than the dense one.")


def dense_embedder(model_path: Path, like):
    """Mean-pooled embeddings from a dense encoder export, tokenised like the NSN session ``like``."""
    import onnxruntime as ort

    from deploy.ort.session import input_shapes
    from deploy.text import encoder_feeds, mean_pool

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = input_shapes(session)

    def embed(texts):
        feeds = encoder_feeds(like.tokenizer, texts, names)
        return mean_pool(session.run(["last_hidden_state"], feeds)[0], feeds["attention_mask"])

    return embed


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
@click.option("--json", "as_json", is_flag=True, help="print the result (path, metadata, checks) as JSON")
@overwrite_option()
@user_errors
@needs_extra("export")
def export_command(model_path, opset, output_path, task, rank_mode, no_verify, as_json, overwrite):
    """Export an NSN checkpoint to ONE ONNX graph with a dynamic int64 rank input."""
    from deploy.tensorrt.compat import check_graph

    from .checkpoint import load_nsn
    from .export import check_opset, export_onnx

    output_path = output_path or model_path.with_name(model_path.name + "-onnx")
    check_output(output_path, [model_path], overwrite)
    check_opset(opset)
    progress = stage_printer()
    progress(f"loading {model_path}")
    model = load_nsn(model_path)
    result = export_onnx(model, output_path, opset=opset, rank_mode=rank_mode, task=None if task == "auto" else task,
                         overwrite=overwrite, tokenizer_dir=model_path, verify=not no_verify, progress=progress)
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
               f"{rank_mode} mode, opset {opset})")


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
