"""The quickstart's LLM half (``nsn-quickstart --llm``): the built-in chat model SmolLM2-135M-Instruct
adapted from the two-sided data-aware start (or a trained checkpoint), exported with its KV cache,
verified against PyTorch, and run in ONNX Runtime at several ranks beside the dense model's Optimum
export. Everything measured here runs on the exported graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

CHAT_PROMPT = "What is the capital of France?"
ANSWER_TOKENS = 30
TIMED_TOKENS = 24  # decode timed over this many tokens, end of sequence ignored
CALIBRATION_PACKAGES = ("click", "jinja2", "tqdm", "packaging", "requests", "psutil")


def llm_quickstart(output_path: Path, model_path: Path | None, ranks: list[int], init: str, calibration_tokens: int,
                   progress: Callable[[str], None], eval_sequences: int = 16, choices: int = 100,
                   source: Path | None = None) -> tuple[list[dict], str]:
    """Rows (the dense baseline first, then one per rank) and the notes that explain them."""
    from deploy import NSNSession
    from deploy.cli import checked_ranks, chat_prompt_ids

    from nsn_export.checkpoint import load_nsn, save_nsn
    from nsn_export.data import collate
    from nsn_export.export import export_dense_onnx, export_onnx
    from nsn_export.importing import builtin_llm_dir
    from nsn_export.models import load_hf_model, load_tokenizer
    from nsn_export.surgery import adapt, max_rank

    from .corpus import is_held_out, package_sentences
    from .llm import MC_CHANCE, LLMBenchmarks, PlainDecoder, onnx_scorer, pack_sentences

    source = source or builtin_llm_dir(progress)
    progress(f"loading SmolLM2-135M-Instruct from {source} (fp32, dequantised from its Q4_1 GGUF)")
    tokenizer = load_tokenizer(source)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    model = load_hf_model(source)
    dense_path = export_dense_onnx(model, output_path / "smollm2-dense-onnx")
    progress(f"exported the dense model with Optimum -> {dense_path} (the baseline without NSN)")
    bench = LLMBenchmarks.build(encode, eval_sequences, choices=choices)
    trained = model_path is not None
    if model_path is None:
        calibration = None
        if init == "data-aware":
            sentences = [s for s in package_sentences(CALIBRATION_PACKAGES) if not is_held_out(s)]
            packed = pack_sentences(sentences, encode, 128, max(1, calibration_tokens // 128))
            calibration = [collate(tokenizer)(packed[i:i + 8]) for i in range(0, len(packed), 8)]
            progress(f"collecting input statistics and output gradients over {calibration_tokens} tokens of "
                     f"package docstrings (none of them evaluated below)")
        report = adapt(model, "all-linear", 1.0, calibration=calibration, calibration_tokens=calibration_tokens,
                       fisher=calibration is not None)
        model_path = save_nsn(model, output_path / "smollm2-nsn", tokenizer_dir=source)
        how = "two-sided data-aware (fisher)" if calibration is not None else "plain SVD"
        progress(f"adapted {len(report.layers)} linear layers ({how}; R_l = min(d_in, d_out)) -> {model_path}")
    else:
        model = load_nsn(model_path)
    ranks = checked_ranks(ranks, max_rank(model))
    export_dir = output_path / "smollm2-nsn-onnx"
    result = export_onnx(model, export_dir, opset=17, overwrite=True, tokenizer_dir=model_path, progress=progress)
    worst = max(c.max_rel_error for c in result.checks)
    progress(f"exported and verified {result.path} at ranks {sorted({c.rank for c in result.checks})} "
             f"(worst relative error {worst:.1e})")
    del model

    session = NSNSession(export_dir)
    dense = PlainDecoder(dense_path)
    chat_ids = chat_prompt_ids(session, CHAT_PROMPT)

    def row(rank, flops, scorer, generate, dense_tokens=None):
        generate(chat_ids[:8], 2, set())  # warm-up: the first call at a rank plans and allocates
        tokens = generate(chat_ids, ANSWER_TOKENS, session.stop_ids)[0]
        # timed on a fixed number of tokens: a reply that ends at once would time nothing
        _, prefill_ms, decode_ms = generate(chat_ids, TIMED_TOKENS, set())
        scores, greedy = bench.score(scorer, dense_tokens)
        return {"rank": rank, "flops_fraction": flops, "decode_ms": round(decode_ms, 2),
                "prefill_ms": round(prefill_ms, 1), **scores, "answer": session.reply_text(tokens)}, greedy

    def nsn_generate(ids, count, stop_ids):
        result = session.generate(ids, max_new_tokens=count, stop_ids=stop_ids)
        return result.token_ids, result.prefill_ms, result.decode_ms_per_token

    progress(f"measuring the dense baseline: {len(bench.sequences)} held-out sequences, {len(bench.items)} "
             f"multiple-choice items")
    dense_row, dense_tokens = row("dense", 1.0, onnx_scorer(dense), dense.generate)
    rows = [dense_row]
    for rank_value in ranks:
        session.rank = rank_value
        session.prepare(rank_value, wait=True)  # its level: what nsn-serve runs once the governor holds a rank
        progress(f"measuring rank {rank_value}")
        rows.append(row(rank_value, session.level_fraction(rank_value), onnx_scorer(session), nsn_generate,
                        dense_tokens)[0])
    state = (f"the checkpoint {model_path}" if trained else
             "UNTRAINED (two-sided data-aware start): low ranks need multi-rank distillation (scripts/distill_llm.py)")
    notes = (f"model: {state}.\n"
             f"decode_ms: ONNX Runtime ms per generated token (greedy, KV cache, the mean of {TIMED_TOKENS - 1} steps); "
             f"prefill_ms: the {len(chat_ids)}-token chat prompt.\nperplexity: on {len(bench.sequences)} x 128 tokens of "
             f"held-out package docstrings (never trained or calibrated on); agreement: share of those positions where the greedy next token is the "
             f"dense model's.\nchoice_accuracy: {len(bench.items)} Debian manual pages, NAME description -> which of 4 "
             f"commands (summed log-likelihood, chance {MC_CHANCE}).\nanswer: greedy reply to {CHAT_PROMPT!r} (chat "
             f"template, up to {ANSWER_TOKENS} tokens).\nflops_fraction: FLOPs per token against the dense model, as the "
             f"rank's level runs it (each layer's dense product where its factors would cost more, so never above 1).")
    return rows, notes
