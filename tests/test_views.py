import numpy as np
import onnx
import pytest

from deploy import NSNSession
from deploy.ort.views import rank_slices, to_view_graph, views_at
from deploy.ort.session import input_shapes
from deploy.runtime import decoder_feeds


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_weight_views_give_the_same_outputs_as_the_graph_as_exported(exported, arch):
    result, _ = exported(arch)
    plain = NSNSession(result.path.parent, weight_views=False)
    views = NSNSession(result.path.parent, weight_views=True)
    assert views.weight_views and not plain.weight_views
    if arch == "bert":
        ids = np.arange(1, 9, dtype=np.int64)[None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    else:
        feeds = decoder_feeds(input_shapes(plain.session), np.array([[4, 8, 15, 16, 23]]))
    for r in (1, 5, 8, 16):
        plain.rank = views.rank = r
        expected, actual = plain.run_raw(feeds), views.run_raw(feeds)
        for e, a in zip(expected, actual):
            assert np.allclose(e, a, atol=1e-6, rtol=1e-5)


def test_every_rank_is_served_from_one_copy_of_the_factors(exported):
    result, _ = exported("llama")
    graph, views = to_view_graph(onnx.load(str(result.path)))
    assert len(views) == 2 * 14  # A and B^T of 7 projections in 2 layers
    for r in (1, 7, 16):
        for view in views:
            fed = views_at(views, r)[view.name]
            assert fed.base is view.weight or np.shares_memory(fed, view.weight)
            assert fed.flags["C_CONTIGUOUS"] and fed.shape[0] == min(r, view.rows)
    rewritten = onnx.load_from_string(graph)
    assert rank_slices(rewritten) == []
    assert "rank" in [i.name for i in rewritten.graph.input]


def test_the_exported_graph_slices_only_contiguous_prefixes(exported):
    result, _ = exported("qwen2")
    model = onnx.load(str(result.path))
    slices = rank_slices(model)
    assert len(slices) == 28
    initializers = {init.name: init for init in model.graph.initializer}
    for node in slices:
        assert len(initializers[node.input[0]].dims) == 2  # axis 0 of a row-major matrix


def test_mask_mode_runs_without_views_and_refuses_them_explicitly(exported):
    result, _ = exported("bert", "mask")
    assert not NSNSession(result.path.parent).weight_views
    with pytest.raises(ValueError, match="slice-mode export"):
        NSNSession(result.path.parent, weight_views=True)


def test_session_maps_factors_from_the_external_weight_file(exported):
    result, _ = exported("llama")
    assert (result.path.parent / "model.onnx_data").is_file()
    session = NSNSession(result.path.parent)
    assert session.views and all(isinstance(view.weight, np.memmap) for view in session.views)
    assert not any(view.weight.flags.writeable for view in session.views)
