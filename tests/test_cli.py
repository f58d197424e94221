import json

import pytest
from click.testing import CliRunner

import nsn_export as nsn
from calibration.cli import eval_command
from nsn_export.cli import adapt_command, train_command
from tiny import tiny_model, tiny_text, tiny_tokenizer


@pytest.fixture
def hf_dir(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(tiny_text(24)) + "\n")
    return path


def invoke(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_adapt_train_eval_round_trip(hf_dir, text_file, tmp_path):
    adapted = invoke(adapt_command, [hf_dir, "--output", tmp_path / "ckpt", "--max-rank", "0.5"])
    assert "model.layers.1.mlp.down_proj" in adapted.output and "[1, 16]" in adapted.output
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    invoke(train_command, ["--model", tmp_path / "ckpt", "--data", text_file, "--output", tmp_path / "trained",
                           "--steps", "3", "--batch-size", "4", "--ranks-per-step", "2", "--distill", "kl"])
    trained = nsn.load_nsn(tmp_path / "trained")
    assert 16 in trained.nsn_config.trained_ranks and trained.nsn_config.log_variances
    result = invoke(eval_command, ["--model", tmp_path / "trained", "--data", text_file, "--ranks", "2,8,16",
                                   "--json"])
    rows = json.loads(result.stdout)
    assert [row["rank"] for row in rows] == [2, 8, 16]
    assert all({"loss", "perplexity", "flops_fraction", "cosine"} <= set(row) for row in rows)
    assert rows[-1]["cosine"] == pytest.approx(1.0)


def test_adapt_refuses_to_overwrite_and_names_bad_max_rank(hf_dir, tmp_path):
    invoke(adapt_command, [hf_dir, "--output", tmp_path / "ckpt", "--targets", "mlp", "--max-rank", "8"])
    again = CliRunner().invoke(adapt_command, [str(hf_dir), "--output", str(tmp_path / "ckpt")])
    assert again.exit_code == 1 and "--overwrite" in again.output
    bad = CliRunner().invoke(adapt_command, [str(hf_dir), "--output", str(tmp_path / "x"), "--max-rank", "1.5"])
    assert bad.exit_code == 2 and "(0, 1]" in bad.output  # a bad option value is a usage error


def test_eval_rejects_ranks_out_of_range(hf_dir, text_file, tmp_path):
    invoke(adapt_command, [hf_dir, "--output", tmp_path / "ckpt", "--max-rank", "8"])
    result = CliRunner().invoke(eval_command, ["--model", str(tmp_path / "ckpt"), "--data", str(text_file),
                                               "--ranks", "0,4"])
    assert result.exit_code == 2 and "--ranks must be in [1, 8], got 0" in result.output  # a bad option value


def test_classifier_trains_on_labelled_jsonl_and_reports_accuracy(tmp_path):
    import transformers

    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": text, "label": i % 2}) for i, text in enumerate(tiny_text(16))))
    invoke(adapt_command, [tmp_path / "hf", "--output", tmp_path / "ckpt", "--max-rank", "16"])
    layers = nsn.load_nsn(tmp_path / "ckpt").nsn_config.layer_ranks
    assert len(layers) == 12 and not any("classifier" in name or "pooler" in name for name in layers)
    invoke(train_command, ["--model", tmp_path / "ckpt", "--data", data, "--output", tmp_path / "trained",
                           "--steps", "2", "--batch-size", "8", "--ranks-per-step", "1", "--schedule", "uniform"])
    rows = json.loads(invoke(eval_command, ["--model", tmp_path / "trained", "--data", data, "--ranks", "4,16",
                                            "--json"]).stdout)
    assert all(0.0 <= row["accuracy"] <= 1.0 and "loss" in row for row in rows)


def test_bad_jsonl_names_the_line(hf_dir, tmp_path):
    invoke(adapt_command, [hf_dir, "--output", tmp_path / "ckpt", "--max-rank", "8"])
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "w1 w2"}\n{"txt": "w3"}\n')
    result = CliRunner().invoke(eval_command, ["--model", str(tmp_path / "ckpt"), "--data", str(data)])
    assert result.exit_code == 1 and "bad.jsonl:2" in result.output and '"text"' in result.output


def test_adapt_with_calibration_data_is_data_aware(hf_dir, text_file, tmp_path):
    result = invoke(adapt_command, [hf_dir, "--output", tmp_path / "ckpt", "--max-rank", "8",
                                    "--calibration-data", text_file, "--calibration-tokens", "200"])
    assert "whitened" in result.output or "fallback" in result.output
    assert nsn.load_nsn(tmp_path / "ckpt").nsn_config.init == "whitened"


def test_adapt_with_fisher_weighs_the_outputs_too(hf_dir, text_file, tmp_path):
    result = invoke(adapt_command, [hf_dir, "--output", tmp_path / "ckpt", "--calibration-data", text_file,
                                    "--calibration-tokens", "200", "--fisher"])
    assert "fisher" in result.output
    assert nsn.load_nsn(tmp_path / "ckpt").nsn_config.init == "fisher"
