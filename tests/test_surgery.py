import copy

import pytest
import torch
import transformers

import nsn_export as nsn
from nsn_export.surgery import find_targets
from tiny import tiny_model

ALL_ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox", "gpt2", "bert")


def first_output(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_full_rank_adapted_model_reproduces_the_original(arch):
    model = tiny_model(arch)
    original = copy.deepcopy(model)
    report = nsn.adapt(model, "all-linear", max_rank=1.0)
    assert report.layers and all(row.max_rank == min(row.in_features, row.out_features) for row in report.layers)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = first_output(original, ids), first_output(model, ids)
    assert ((actual - expected).norm() / expected.norm()) < 1e-4


def test_presets_select_attention_and_mlp_from_the_table():
    model = tiny_model("llama")
    attention = find_targets(model, "attention")
    mlp = find_targets(model, "mlp")
    assert len(attention) == 8 and all("self_attn" in n for n in attention)
    assert len(mlp) == 6 and all(".mlp." in n for n in mlp)
    assert sorted(find_targets(model, "all-linear")) == sorted(attention + mlp)
    assert "lm_head" not in find_targets(model, "all-linear")


def test_explicit_names_and_regexes_select_layers():
    model = tiny_model("gpt_neox")
    assert find_targets(model, ["dense_h_to_4h"]) == ["gpt_neox.layers.0.mlp.dense_h_to_4h",
                                                      "gpt_neox.layers.1.mlp.dense_h_to_4h"]
    assert find_targets(model, [r"layers\.1\.attention\.\w+"]) == [
        "gpt_neox.layers.1.attention.query_key_value", "gpt_neox.layers.1.attention.dense"]


def test_tied_output_head_is_left_untouched():
    model = tiny_model("gpt2")  # lm_head is tied to the token embeddings
    assert find_targets(model, ["lm_head"]) == []
    with pytest.raises(ValueError, match="matched no linear layer"):
        nsn.adapt(model, ["lm_head"])


def test_unknown_architecture_all_linear_takes_every_linear():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    report = nsn.adapt(net, "all-linear", max_rank=4)
    assert [row.name for row in report.layers] == ["0", "2"]
    with pytest.raises(ValueError, match="preset 'mlp' is not defined"):
        nsn.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), "mlp")


def test_fractional_max_rank_gives_each_layer_its_own_rank():
    model = tiny_model("llama")  # hidden 32, intermediate 64, kv projections 32 -> 16
    nsn.adapt(model, "all-linear", max_rank=0.5)
    ranks = model.nsn_config.layer_ranks
    assert ranks["model.layers.0.self_attn.q_proj"] == 16
    assert ranks["model.layers.0.self_attn.k_proj"] == 8
    assert ranks["model.layers.0.mlp.up_proj"] == 16
    assert nsn.max_rank(model) == 16


def test_global_rank_runs_each_layer_at_min_of_rank_and_its_own_max():
    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=0.5)
    nsn.set_rank(model, 12)
    k_proj = model.get_submodule("model.layers.0.self_attn.k_proj")
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert k_proj.effective_rank() == 8 and q_proj.effective_rank() == 12
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        at_12 = model(ids).logits
        with nsn.rank(model, 3):
            assert nsn.get_rank(model) == 3
            at_3 = model(ids).logits
        assert nsn.get_rank(model) == 12
        assert torch.equal(model(ids).logits, at_12)
    assert not torch.allclose(at_3, at_12)


@pytest.mark.parametrize("bad", [0, 17, 1.5, False])
def test_set_rank_out_of_range_names_the_range(bad):
    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=16)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        nsn.set_rank(model, bad)


def test_model_flops_count_nsn_dense_and_attention():
    model = tiny_model("llama")
    dense_flops = nsn.model_flops(model)
    nsn.adapt(model, "mlp", max_rank=8)
    head = 2 * 32 * 96
    attention_linear = 2 * 2 * (2 * 32 * 32 + 2 * 32 * 16)  # q, o: 32x32; k, v: 32->16; 2 layers
    mlp = 2 * 3 * 2 * 4 * (32 + 64)  # rank 4, 3 projections, 2 layers
    assert nsn.model_flops(model, 4) == head + attention_linear + mlp
    assert nsn.model_flops(model, None) == dense_flops
    attention_scores = 4 * 10 * 4 * 8 * 2  # 4 * L * heads * head_dim * layers
    assert nsn.model_flops(model, 4, context_length=10) == head + attention_linear + mlp + attention_scores


def test_rank_for_budget_is_the_inverse_of_flops_fraction():
    model = tiny_model("qwen2")
    nsn.adapt(model, "all-linear", max_rank=1.0)
    for budget in (0.5, 0.8, 1.2):
        r = nsn.rank_for_budget(model, budget)
        assert nsn.flops_fraction(model, r) <= budget
        if r < nsn.max_rank(model):
            assert nsn.flops_fraction(model, r + 1) > budget
    with pytest.raises(ValueError, match="even rank 1"):
        nsn.rank_for_budget(model, 0.01)


def test_adapting_twice_is_refused():
    model = tiny_model("bert")
    nsn.adapt(model)
    with pytest.raises(ValueError, match="already has NSN layers"):
        nsn.adapt(model)


def test_report_lists_parameters_and_flops():
    model = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=32))
    report = nsn.adapt(model, "attention", max_rank=4)
    row = report.layers[0]
    assert (row.params_before, row.params_after) == (16 * 16 + 16, 4 * 32 + 16)
    assert (row.flops_before, row.flops_after) == (2 * 256, 2 * 4 * 32)
    assert "encoder.layer.0.attention.self.query" in report.table()
