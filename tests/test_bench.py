import json
import os

import pytest
from click.testing import CliRunner

from calibration.bench import run_benchmark
from calibration.cli import bench_command
from calibration.compare import compare_exports, compare_markdown, llama_bench


def test_benchmark_smoke_produces_a_complete_report_and_matching_outputs(tmp_path):
    report = run_benchmark("tiny", tmp_path, threads=1, prefill_tokens=16, cache_tokens=16, decode_runs=3,
                           prefill_runs=3, warmup=1)
    assert json.loads(json.dumps(report)) == report
    assert report["schema"] == "nsn-bench/1" and report["max_rank"] == 32
    ranks = [row["rank"] for row in report["rows"]]
    assert ranks == sorted(ranks) and ranks[0] == 4 and ranks[-1] == 32
    for row in report["rows"]:
        assert max(row["max_abs_diff_vs_specialist"].values()) < 1e-4
        for phase in ("prefill", "decode"):
            for variant in ("dynamic", "dynamic_mask", "dynamic_views", "specialist", "dense"):
                timing = row[phase][variant]
                assert timing["runs"] >= 3 and 0 < timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"]
        assert 0 < row["flops_fraction"] < 1
        assert row["decode"]["bytes_read_per_token"] > 0
    assert report["memory"]["factor_bytes"] > 0 and report["memory"]["views_session_rss_delta_bytes"] > 0
    assert report["switch"]["ranks"] == [4, 32]


def test_bench_command_writes_json_and_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_command, ["--shape", "tiny", "--work-dir", str(tmp_path / "work"),
                                                "--decode-runs", "3", "--prefill-runs", "3", "--prefill-tokens", "8",
                                                "--cache-tokens", "8", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["schema"] == "nsn-bench/1"
    assert "ratio to the specialist" in result.stdout and "rank switch" in result.stdout


def test_report_states_every_target_with_its_measured_value(tmp_path):
    report = run_benchmark("tiny", tmp_path, threads=1, prefill_tokens=8, cache_tokens=8, decode_runs=2,
                           prefill_runs=2, warmup=1)
    targets = report["targets"]
    assert {"dynamic_views_vs_specialist_max_ratio", "dynamic_views_speedup_vs_dense_at_half_flops",
            "rank_switch_added_ms", "one_session_memory_over_weight_bytes"} <= set(targets)
    assert all(isinstance(check["met"], bool) and "target" in check for check in targets.values())


@pytest.fixture(scope="module")
def nsn_and_dense(tmp_path_factory):
    """A tiny Llama as Hugging Face saves it, its dense export (nsn-export --dense) and its NSN exports
    at full rank (whose top rank costs more than dense without levels), fp32 and int8."""
    from tiny import dense_and_nsn_exports

    return dense_and_nsn_exports(tmp_path_factory.mktemp("compare"), "llama")


def test_the_comparison_times_dense_views_and_levels_and_says_why_llama_cpp_did_not_run(nsn_and_dense, monkeypatch):
    monkeypatch.setenv("PATH", str(nsn_and_dense))  # no llama-bench here
    report = compare_exports([nsn_and_dense / "fp32", nsn_and_dense / "int8"], nsn_and_dense / "dense", threads=1,
                             prefill_tokens=8, cache_tokens=8, decode_runs=3, prefill_runs=3, warmup=1,
                             gguf=nsn_and_dense / "hf" / "config.json")
    assert json.loads(json.dumps(report)) == report and report["schema"] == "nsn-bench-compare/1"
    assert report["weights"] == ["fp32", "int8"]
    ranks = [row["rank"] for row in report["rows"]]
    assert ranks == sorted(ranks) and ranks[-1] == 32  # levels make the top rank no costlier than dense
    for row in report["rows"]:
        assert row["level_flops_fraction"] <= min(1.0, row["flops_fraction"]) + 1e-9
        assert row["levels"]["fp32"]["max_abs_diff_vs_views"] < 1e-4
        for phase in ("prefill", "decode"):
            for variant in ("dense", "fp32 views", "fp32 level", "int8 views", "int8 level"):
                timing = row[phase][variant]
                assert timing["runs"] >= 3 and 0 < timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"]
    top = report["rows"][-1]["levels"]["int8"]
    assert top["products"] == top["layers"] > 0
    assert report["llama_cpp"] == {"ran": False, "why": "no llama-bench on PATH (build llama.cpp with cmake to "
                                                        "compare with it)"}
    checks = report["targets"]
    assert {"fp32_level_vs_dense_max", "int8_level_speedup_vs_dense_at_half_flops"} == set(checks)
    assert all(isinstance(check["met"], bool) for check in checks.values())
    table = compare_markdown(report)
    assert "dense fp32 (Optimum export)" in table and "NSN fp32, level | 32 | 1.00" in table
    assert "NSN int8, views | 32 |" in table and "llama.cpp: not measured" in table


def test_llama_bench_is_read_from_its_json_output(tmp_path, monkeypatch):
    """The rows a real llama-bench -o json prints (one per test: prompt processing, then generation)."""
    rows = [{"build_commit": "abc123", "model_type": "llama ?B Q4_1", "n_prompt": 32, "n_gen": 0, "avg_ts": 200.0},
            {"build_commit": "abc123", "model_type": "llama ?B Q4_1", "n_prompt": 0, "n_gen": 32, "avg_ts": 125.0}]
    binary = tmp_path / "llama-bench"
    binary.write_text(f"#!/bin/sh\ncat <<'END'\n{json.dumps(rows)}\nEND\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result = llama_bench(tmp_path / "model.gguf", threads=2, prefill_tokens=32, decode_tokens=32)
    assert result["ran"] and result["prefill_ms"] == 160.0 and result["decode_tokens_per_s"] == 125.0
    assert result["decode_ms"] == 8.0 and "-t 2 -p 32 -n 32" in result["command"]
    binary.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    failed = llama_bench(tmp_path / "model.gguf", threads=2, prefill_tokens=32, decode_tokens=32)
    assert not failed["ran"] and "failed to load model" in failed["why"]


def test_bench_command_compares_exports_and_formats_its_report_again(nsn_and_dense, tmp_path):
    out = tmp_path / "compare.json"
    args = ["--model", str(nsn_and_dense / "fp32"), "--dense", str(nsn_and_dense / "dense"), "--ranks", "8,32",
            "--threads", "1", "--decode-runs", "2", "--prefill-runs", "2", "--prefill-tokens", "4",
            "--cache-tokens", "4", "--output", str(out)]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    assert [row["rank"] for row in json.loads(out.read_text())["rows"]] == [8, 32]
    assert "fp32_level_vs_dense_max" in result.stdout
    again = CliRunner().invoke(bench_command, ["--from-json", str(out), "--markdown"])
    assert again.exit_code == 0 and "NSN fp32, views | 8 |" in again.stdout
