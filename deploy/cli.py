"""``nsn-run``: generate text or embed sentences with an exported NSN graph at chosen ranks; and
the option parsing and error reporting every ``nsn-*`` command shares (torch-free)."""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path

import click

from .extras import MissingExtraError, require_extra
from .metadata import OptionValueError, validate_rank
from .tensorrt.cuda import CudaError, TensorRTUnavailable


def parse_ranks(value: str | None) -> list[int] | None:
    """``"8,16,32"`` -> ``[8, 16, 32]``; ``None`` when not given. A list with no rank is an error."""
    if value is None:
        return None
    try:
        ranks = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give ranks as comma-separated integers, e.g. 8,16,32",
                                 param_hint="--ranks") from None
    if not ranks:
        raise click.BadParameter(f"{value!r} names no rank; give comma-separated integers, e.g. 8,16,32",
                                 param_hint="--ranks")
    return ranks


class FiniteFloat(click.FloatRange):
    """A float option within a range that is also finite: ``nan`` and ``inf`` are never a setting."""

    name = "finite float"

    def convert(self, value, param, ctx):
        result = super().convert(value, param, ctx)
        if not math.isfinite(result):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return result


def checked_ranks(ranks: list[int] | None, max_rank: int) -> list[int]:
    """``--ranks`` checked against the model (exit 2 on a rank outside ``[1, max_rank]``); the
    maximum rank when none were given."""
    return [validate_rank(r, max_rank, "--ranks") for r in ranks] if ranks else [max_rank]


def needs_extra(extra: str):
    """A command that needs ``extra``: without it, one line naming the install command (exit 1).
    Place it under ``@user_errors``."""
    def decorate(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            require_extra(extra, click.get_current_context().command_path)
            return command(*args, **kwargs)
        return run
    return decorate


def user_errors(command):
    """Show errors a user can meet as one clear line, not a traceback: our ``ValueError``s (bad
    values, damaged files; exit 1, or 2 for a bad option value) and the operating system's
    (unwritable output, full disk, ...)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OptionValueError as error:
            raise click.UsageError(str(error)) from None
        except MissingExtraError as error:
            raise click.ClickException(str(error)) from None
        except (ValueError, TensorRTUnavailable, CudaError) as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            if error.filename is None:  # raised by us with a full message
                raise click.ClickException(str(error)) from None
            raise click.ClickException(f"{error.filename}: {error.strerror}; check the path and its "
                                       f"permissions") from None
    return run


@click.command(context_settings={"show_default": True})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--ranks", default=None, help="comma-separated ranks to run at, in turn [default: the maximum]")
@click.option("--prompt", default=None, help="text to continue (decoder exports)")
@click.option("--text", "texts", multiple=True, help="sentence to embed (encoder exports); repeatable")
@click.option("--max-new-tokens", default=32, type=click.IntRange(min=1))
@click.option("--sample", is_flag=True, help="sample instead of greedy decoding")
@click.option("--temperature", default=1.0, type=FiniteFloat(min=0, min_open=True))
@click.option("--top-k", default=0, type=click.IntRange(min=0), help="sample among the k most likely (0: all)")
@click.option("--seed", default=None, type=int)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="ONNX Runtime intra-op threads")
@click.option("--provider", "providers", multiple=True, help="execution provider(s) [default: CUDA if present, else CPU]")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def run_command(model_dir, ranks, prompt, texts, max_new_tokens, sample, temperature, top_k, seed, threads,
                providers, as_json):
    """Run MODEL_DIR (an nsn-export output) at each of --ranks on --prompt or --text."""
    from .runtime import NonFiniteOutputWarning
    from .ort.session import NSNSession

    if (prompt is None) == (not texts):
        raise click.UsageError("give exactly one of --prompt (decoders) or --text (encoders)")
    rank_list = parse_ranks(ranks)
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", NonFiniteOutputWarning)  # a NaN answer is a failure, not a result
        session = NSNSession(model_dir, providers=list(providers) or None, intra_op_threads=threads)
        try:
            for rank in checked_ranks(rank_list, session.info.max_rank):
                session.rank = rank
                reports.append(run_once(session, prompt, list(texts), max_new_tokens, sample, temperature, top_k,
                                        seed))
        except NonFiniteOutputWarning as error:
            raise click.ClickException(str(error)) from None
    for warning in {str(w.message) for w in caught}:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(reports if rank_list and len(rank_list) > 1 else reports[0], indent=1))
        return
    for report in reports:
        for key, value in report.items():
            if key == "embeddings":
                for text, row in zip(texts, value):
                    click.echo(f"embedding[{len(row)}] {row[:4]}... for {text!r}")
            else:
                click.echo(f"{key}: {value}")


def run_once(session, prompt, texts, max_new_tokens, sample, temperature, top_k, seed) -> dict:
    """One rank's result: generated text and latencies, or embeddings and their warm latency."""
    if prompt is not None:
        result = session.generate(prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                                  temperature=temperature, top_k=top_k, seed=seed)
        report = {"rank": session.rank, "text": result.text, "token_ids": result.token_ids,
                  "prefill_ms": round(result.prefill_ms, 3),
                  "decode_ms_per_token": round(result.decode_ms_per_token, 3)}
    else:
        session.embed(texts)  # warm-up: the first call allocates and plans
        start = time.perf_counter()
        embeddings = session.embed(texts)
        report = {"rank": session.rank, "latency_ms": round((time.perf_counter() - start) * 1e3, 3),
                  "embeddings": [[round(float(v), 5) for v in row] for row in embeddings]}
    report["flops_fraction"] = round(session.info.flops_fraction(session.rank), 4)
    report["providers"] = session.providers
    return report
