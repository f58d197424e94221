"""int8 weight-only exports: a scale per rank component keeps every rank a prefix of the stored
arrays; the graph is exactly the model with those rounded weights; a level runs them as int8
kernels; and the outputs stay close to the fp32 export's at every rank."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deploy import NSNSession
from deploy.int8 import dequantize_rows, quantize_rows
from deploy.ort.levels import level_graph
from deploy.ort.views import views_at
from deploy.runtime import decoder_feeds

# int8 against fp32, as max |int8 - fp32| / max |fp32| of the model's output: measured 0.3-0.8 % on
# the tiny models; the bound leaves room for any CPU's rounding.
INT8_TOLERANCE = 3e-2


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, nsn_checkpoint):
    import nsn_export as nsn
    from nsn_export.export import export_onnx

    def build(arch):
        checkpoint = nsn_checkpoint(arch)
        return export_onnx(nsn.load_nsn(checkpoint), tmp_path_factory.mktemp("int8") / arch, tokenizer_dir=checkpoint,
                           weights="int8")

    return build


def feeds_for(session, arch):
    if arch == "bert":
        ids = np.arange(1, 9, dtype=np.int64)[None]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return decoder_feeds(session.input_shapes, np.array([[4, 8, 15, 16, 23]]))


def test_a_row_is_rounded_to_int8_with_its_own_scale():
    weight = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 2.0, -6.0]], np.float32)
    q, scale = quantize_rows(weight)
    assert q.dtype == np.int8 and scale.tolist() == pytest.approx([1 / 127, 1.0, 6 / 127])
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2, 2] == -127
    assert np.abs(dequantize_rows(q, scale) - weight).max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_an_int8_export_is_verified_against_the_model_with_its_rounded_weights(int8_export, arch):
    result = int8_export(arch)
    assert result.checks and all(check.passed for check in result.checks)  # fp32 tolerance, every checked rank
    assert result.metadata["nsn.weights"] == "int8"
    assert NSNSession(result.path.parent).info.weights == "int8"


def test_every_rank_is_a_prefix_of_the_stored_int8_factors_and_their_scales(int8_export, exported):
    int8 = NSNSession(int8_export("llama").path.parent, levels=False)
    fp32 = NSNSession(exported("llama")[0].path.parent, levels=False)
    stored = {view.name: view.weight for view in int8.views}
    assert {array.dtype for array in stored.values()} == {np.dtype(np.int8), np.dtype(np.float32)}
    int8_bytes = sum(a.nbytes for a in stored.values() if a.dtype == np.int8)
    fp32_bytes = sum(view.weight.nbytes for view in fp32.views)
    scale_bytes = sum(a.nbytes for a in stored.values() if a.dtype == np.float32)
    assert int8_bytes * 4 == fp32_bytes and scale_bytes * 4 <= int8_bytes  # a quarter, plus a scale per row
    for rank in (1, 7, 16):
        for name, array in views_at(int8.views, rank).items():
            assert np.shares_memory(array, stored[name]) and array.shape[0] == min(rank, stored[name].shape[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_int8_outputs_stay_close_to_the_fp32_export_at_every_rank_on_views_and_levels(int8_export, exported, arch):
    fp32 = NSNSession(exported(arch)[0].path.parent, levels=False)
    views = NSNSession(int8_export(arch).path.parent, levels=False)
    plain = NSNSession(int8_export(arch).path.parent, weight_views=False)
    levels = NSNSession(int8_export(arch).path.parent)
    feeds = feeds_for(fp32, arch)
    for rank in range(1, 17):
        fp32.rank = views.rank = plain.rank = levels.rank = rank
        levels.prepare(rank, wait=True)
        reference = fp32.run_raw(feeds)[0]
        floor = np.abs(reference).max() * INT8_TOLERANCE + 1e-6
        on_views = views.run_raw(feeds)[0]
        assert np.array_equal(on_views, plain.run_raw(feeds)[0])  # views change nothing, int8 or not
        assert np.abs(on_views - reference).max() <= floor
        assert np.abs(levels.run_raw(feeds)[0] - reference).max() <= floor
        assert levels.last_level.rank == rank


def test_a_level_of_an_int8_export_runs_int8_kernels(int8_export, tmp_path):
    session = NSNSession(int8_export("llama").path.parent)
    assert all(pair.int8 for pair in session.pairs)
    for rank in (4, 16):  # factors only; q/o/k/v as products
        graph = level_graph(session.view_model, session.views, session.pairs, rank)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"level-{rank}.onnx")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(session.model_dir))
        options.add_external_initializers(list(graph.constants),
                                          [ort.OrtValue.ortvalue_from_numpy(a) for a in graph.constants.values()])
        ort.InferenceSession(graph.graph, options, providers=["CPUExecutionProvider"])
        ops = [node.op_type for node in onnx.load(str(tmp_path / f"level-{rank}.onnx"),
                                                  load_external_data=False).graph.node]
        layer_matmuls = 2 * (len(session.pairs) - graph.products) + graph.products
        assert ops.count("MatMulNBits") == layer_matmuls  # every layer's weights stay int8
        assert "DequantizeLinear" not in ops


def test_an_int8_export_generates(int8_export):
    session = NSNSession(int8_export("llama").path.parent, rank=8)
    session.prepare(8, wait=True)
    result = session.generate([3, 1, 4, 1, 5], max_new_tokens=6)
    assert len(result.token_ids) >= 1 and session.last_level is not None


def test_the_encoder_benchmarks_score_fp32_and_int8_exports_beside_the_dense_export(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    from tiny import dense_and_nsn_exports

    dense_and_nsn_exports(tmp_path, "bert")
    path = Path(__file__).parents[1] / "scripts" / "eval_exports.py"
    spec = importlib.util.spec_from_file_location("eval_exports", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dense", str(tmp_path / "dense"), "--export", str(tmp_path / "fp32"), "--export",
                        str(tmp_path / "int8"), "--ranks", "8,32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["weights"], row["rank"]) for row in rows] == [("fp32", None), ("fp32", 8), ("fp32", 32),
                                                               ("int8", 8), ("int8", 32)]
    assert rows[2]["cosine_to_dense"] > 0.9999  # full rank, fp32: the dense model itself
    assert rows[4]["cosine_to_dense"] > 0.99 and rows[3]["cosine_to_dense"] <= 1.0
    assert all(0 <= row["retrieval_top1"] <= 1 for row in rows)
    assert "| int8 | 32 |" in script.markdown(rows)
