"""``nsn-run``: generate text or embed sentences with an exported NSN graph at chosen ranks; and
the option parsing and error reporting every ``nsn-*`` command shares (torch-free)."""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from pathlib import Path

import click

from .extras import MissingExtraError, require_extra
from .metadata import OptionValueError, validate_rank
from .runtime import MAX_TEMPERATURE, MIN_TEMPERATURE
from .speculative import MAX_DRAFT_TOKENS, Speculation
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


class Threads(click.IntRange):
    """``--threads``: at least 1 and at most this machine's cores (more only contend for them)."""

    name = "threads"

    def __init__(self):
        super().__init__(min=1)

    def convert(self, value, param, ctx):
        result = super().convert(value, param, ctx)
        cores = os.cpu_count() or 1
        if result > cores:
            self.fail(f"{result} is above this machine's {cores} CPU cores; give at most {cores}", param, ctx)
        return result


# Upper bounds of counts: a typo (an extra zero, 10**9) is an error, never a run that does not end.
MAX_NEW_TOKENS = 100_000
MAX_REPEATS = 1_000
MAX_CONTEXT_TOKENS = 1_000_000
SEED_RANGE = click.IntRange(0, 2**63 - 1)


def check_run_inputs(runtime, prompt: str | list[int] | None, texts: list[str],
                     max_new_tokens: int) -> list[int] | None:
    """``nsn-run`` and ``nsn-trt run``: no empty text, and a prompt that fits the model's context
    with ``max_new_tokens`` (checked before any work). Returns the prompt's token ids (tokenised
    once, for every rank), or None for texts."""
    if any(not text.strip() for text in texts):
        raise click.UsageError("--text '' is empty; give a sentence to embed")
    if prompt is not None:
        if isinstance(prompt, str) and not prompt.strip():
            raise click.UsageError("--prompt '' is empty; give text to continue")
        try:
            ids = runtime.encode_prompt(prompt)
        except ValueError as error:
            raise click.UsageError(f"--prompt: {error}") from None
        length = len(ids)
        if length + max_new_tokens > runtime.max_length:
            raise click.UsageError(f"the prompt is {length} tokens and --max-new-tokens is {max_new_tokens}: "
                                   f"{length + max_new_tokens}, above the model's context of {runtime.max_length} "
                                   f"tokens; shorten the prompt or lower --max-new-tokens")
        return ids
    return None


def check_context(model_tokens: int, **options: int) -> None:
    """Token-count options (``prompt=128`` for ``--prompt-tokens``) within the model's context."""
    for name, tokens in options.items():
        if tokens > model_tokens:
            raise OptionValueError(f"--{name}-tokens {tokens} is above the model's context of {model_tokens} tokens; "
                                   f"give at most {model_tokens}")


def check_providers(providers: list[str], fallback: bool) -> None:
    """``--provider`` names ONNX Runtime execution providers this installation has (ONNX Runtime
    itself would warn and run on the CPU), unless ``--provider-fallback`` allows that."""
    if not providers or fallback:
        return
    import onnxruntime

    available = onnxruntime.get_available_providers()
    missing = [name for name in providers if name not in available]
    if missing:
        raise click.BadParameter(f"{', '.join(missing)} is not available in this ONNX Runtime "
                                 f"{onnxruntime.__version__} (available: {', '.join(available)}); install the build "
                                 f"that has it (onnxruntime-gpu for CUDAExecutionProvider), or pass "
                                 f"--provider-fallback to run on what is here", param_hint="--provider")


def checked_ranks(ranks: list[int] | None, max_rank: int) -> list[int]:
    """``--ranks`` checked against the model (exit 2 on a rank outside ``[1, max_rank]``); the
    maximum rank when none were given."""
    return [validate_rank(r, max_rank, "--ranks") for r in ranks] if ranks else [max_rank]


def ranks_to_run(runtime, ranks: list[int] | None) -> tuple[list[int], str]:
    """``--ranks`` checked against the model, or the runtime's default ceiling; and why."""
    if ranks:
        return checked_ranks(ranks, runtime.info.max_rank), "--ranks"
    rank, why = runtime.default_ceiling()
    return [rank], f"the default: {why}"


# Options nsn-run and nsn-serve share, spelled once.
levels_option = click.option(
    "--levels/--no-levels", default=True,
    help="run a rank on its materialised level (constants; dense products above break-even; int8 kernels for int8 "
         "exports): faster, for one level's memory; --no-levels runs the weight views only")
speculative_option = click.option(
    "--speculative", "draft_rank", default=None, type=click.IntRange(min=1),
    help="self-speculative decoding: this lower rank drafts and the running rank verifies (the same tokens; where "
         "the running rank is not above it, or drafting does not pay, it decodes plainly)")


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
@click.option("--ranks", default=None, help="comma-separated ranks to run at, in turn [default: the highest rank that "
                                           "costs no more than the dense model, as it runs here]")
@click.option("--prompt", default=None, help="text to continue (decoder exports)")
@click.option("--chat", default=None, help="a message to the model, through its chat template (decoder exports)")
@click.option("--text", "texts", multiple=True, help="sentence to embed (encoder exports); repeatable")
@click.option("--max-new-tokens", default=32, type=click.IntRange(1, MAX_NEW_TOKENS),
              help="new tokens at most (with the prompt, within the model's context)")
@click.option("--sample", is_flag=True, help="sample instead of greedy decoding")
@click.option("--temperature", default=1.0, type=FiniteFloat(MIN_TEMPERATURE, MAX_TEMPERATURE),
              help="sampling temperature (with --sample)")
@click.option("--top-k", default=0, type=click.IntRange(0, 1_000_000), help="sample among the k most likely (0: all)")
@click.option("--seed", default=None, type=SEED_RANGE, help="sampling seed (with --sample)")
@click.option("--threads", default=None, type=Threads(), help="ONNX Runtime intra-op threads")
@click.option("--provider", "providers", multiple=True, help="execution provider(s) [default: CUDA if present, else CPU]")
@click.option("--provider-fallback", is_flag=True,
              help="run on what ONNX Runtime has when a --provider is missing (it warns) instead of refusing")
@levels_option
@speculative_option
@click.option("--draft-tokens", default=4, type=click.IntRange(1, MAX_DRAFT_TOKENS),
              help="tokens the draft proposes per round, to start with (adapted to how many are kept)")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def run_command(model_dir, ranks, prompt, chat, texts, max_new_tokens, sample, temperature, top_k, seed, threads,
                providers, provider_fallback, levels, draft_rank, draft_tokens, as_json):
    """Run MODEL_DIR (an nsn-export output) at each of --ranks on --prompt, --chat or --text."""
    from .runtime import NonFiniteOutputWarning
    from .ort.session import NSNSession

    if [prompt is not None, chat is not None, bool(texts)].count(True) != 1:
        raise click.UsageError("give exactly one of --prompt or --chat (decoders) or --text (encoders)")
    if chat is not None:
        require_extra("serve", "nsn-run --chat (chat templates)")
    check_providers(list(providers), provider_fallback)
    rank_list = parse_ranks(ranks)
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", NonFiniteOutputWarning)  # a NaN answer is a failure, not a result
        session = NSNSession(model_dir, providers=list(providers) or None, intra_op_threads=threads,
                             levels=None if levels else False)
        if chat is not None:
            prompt = chat_prompt_ids(session, chat)
        prompt = check_run_inputs(session, prompt, list(texts), max_new_tokens)
        run_ranks, why = ranks_to_run(session, rank_list)
        if draft_rank is not None:
            if prompt is None:
                raise click.UsageError("--speculative drafts tokens: it needs --prompt or --chat (a decoder)")
            if draft_rank >= min(run_ranks):
                raise click.BadParameter(f"{draft_rank} is not below the rank it drafts for ({min(run_ranks)}); "
                                         f"give a lower draft rank or higher --ranks", param_hint="--speculative")
        try:
            for rank in run_ranks:
                session.rank = rank
                session.prepare(rank, wait=True)
                speculation = Speculation(draft_rank, draft_tokens) if draft_rank is not None else None
                report = run_once(session, prompt, list(texts), max_new_tokens, sample, temperature, top_k,
                                  seed, reply=chat is not None, speculative=speculation)
                reports.append({**report, "why": why, "runs_on": session.level_state(rank)["runs_on"]})
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


def chat_prompt_ids(runtime, message: str) -> list[int]:
    """The token ids of ``message`` from the user, rendered by the model's own chat template."""
    from .serve.chat import ChatTemplate, ChatTemplateError

    if not message.strip():
        raise click.UsageError("--chat '' is empty; give a message")
    template = ChatTemplate.from_model_dir(runtime.model_dir)
    if template is None or runtime.tokenizer is None:
        raise click.UsageError(f"--chat: {runtime.model_dir} has no chat template (chat_template.jinja) or no "
                               f"tokenizer.json; use --prompt")
    try:
        text = template.render([{"role": "user", "content": message}])
    except ChatTemplateError as error:
        raise click.UsageError(f"--chat: {error}") from None
    return runtime.tokenizer.encode(text, add_special_tokens=False).ids  # the template writes special tokens


def run_once(session, prompt, texts, max_new_tokens, sample, temperature, top_k, seed, reply: bool = False,
             speculative=None) -> dict:
    """One rank's result: generated text and latencies, or embeddings and their warm latency. With
    ``reply`` the text is the model's turn: without the token that ended it."""
    if prompt is not None:
        result = session.generate(prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                                  temperature=temperature, top_k=top_k, seed=seed, speculative=speculative)
        if reply:
            result.text = session.reply_text(result.token_ids)
        report = {"rank": session.rank, "text": result.text, "token_ids": result.token_ids,
                  "prefill_ms": round(result.prefill_ms, 3),
                  "decode_ms_per_token": round(result.decode_ms_per_token, 3)}
        if speculative is not None:
            report["speculative"] = {"draft_rank": speculative.draft_rank, "drafted": result.drafted,
                                     "accepted": result.accepted}
    else:
        session.embed(texts)  # warm-up: the first call allocates and plans
        start = time.perf_counter()
        embeddings = session.embed(texts)
        report = {"rank": session.rank, "latency_ms": round((time.perf_counter() - start) * 1e3, 3),
                  "embeddings": [[round(float(v), 5) for v in row] for row in embeddings]}
    report["flops_fraction"] = round(session.level_flops(session.rank) / session.info.dense_flops, 4)
    report["providers"] = session.providers
    return report
