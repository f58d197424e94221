import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from click.testing import CliRunner

import nsn_export as nsn
from deploy import NSNModelInfo
from nsn_export.cli import export_command, verify_command
from nsn_export.export import ExportError, export_onnx
from nsn_export.verify import VerificationError, require_passed, verify_onnx
from tiny import tiny_model

ARCHS = ("llama", "qwen2", "gpt_neox", "gpt2", "bert")


@pytest.mark.parametrize("mode", ["slice", "mask"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_graph_matches_pytorch_at_five_kinds_of_rank(exported, arch, mode):
    result, model = exported(arch, mode)
    kinds = {c.kind for c in result.checks}
    assert {"min", "max", "trained", "untrained", "between"} <= kinds
    assert len({c.rank for c in result.checks}) >= 5
    phases = {c.phase for c in result.checks}
    assert phases == ({"encode"} if arch == "bert" else {"prefill", "decode"})
    assert all(c.passed and c.max_rel_error < 1e-4 for c in result.checks)


@pytest.mark.parametrize("arch", ["mistral", "gemma", "phi3"])
def test_every_architecture_in_the_table_exports_and_verifies(tmp_path, arch):
    model = tiny_model(arch)
    nsn.adapt(model, "all-linear", max_rank=8)
    result = export_onnx(model, tmp_path / arch)
    assert result.checks and all(c.passed for c in result.checks)


def test_one_graph_has_standard_io_plus_a_scalar_int64_rank(exported):
    result, _ = exported("llama")
    graph = onnx.load(str(result.path)).graph
    inputs = {i.name: i for i in graph.input}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in inputs and "present.1.key" in [o.name for o in graph.output]
    rank_input = inputs["rank"].type.tensor_type
    assert rank_input.elem_type == onnx.TensorProto.INT64 and len(rank_input.shape.dim) == 0


def test_metadata_carries_the_nsn_facts(exported):
    result, model = exported("llama")
    props = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    info = NSNModelInfo.from_props(props)
    assert info.max_rank == 16 and info.task == "text-generation" and info.rank_mode == "slice"
    assert info.layer_ranks == model.nsn_config.layer_ranks
    assert info.trained_ranks == [4, 8, 16]
    for r in (1, 5, 16):
        assert info.flops(r, context_length=7) == nsn.model_flops(model, r, context_length=7)
    assert info.flops_fraction(8) == pytest.approx(nsn.flops_fraction(model, 8))


def test_verification_fails_when_the_graph_and_the_model_differ(exported):
    result, model = exported("gpt2")
    other = nsn.load_nsn(nsn.save_nsn(model, result.path.parent.parent / "perturbed"))
    with torch.no_grad():
        other.get_submodule("transformer.h.0.mlp.c_fc").A[3] += torch.randn(32)
    checks = verify_onnx(result.path, other, ranks=[2, 8])
    assert [c.passed for c in checks if c.rank == 2] == [True, True]  # row 3 is unused at rank 2
    with pytest.raises(VerificationError, match="rank 8"):
        require_passed(checks)


def raw_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def encoder_feeds(rank):
    ids = np.arange(1, 9, dtype=np.int64)[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "rank": np.array(rank, np.int64)}


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_raw_graph_clamps_out_of_range_rank_into_the_valid_range(exported, mode):
    result, _ = exported("bert", mode)
    session = raw_session(result.path)
    run = lambda r: session.run(None, encoder_feeds(r))[0]  # noqa: E731
    assert np.array_equal(run(0), run(1)) and np.array_equal(run(-(2**62)), run(1))
    assert np.array_equal(run(17), run(16)) and np.array_equal(run(2**62), run(16))
    assert not np.allclose(run(1), run(16))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    model = transformers.OPTForCausalLM(config)
    nsn.adapt(model, "all-linear", max_rank=4)
    with pytest.raises(ExportError, match="'opt' is not supported.*llama.*qwen2"):
        export_onnx(model, tmp_path / "out")


def test_opset_too_old_is_a_clear_error(tmp_path):
    model = tiny_model("bert")
    nsn.adapt(model, "all-linear", max_rank=4)
    with pytest.raises(ExportError, match=r"opset 11 .*\[14, \d+\].*--opset 17"):
        export_onnx(model, tmp_path / "out", opset=11)
    assert not (tmp_path / "out").exists()


def test_newer_opset_works(tmp_path):
    model = tiny_model("bert")
    nsn.adapt(model, "all-linear", max_rank=4)
    result = export_onnx(model, tmp_path / "out", opset=18)
    assert onnx.load(str(result.path)).opset_import[0].version == 18 and all(c.passed for c in result.checks)


def test_existing_destination_is_refused_without_overwrite(exported):
    result, model = exported("bert")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(model, result.path.parent)


def test_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model("bert")
    nsn.adapt(model, "all-linear", max_rank=4)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nsn_export.export.write_metadata", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_and_verify_commands(nsn_checkpoint, tmp_path):
    checkpoint = nsn_checkpoint("qwen2")
    runner = CliRunner()
    out = tmp_path / "qwen2-onnx"
    result = runner.invoke(export_command, ["--model", str(checkpoint), "--opset", "17", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert "decode" in result.output and "wrote" in result.output
    again = runner.invoke(export_command, ["--model", str(checkpoint), "--output", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    verified = runner.invoke(verify_command, [str(out / "model.onnx"), "--model", str(checkpoint), "--json"])
    assert verified.exit_code == 0, verified.output
    rows = json.loads(verified.stdout)
    assert len({row["rank"] for row in rows}) >= 5


def test_missing_or_corrupt_checkpoint_is_a_one_line_error(nsn_checkpoint, tmp_path):
    runner = CliRunner()
    result = runner.invoke(export_command, ["--model", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such checkpoint directory" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "nsn_config.json"):
        (broken / name).write_text((nsn_checkpoint("bert") / name).read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    result = runner.invoke(export_command, ["--model", str(broken)])
    assert result.exit_code == 1 and "corrupt or truncated" in result.output and "Traceback" not in result.output


def test_external_data_exports_keep_metadata_and_run_with_views(tmp_path, monkeypatch):
    # Optimum moves the weights to one external file for models over 2 GB; force that path here.
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=8)
    result = export_onnx(model, tmp_path / "big")
    assert (tmp_path / "big" / "model.onnx_data").is_file() and all(c.passed for c in result.checks)
    from deploy import NSNSession

    session = NSNSession(tmp_path / "big", rank=3)
    assert session.weight_views and session.info.max_rank == 8
    assert len(session.generate([1, 2, 3], max_new_tokens=4, stop_ids=set()).token_ids) == 4


def test_verify_command_fails_with_the_worst_rank_when_the_checkpoint_differs(exported, tmp_path):
    result, model = exported("llama")
    other = nsn.load_nsn(nsn.save_nsn(model, tmp_path / "other"))
    with torch.no_grad():
        other.get_submodule("model.layers.0.mlp.up_proj").A.add_(0.5)
    nsn.save_nsn(other, tmp_path / "other")
    verified = CliRunner().invoke(verify_command, [str(result.path), "--model", str(tmp_path / "other")])
    assert verified.exit_code == 1 and "exceed the fp32 tolerance" in verified.output and "worst: rank" in verified.output


def test_the_export_carries_the_checkpoints_chat_template(tmp_path):
    """nsn-serve's chat route renders it: it must travel from the checkpoint into the export."""
    import nsn_export as nsn
    from deploy.serve.chat import ChatTemplate
    from nsn_export.export import export_onnx
    from tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=8)
    checkpoint = nsn.save_nsn(model, tmp_path / "ckpt", tokenizer=tokenizer)
    result = export_onnx(nsn.load_nsn(checkpoint), tmp_path / "onnx", tokenizer_dir=checkpoint, verify=False)
    template = ChatTemplate.from_model_dir(result.path.parent)
    assert template is not None and template.render([{"role": "user", "content": "w1"}]) == "<user>w1"
    assert (result.path.parent / "tokenizer_config.json").is_file()


def left_padded_causal_mask(lengths: list[int], queries: int, keys: int) -> torch.Tensor:
    """Eager attention's additive mask for left-padded rows: causal, padding hidden (a padded query
    row sees nothing at all, which a softmax must survive)."""
    minimum = torch.finfo(torch.float32).min
    mask = torch.full((len(lengths), 1, queries, keys), minimum)
    for row, length in enumerate(lengths):
        for query in range(queries):
            key_end = keys - queries + query + 1
            mask[row, 0, query, max(keys - length, 0):key_end] = 0.0
    return mask


@pytest.mark.parametrize("arch,softcap", [("llama", None), ("qwen2", None), ("gemma", None), ("llama", 30.0)])
def test_grouped_attention_equals_eager_attention(arch, softcap):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as eager_with_softcap
    from transformers.models.llama.modeling_llama import eager_attention_forward as eager

    from nsn_export.attention import grouped_attention

    module = tiny_model(arch).model.layers[0].self_attn
    heads, kv_heads, dim = 4, 2, module.head_dim
    generator = torch.Generator().manual_seed(0)
    for queries, keys in ((5, 5), (1, 9), (3, 12)):
        q = torch.randn(3, heads, queries, dim, generator=generator)
        k, v = (torch.randn(3, kv_heads, keys, dim, generator=generator) for _ in range(2))
        mask = left_padded_causal_mask([keys, keys - 2, 1], queries, keys)
        if softcap is None:
            expected, _ = eager(module, q, k, v, mask, scaling=module.scaling)
        else:
            expected, _ = eager_with_softcap(module, q, k, v, mask, scaling=module.scaling, softcap=softcap)
        actual, _ = grouped_attention(module, q, k, v, mask, scaling=module.scaling, softcap=softcap)
        assert actual.shape == expected.shape == (3, queries, heads, dim)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_decoder_graph_reads_the_grouped_cache_without_copying_its_heads(exported):
    """The query heads of a group share one matmul against the stored key/value heads: no Expand of
    the cache in any layer (eager attention's repeat_kv copies every KV head per query head, every
    step), and the model keeps its own attention implementation after the export."""
    result, model = exported("llama")
    graph = onnx.load(str(result.path), load_external_data=False).graph
    attention_ops = [node.op_type for node in graph.node if "self_attn" in node.name]
    assert "MatMul" in attention_ops and "Softmax" in attention_ops
    assert "Expand" not in attention_ops and "IsNaN" not in attention_ops
    assert model.config._attn_implementation == "sdpa"  # as loaded; the checks ran it so
    assert all(check.passed for check in result.checks)
