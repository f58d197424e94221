"""nsn-calibrate and frontier.json: the schema, Pareto and level selection, the one reader, and its
consumers (TensorRT profile plans, the governor's levels)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from calibration.cli import calibrate_command
from deploy.frontier import choose_levels, latency_by_batch, mark_pareto, profile_ranges, read_frontier
from deploy.metadata import read_model_info


def row(rank, latency, quality, flops=None):
    return {"rank": rank, "flops_fraction": flops if flops is not None else rank / 100,
            "latency_ms": {"decode": {"median": latency, "p90": latency * 1.1}}, "quality": quality}


def test_pareto_keeps_rows_nothing_beats_and_breaks_ties_by_rank():
    rows = mark_pareto([row(8, 10.0, 0.50), row(16, 12.0, 0.70), row(24, 11.0, 0.65), row(32, 15.0, 0.90),
                        row(40, 16.0, 0.89),  # noise: slower and worse than 32
                        row(48, 15.0, 0.90),  # a tie with 32: the lower rank wins
                        row(64, 20.0, 0.99)])
    assert [r["rank"] for r in rows if r["pareto"]] == [8, 16, 24, 32, 64]


def test_levels_step_down_only_for_a_meaningful_saving():
    rows = mark_pareto([row(8, 10.0, 0.5), row(16, 11.0, 0.6), row(24, 12.0, 0.7), row(32, 18.0, 0.9),
                        row(64, 19.0, 0.95), row(128, 30.0, 1.0)])
    assert choose_levels(rows, min_saving=0.1) == [8, 24, 64, 128]
    assert choose_levels(rows) == [24, 64, 128]  # the default: a step down saves at least 20 %
    assert choose_levels(mark_pareto([row(16, 5.0, 1.0)])) == [16]
    assert profile_ranges([8, 24, 64, 128], 128) == "1-8,9-64,65-128"


@pytest.fixture(scope="module")
def encoder_frontier(exported, tmp_path_factory):
    result, _ = exported("bert")
    out = tmp_path_factory.mktemp("frontier") / "frontier.json"
    run = CliRunner().invoke(calibrate_command, [str(result.path.parent), "--ranks", "2,4,8,16", "--texts", "12",
                                                 "--batch", "4", "--repeats", "3", "--output", str(out),
                                                 "--plot", str(out.with_suffix(".png"))])
    assert run.exit_code == 0, run.output
    return result, out, run.output


def test_calibrating_an_encoder_writes_a_frontier_the_reader_accepts(encoder_frontier):
    result, out, output = encoder_frontier
    frontier = read_frontier(out, result.path.parent)
    assert [r["rank"] for r in frontier["rows"]] == [2, 4, 8, 16]
    top = frontier["rows"][-1]
    assert top["quality"] == pytest.approx(1.0) and top["flops_fraction"] > frontier["rows"][0]["flops_fraction"]
    assert all(r["latency_ms"]["batch"]["p90"] >= r["latency_ms"]["batch"]["median"] > 0 for r in frontier["rows"])
    assert all(r["power_w"] is None and r["energy_mj_per_token"] is None for r in frontier["rows"])  # no sensors here
    assert set(frontier["levels"]) <= {2, 4, 8, 16} and frontier["profiles"].endswith("-16")
    assert frontier["backend"]["runtime"].startswith("onnxruntime") and "| rank |" in output
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_decoder_frontier_has_prefill_decode_batched_decode_and_perplexity(exported, tmp_path):
    result, _ = exported("llama")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(" ".join(f"w{(i * 5 + j) % 90}" for j in range(20)) for i in range(6)))
    run = CliRunner().invoke(calibrate_command, [str(result.path.parent), "--ranks", "auto", "--budget-s", "3",
                                                 "--data", str(data), "--prompt-tokens", "16", "--context-tokens", "16",
                                                 "--repeats", "2", "--output", str(tmp_path / "f.json"), "--json"])
    assert run.exit_code == 0, run.output
    frontier = json.loads(run.stdout)
    rows = frontier["rows"]
    assert {1, 16} <= {r["rank"] for r in rows} and len(rows) >= 5  # the geometric ladder, maybe refined
    phases = {"prefill", "decode", "decode_batch_4", "decode_batch_16"}  # one step of 4, and of 16 (the server's most)
    assert all(set(r["latency_ms"]) == phases and r["perplexity"] > 1 for r in rows)
    assert all(latency_by_batch(r).keys() == {1, 4, 16} for r in rows)
    speculative = frontier["speculative"]  # every rank below the top timed as a draft for it
    assert speculative["target_rank"] == 16 and [c["draft_rank"] for c in speculative["candidates"]] == [
        r["rank"] for r in rows if r["rank"] < 16]
    best = max(speculative["candidates"], key=lambda c: c["speedup"])
    assert (speculative["draft_rank"] == best["draft_rank"]) if best["speedup"] > 1 else (
        speculative["draft_rank"] is None and "no draft rank is faster" in speculative["why"])
    assert read_frontier(tmp_path / "f.json")["speculative"] == speculative
    assert all(r["quality"] == pytest.approx(1 / r["perplexity"], rel=1e-3) for r in rows)
    assert frontier["quality_metric"] == "1 / perplexity"


def test_a_frontier_of_another_model_or_version_is_refused_naming_file_and_field(encoder_frontier, exported, tmp_path):
    _, out, _ = encoder_frontier
    with pytest.raises(ValueError, match=r"frontier.json was made from weights .*model.onnx_data holds weights"):
        read_frontier(out, exported("llama")[0].path)
    del_weights = json.loads(out.read_text())
    del del_weights["model"]["weights_sha256"]  # a frontier from before weights were recorded: the graph hash
    (tmp_path / "old.json").write_text(json.dumps(del_weights))
    with pytest.raises(ValueError, match=r"old.json: field 'model.graph_sha256'.*another model"):
        read_frontier(tmp_path / "old.json", exported("llama")[0].path)
    data = json.loads(out.read_text())
    for change, words in [({"format_version": 9}, "format_version 9"), ({"rows": []}, "rows = [] must be a list"),
                          ({"rows": [{"rank": 1}]}, "rows[0].flops_fraction is missing"),
                          ({"levels": [-5, 0, 16]}, "levels[0] = -5 must be an integer in [1,"),
                          ({"levels": [16, 2]}, "'levels' = [16, 2] must be distinct ranks in ascending order"),
                          ({"levels": [2, 400]}, "within [1, 16]"),
                          ({"profiles": "frontier.json"}, "profiles = 'frontier.json' must be a string like"),
                          ({"rows": [{**data["rows"][0], "latency_ms": {}}]}, "latency_ms = {} must be a table"),
                          ({"rows": [{**data["rows"][0], "lantency": 1}]}, "did you mean 'latency_ms'?"),
                          ({"shapes": "x"}, "shapes = 'x' must be a table")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError, match=re.escape(words)):
            read_frontier(bad)
    missing = {k: v for k, v in data.items() if k != "profiles"}
    (tmp_path / "bad.json").write_text(json.dumps(missing))
    with pytest.raises(ValueError, match="bad.json: profiles is missing"):
        read_frontier(tmp_path / "bad.json")


def test_tensorrt_profiles_and_governor_levels_come_from_the_frontier(encoder_frontier):
    from deploy import NSNSession
    from deploy.governor import Governor, Readings, policy_from_dict
    from deploy.tensorrt.plan import ShapeBounds, plan_for_export

    result, out, _ = encoder_frontier
    frontier = read_frontier(out)
    plan = plan_for_export(result.path.parent, str(out), ShapeBounds(max_seq=32, opt_seq=8))
    assert ",".join(str(r) for r in plan.ranges) == frontier["profiles"]
    session = NSNSession(result.path.parent)

    class Quiet:
        def read(self, now):
            return Readings(now, latency_ms=None)

    policy = policy_from_dict({"levels": {"frontier": str(out)}, "latency": {"target_ms": 1e6}})
    governor = Governor(Quiet(), policy, session, session.info.max_rank, session.info.flops)
    assert governor.levels.ranks == frontier["levels"]
    assert governor.policies[0].model.model(1).samples  # the latency model starts from the calibrated table





@pytest.mark.parametrize("family, metric", [
    ("llama", "next-token agreement with the full rank (random token ids: the export has no tokenizer)"),
    ("bert", "cosine to the full rank's embeddings (random token ids: the export has no tokenizer)"),
])
def test_an_export_without_tokenizer_is_measured_on_token_ids_with_quality_filled_in(exported, tmp_path, family,
                                                                                       metric):
    import shutil

    shutil.copytree(exported(family)[0].path.parent, tmp_path / "e")
    (tmp_path / "e" / "tokenizer.json").unlink()
    run = CliRunner().invoke(calibrate_command, [str(tmp_path / "e"), "--ranks", "1,8,16", "--prompt-tokens", "12",
                                                 "--context-tokens", "8", "--texts", "6", "--batch", "3",
                                                 "--repeats", "2", "--output", str(tmp_path / "f.json"), "--json"])
    assert run.exit_code == 0, run.output
    frontier = json.loads(run.stdout)
    assert frontier["quality_metric"] == metric
    quality = {r["rank"]: r["quality"] for r in frontier["rows"]}
    assert quality[16] == pytest.approx(1.0) and all(0 <= q <= 1 + 1e-6 for q in quality.values())
    assert quality[1] < 1.0  # rank 1 of a random model disagrees with the full rank somewhere
    assert read_frontier(tmp_path / "f.json", tmp_path / "e")["quality_metric"] == metric
    assert frontier["levels"] and frontier["profiles"].endswith("-16")


def test_calibrating_a_tensorrt_engine_goes_through_nsn_engine(exported, tmp_path, monkeypatch):
    """Against the TensorRT double (test_tensorrt.py); on a Jetson the same command runs for real."""
    import deploy.tensorrt.build as build_module
    import deploy.tensorrt.cuda as cuda_module
    import deploy.tensorrt.engine as engine_module
    import trt_double
    from deploy.tensorrt.build import build_engine
    from deploy.tensorrt.plan import ShapeBounds, plan_for_export

    cudart = trt_double.make_cudart()
    for module in (build_module, engine_module):
        monkeypatch.setattr(module, "import_tensorrt", lambda: trt_double.make_tensorrt(cudart))
    monkeypatch.setattr(cuda_module, "load_cudart", lambda: cudart)
    export_dir = exported("bert")[0].path.parent
    plan = plan_for_export(export_dir, "1-8,9-16", ShapeBounds(max_batch=4, max_seq=64, opt_seq=16))
    engine_dir = build_engine(export_dir, tmp_path / "engine", plan)
    run = CliRunner().invoke(calibrate_command, [str(export_dir), "--engine", str(engine_dir), "--ranks", "4,16",
                                                 "--texts", "8", "--batch", "4", "--repeats", "2", "--output",
                                                 str(tmp_path / "f.json"), "--json"])
    assert run.exit_code == 0, run.output
    frontier = json.loads(run.stdout)
    assert frontier["backend"]["runtime"].startswith("TensorRT") and frontier["rows"][-1]["quality"] == pytest.approx(1.0)


def test_the_retrieval_benchmark_is_deterministic_and_scores_top1():
    import numpy as np

    from calibration.retrieval import docstring_pairs, top1_accuracy

    pairs = docstring_pairs()
    assert len(pairs) > 300 and pairs == docstring_pairs() and len({q for q, _ in pairs}) == len(pairs)
    assert any(a == "json.dumps" for _, a in pairs)
    index = {text: i for i, pair in enumerate(pairs) for text in pair}
    perfect = lambda texts: np.eye(len(pairs))[[index[t] for t in texts]]  # noqa: E731
    assert top1_accuracy(perfect, pairs) == 1.0
    shifted = lambda texts: np.eye(len(pairs))[[(index[t] + (t in dict(pairs).values())) % len(pairs)  # noqa: E731
                                                for t in texts]]
    assert top1_accuracy(shifted, pairs) == 0.0


def test_calibration_text_never_holds_an_evaluated_sentence():
    from calibration.retrieval import docstring_pairs, unseen_sentences
    from deploy.text import english_sentences, stdlib_source_sentences

    queries = {query for query, _ in docstring_pairs()}
    held_out = english_sentences(64)
    everything = stdlib_source_sentences()
    assert queries & set(everything) and set(held_out) & set(everything)  # else this test proves nothing
    unseen = unseen_sentences(held_out)
    assert len(unseen) > 5000 and not (queries | set(held_out)) & set(unseen)
    assert unseen == [s for s in everything if s in set(unseen)]  # the order of the source, deterministic
    assert unseen_sentences(held_out, 10) == unseen[:10]


def test_nsn_eval_scores_retrieval_per_rank(nsn_checkpoint):
    from calibration.cli import eval_command

    run = CliRunner().invoke(eval_command, ["--model", str(nsn_checkpoint("bert")), "--retrieval", "--ranks", "4,16",
                                            "--json"])
    assert run.exit_code == 0, run.output
    rows = json.loads(run.stdout)
    assert [r["rank"] for r in rows] == [4, 16] and all(0 <= r["retrieval_top1"] <= 1 for r in rows)


def test_a_frontier_of_a_same_shaped_model_with_other_weights_is_refused(encoder_frontier, tmp_path):
    """Two BERTs of one architecture differ only in model.onnx_data: the weights' hash, which
    nsn-export writes into the graph's metadata, tells them apart."""
    import nsn_export as nsn
    from nsn_export.export import export_onnx
    from tiny import tiny_model

    result, out, _ = encoder_frontier
    other = tiny_model("bert", seed=1)
    nsn.adapt(other, "all-linear", max_rank=16)
    other_export = export_onnx(other, tmp_path / "other", verify=False).path
    assert (other_export.parent / "model.onnx_data").stat().st_size == (result.path.parent / "model.onnx_data").stat().st_size
    with pytest.raises(ValueError, match=r"frontier.json was made from weights [0-9a-f]{12}\.\.\., but .*other/"
                                         r"model.onnx_data holds weights [0-9a-f]{12}"):
        read_frontier(out, other_export.parent)
    assert read_frontier(out, result.path.parent)["model"]["weights_sha256"] == \
        read_model_info(result.path.parent).weights_sha256
