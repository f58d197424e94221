import json

from click.testing import CliRunner

from calibration.bench import run_benchmark
from calibration.cli import bench_command


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
