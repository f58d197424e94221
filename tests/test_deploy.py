import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import nsn_export as nsn
from deploy import NSNSession
from deploy.cli import run_command
from nsn_export.outputs import mean_pool

PROMPT = [5, 17, 3, 60, 22, 9]


def torch_greedy(model, prompt, new_tokens, rank_at):
    """Greedy decoding in PyTorch with its own KV cache; the rank may change before any step."""
    cache, past, step_ids, tokens = None, 0, torch.tensor([prompt]), []
    with torch.no_grad():
        for step in range(new_tokens):
            if (r := rank_at(step)) is not None:
                nsn.set_rank(model, r)
            length = step_ids.shape[1]
            out = model(input_ids=step_ids, attention_mask=torch.ones(1, past + length, dtype=torch.long),
                        position_ids=torch.arange(past, past + length)[None], past_key_values=cache, use_cache=True)
            cache, past = out.past_key_values, past + length
            tokens.append(int(out.logits[0, -1].argmax()))
            step_ids = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("schedule", [{0: 6}, {0: 16, 16: 3}, {0: 2, 16: 14}])
def test_ort_greedy_generation_equals_pytorch_also_when_rank_switches_midway(exported, arch, schedule):
    result, model = exported(arch)
    session = NSNSession(result.path.parent, providers=["CPUExecutionProvider"])
    generated = session.generate(PROMPT, max_new_tokens=32, stop_ids=set(), rank_at=schedule.get)
    expected = torch_greedy(model, PROMPT, 32, schedule.get)
    assert generated.token_ids == expected
    assert len(generated.ranks) == 32 and generated.ranks[-1] == schedule[max(schedule)]
    assert len(generated.step_latency_ms) == 32


def test_sampling_is_reproducible_with_a_seed_and_stops_at_stop_tokens(exported):
    result, _ = exported("llama")
    session = NSNSession(result.path.parent, rank=8)
    first = session.generate(PROMPT, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=10, seed=3,
                             stop_ids=set())
    again = session.generate(PROMPT, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=10, seed=3,
                             stop_ids=set())
    assert first.token_ids == again.token_ids and len(first.token_ids) == 12
    stop = first.token_ids[4]
    stopped = session.generate(PROMPT, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=10, seed=3,
                               stop_ids={stop})
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(stop) + 1]


def test_text_prompt_is_tokenised_with_the_exported_tokenizer(exported):
    result, model = exported("qwen2")
    session = NSNSession(result.path.parent, rank=5)
    generated = session.generate("w5 w17 w3", max_new_tokens=4, stop_ids=set())
    assert generated.token_ids == torch_greedy(model, [5, 17, 3], 4, {0: 5}.get)
    assert generated.text.split() == [f"w{t}" if t < 95 else "[PAD]" for t in generated.token_ids]


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, True, "4", None, np.array([1, 2])])
def test_session_rank_is_validated_with_the_allowed_range(exported, bad):
    result, _ = exported("llama")
    session = NSNSession(result.path.parent)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        session.rank = bad
    assert session.rank == 16


def test_embed_equals_pytorch_mean_pooled_embeddings(exported):
    result, model = exported("bert")
    session = NSNSession(result.path.parent, rank=7)
    texts = ["w1 w2 w3 w4", "w5 w6"]
    actual = session.embed(texts, normalize=False)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 95, 95]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad(), nsn.rank(model, 7):
        expected = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert np.allclose(actual, expected.numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(session.embed(texts), axis=-1), 1.0)


def test_wrong_task_and_missing_model_are_clear_errors(exported, tmp_path):
    encoder, _ = exported("bert")
    with pytest.raises(ValueError, match="generate needs a decoder export"):
        NSNSession(encoder.path.parent).generate([1, 2])
    with pytest.raises(FileNotFoundError, match="run nsn-export first"):
        NSNSession(tmp_path)


def test_deploy_imports_without_torch_or_transformers(exported):
    result, _ = exported("llama")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "nsn_export", "optimum"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import deploy
        session = deploy.NSNSession({str(result.path.parent)!r}, rank=3)
        print(session.generate([1, 2, 3], max_new_tokens=3, stop_ids=set()).token_ids)
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[")


def test_optimum_ort_model_generates_the_same_greedy_tokens_as_pytorch(exported):
    from nsn_export.interop import NSNORTModelForCausalLM

    result, model = exported("llama")
    ort_model = NSNORTModelForCausalLM.from_pretrained(result.path.parent, use_io_binding=False)
    ids = torch.tensor([PROMPT])
    for r in (3, 16):
        ort_model.set_rank(r)
        with nsn.rank(model, r):
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                      pad_token_id=0)
        actual = ort_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                    pad_token_id=0)
        assert torch.equal(actual, expected)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        ort_model.set_rank(17)


def test_run_command_generates_and_embeds(exported):
    decoder, _ = exported("llama")
    runner = CliRunner()
    result = runner.invoke(run_command, [str(decoder.path.parent), "--ranks", "4", "--prompt", "w1 w2", "--json",
                                         "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rank"] == 4 and len(report["token_ids"]) <= 5 and report["decode_ms_per_token"] >= 0
    encoder, _ = exported("bert")
    result = runner.invoke(run_command, [str(encoder.path.parent), "--ranks", "3", "--text", "w1 w2", "--text", "w3"])
    assert result.exit_code == 0, result.output
    assert result.output.count("embedding[32]") == 2
    bad = runner.invoke(run_command, [str(encoder.path.parent), "--ranks", "99", "--text", "w1"])
    assert bad.exit_code == 2 and "[1, 16]" in bad.output  # a bad option value


def test_cuda_is_preferred_when_onnxruntime_gpu_offers_it_and_views_stay_off_there(exported, monkeypatch):
    import deploy.ort.session as session_module

    monkeypatch.setattr(session_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session_module.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    result, _ = exported("llama")
    # This machine's onnxruntime has no CUDA: it falls back to the CPU, but host-side weight
    # views are only chosen automatically when the first provider is the CPU.
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        session = NSNSession(result.path.parent, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not session.weight_views
    assert len(session.generate([1, 2], max_new_tokens=2, stop_ids=set()).token_ids) == 2


@pytest.mark.parametrize("damage", ["truncate-graph", "drop-weights"])
def test_damaged_export_is_a_clear_error(exported, tmp_path, damage):
    import shutil

    result, _ = exported("gpt2")
    copy = tmp_path / "copy"
    shutil.copytree(result.path.parent, copy)
    if damage == "truncate-graph":
        data = (copy / "model.onnx").read_bytes()
        (copy / "model.onnx").write_bytes(data[: len(data) // 3])
    else:
        (copy / "model.onnx_data").unlink()
    with pytest.raises(ValueError, match=r"model\.onnx.*(not a readable ONNX graph|model\.onnx_data. is missing).*re-export"):
        NSNSession(copy)
