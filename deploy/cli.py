"""``nsn-run``: generate text or embed sentences with an exported NSN graph at a chosen rank."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(context_settings={"show_default": True})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=None, help="rank to run at [default: the maximum]")
@click.option("--prompt", default=None, help="text to continue (decoder exports)")
@click.option("--text", "texts", multiple=True, help="sentence to embed (encoder exports); repeatable")
@click.option("--max-new-tokens", default=32)
@click.option("--sample", is_flag=True, help="sample instead of greedy decoding")
@click.option("--temperature", default=1.0)
@click.option("--top-k", default=0)
@click.option("--seed", default=None, type=int)
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads")
@click.option("--provider", "providers", multiple=True, help="execution provider(s) [default: CUDA if present, else CPU]")
@click.option("--json", "as_json", is_flag=True)
def run_command(model_dir, rank, prompt, texts, max_new_tokens, sample, temperature, top_k, seed, threads,
                providers, as_json):
    """Run MODEL_DIR (an nsn-export output) at --rank on --prompt or --text."""
    from .session import NSNSession

    if (prompt is None) == (not texts):
        raise click.UsageError("give exactly one of --prompt (decoders) or --text (encoders)")
    try:
        session = NSNSession(model_dir, providers=list(providers) or None, intra_op_threads=threads, rank=rank)
        if prompt is not None:
            result = session.generate(prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                                      temperature=temperature, top_k=top_k, seed=seed)
            report = {"rank": session.rank, "text": result.text, "token_ids": result.token_ids,
                      "prefill_ms": round(result.prefill_ms, 3),
                      "decode_ms_per_token": round(result.decode_ms_per_token, 3)}
        else:
            import time

            session.embed(list(texts))  # warm-up: the first call allocates and plans
            start = time.perf_counter()
            embeddings = session.embed(list(texts))
            report = {"rank": session.rank, "latency_ms": round((time.perf_counter() - start) * 1e3, 3),
                      "embeddings": [[round(float(v), 5) for v in row] for row in embeddings]}
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    report["flops_fraction"] = round(session.info.flops_fraction(session.rank), 4)
    report["providers"] = session.providers
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    for key, value in report.items():
        if key == "embeddings":
            for text, row in zip(texts, value):
                click.echo(f"embedding[{len(row)}] {row[:4]}... for {text!r}")
        else:
            click.echo(f"{key}: {value}")
