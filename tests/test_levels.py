"""Materialised levels: a rank served by constants, with dense products above each layer's break-even
rank, gives what the weight views give, never costs more than the dense model, and is built beside
serving (one level at a time)."""

import threading

import numpy as np
import pytest

from deploy import NSNSession
from deploy.governor.config import policy_from_dict
from deploy.governor.loop import Governor
from deploy.governor.sensors import Readings
from deploy.ort.levels import Levels
from deploy.ort.session import WeightViewsError
from deploy.runtime import decoder_feeds


class Quiet:
    """Sensors that read nothing: no policy limits the rank."""

    def read(self, now):
        return Readings(now)


@pytest.fixture(scope="module")
def full_rank(tmp_path_factory):
    """A tiny Llama factorised at full rank (32), whose top rank costs more than the dense model."""
    import nsn_export as nsn
    from nsn_export.export import export_onnx
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    nsn.adapt(model, "all-linear", max_rank=32)
    checkpoint = nsn.save_nsn(model, tmp_path_factory.mktemp("ckpt") / "full", tokenizer=tiny_tokenizer())
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "full", tokenizer_dir=checkpoint).path.parent


def feeds_for(session, arch):
    if arch == "bert":
        ids = np.arange(1, 9, dtype=np.int64)[None]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return decoder_feeds(session.input_shapes, np.array([[4, 8, 15, 16, 23]]))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_a_level_gives_the_outputs_of_the_weight_views_at_every_rank(exported, arch):
    result, _ = exported(arch)
    views = NSNSession(result.path.parent, levels=False)
    levels = NSNSession(result.path.parent)
    feeds = feeds_for(views, arch)
    seen_products = set()
    for rank in range(1, levels.info.max_rank + 1):
        views.rank = levels.rank = rank
        expected = views.run_raw(feeds)
        assert levels.prepare(rank, wait=True) is not None
        actual = levels.run_raw(feeds)
        assert levels.last_level is not None and levels.last_level.rank == rank
        for e, a in zip(expected, actual):
            assert e.shape == a.shape
            assert np.allclose(a, e, atol=1e-5, rtol=1e-4), (rank, float(np.abs(a - e).max()))
        seen_products.add(levels.last_level.products)
    assert 0 in seen_products and max(seen_products) > 0  # both kinds of layer were exercised


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_decoder_level_computes_logits_only_for_the_positions_a_call_wants(exported, arch):
    """A prompt's last position (decode_step), every new position (decode_positions, speculative
    verification) or every position (run): each the views' logits, to rounding."""
    from deploy.ort.levels import LOGITS_POSITIONS

    result, _ = exported(arch)
    views = NSNSession(result.path.parent, rank=12, levels=False)
    levels = NSNSession(result.path.parent, rank=12)
    level = levels.prepare(12, wait=True)
    assert level.logits_positions and LOGITS_POSITIONS in {i.name for i in level.session.get_inputs()}
    prompt = np.array([[4, 8, 15, 16, 23, 42]])
    every, _ = views.decode_positions(prompt, None, 0)
    assert every.shape[0] == 6
    last, cache = levels.decode_step(prompt, None, 0)
    assert levels.last_level is level and last.shape == (1, every.shape[1])
    np.testing.assert_allclose(last[0], every[-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(levels.decode_positions(prompt, None, 0)[0], every, rtol=1e-4, atol=1e-5)
    feeds = decoder_feeds(levels.input_shapes, prompt)
    assert levels.run_values(feeds, ["logits"], last_logits=1)[0].shape() == [1, 1, every.shape[1]]  # one row computed
    full = levels.run(feeds)["logits"]
    assert full.shape[1] == 6
    np.testing.assert_allclose(full[0], every, rtol=1e-4, atol=1e-5)
    step, _ = levels.decode_step(np.array([[7]]), cache, 6)
    np.testing.assert_allclose(step, views.decode_step(np.array([[7]]), views.decode_step(prompt, None, 0)[1], 6)[0],
                               rtol=1e-4, atol=1e-5)
    # a prompt chunk before the last: no logits computed, and the rest of the prompt read on its cache
    # gives the same last logits
    assert levels.run_values(feeds, ["logits"], last_logits=0)[0].shape() == [1, 0, every.shape[1]]
    none, head = levels.decode_step(prompt[:, :4], None, 0, logits=False)
    assert none is None
    rest, _ = levels.decode_step(prompt[:, 4:], head, 4)
    np.testing.assert_allclose(rest[0], every[-1], rtol=1e-4, atol=1e-5)


def test_a_layer_runs_its_product_exactly_where_the_factors_cost_at_least_the_dense_weight(exported):
    result, _ = exported("llama")
    session = NSNSession(result.path.parent)
    shapes = {(pair.d_in, pair.d_out) for pair in session.pairs}
    assert shapes == {(32, 32), (32, 16), (32, 64), (64, 32)}  # q/o, k/v, gate/up, down
    for pair in session.pairs:
        for rank in range(1, 17):
            factors = min(rank, pair.a.rows) * (pair.d_in + pair.d_out)
            assert pair.uses_product(rank) == (factors >= pair.d_in * pair.d_out)
    q_proj = next(p for p in session.pairs if (p.d_in, p.d_out) == (32, 32))
    assert not q_proj.uses_product(15) and q_proj.uses_product(16)  # break-even: 32*32/64 = 16


def test_levels_cap_the_cost_of_every_rank_at_the_dense_model(full_rank):
    session = NSNSession(full_rank)
    plain = NSNSession(full_rank, levels=False)
    info = session.info
    assert info.flops(info.max_rank) > info.dense_flops  # the factors alone cost more at the top
    for rank in range(1, info.max_rank + 1):
        assert session.level_flops(rank) <= min(info.flops(rank), info.dense_flops)
        assert plain.level_flops(rank) == info.flops(rank)
    rank, why = session.default_ceiling()
    assert rank == info.max_rank and "maximum rank" in why
    rank, why = plain.default_ceiling()
    assert info.flops(rank) <= info.dense_flops < info.flops(rank + 1)
    assert "no more than the dense model" in why and f"rank {info.max_rank} would cost" in why


def test_a_level_keeps_decoding_from_the_cache_the_views_wrote(exported):
    result, _ = exported("llama")
    session = NSNSession(result.path.parent, rank=16)
    alone = NSNSession(result.path.parent, rank=16, levels=False).generate([3, 1, 4, 1, 5], max_new_tokens=12)
    steps = session.generate_steps([3, 1, 4, 1, 5], max_new_tokens=12)
    tokens = [next(steps).token for _ in range(4)]  # on the views: no level was asked for
    assert session.last_level is None
    session.prepare(16, wait=True)
    tokens += [step.token for step in steps]  # the same cache, now on the level
    assert session.last_level is not None and tokens == alone.token_ids


def test_only_the_latest_rank_asked_for_is_built_and_a_failed_build_leaves_the_views(exported):
    started, release, built = threading.Event(), threading.Event(), []

    def build(rank):
        built.append(rank)
        started.set()
        release.wait(10)
        if rank == 3:
            raise RuntimeError("out of memory")
        return type("Level", (), {"rank": rank})()

    levels = Levels(build)
    levels.prepare(1)
    assert started.wait(10) and levels.state(1) == "building"
    for rank in (2, 3, 4):
        levels.prepare(rank)
    release.set()
    assert levels.prepare(4, wait=True).rank == 4
    assert built == [1, 4] and levels.state(1) == "views" and levels.state(4) == "ready"
    assert levels.prepare(3, wait=True) is None and "out of memory" in levels.error
    assert levels.ready(4) is not None  # the level that was serving still serves


def test_levels_need_weight_views(exported):
    result, _ = exported("llama")
    with pytest.raises(WeightViewsError, match="levels=False"):
        NSNSession(result.path.parent, weight_views=False, levels=True)
    assert NSNSession(result.path.parent, weight_views=False).level_state()["levels"] == "off"


def test_set_rank_builds_the_level_beside_serving_and_reports_what_runs(exported):
    result, _ = exported("llama")
    session = NSNSession(result.path.parent)
    session.set_rank(12)
    session.levels.prepare(12, wait=True)
    state = session.level_state()
    assert state["rank"] == 12 and state["runs_on"] == "level" and state["products"] > 0
    assert NSNSession(result.path.parent).level_state(5)["runs_on"] == "views"


def test_the_governor_leaves_out_levels_costlier_than_dense_unless_the_policy_lists_them(full_rank):
    plain = NSNSession(full_rank, levels=False)
    info = plain.info
    policy = policy_from_dict({"levels": {"min_dwell_s": 0}})
    governor = Governor(Quiet(), policy, plain, info.max_rank, plain.level_flops, dense_flops=info.dense_flops)
    assert governor.levels.ranks[-1] == plain.default_ceiling()[0] < info.max_rank
    assert any("cost more than the dense model" in note for note in governor.notes)
    listed = policy_from_dict({"levels": {"ranks": [4, 32], "min_dwell_s": 0}})
    governor = Governor(Quiet(), listed, plain, info.max_rank, plain.level_flops, dense_flops=info.dense_flops)
    assert governor.levels.ranks == [4, 32]
    session = NSNSession(full_rank)
    governor = Governor(Quiet(), policy, session, info.max_rank, session.level_flops, dense_flops=info.dense_flops)
    assert governor.levels.ranks[-1] == info.max_rank  # with levels, the top costs what dense costs


def test_the_server_runs_the_default_ceiling_on_its_level_and_says_so(serve, full_rank):
    import time

    import httpx

    plain = NSNSession(full_rank, levels=False)
    with_levels = serve([full_rank, "--no-governor", "--model-name", "full"])
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{with_levels.url}/v1/nsn/status", timeout=10).json())["level"]["runs_on"] != "level":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["ceiling"] == 32 and "1.00x the dense model's FLOPs" in status["reason"]
    assert status["level"]["products"] > 0 and status["level"]["level_mib"] > 0
    reply = with_levels.client().completions.create(model="full", prompt="w1 w2 w3", max_tokens=4, temperature=0)
    assert reply.model_extra["nsn"]["token_ranks"][0] == 32
    views_only = serve([full_rank, "--no-governor", "--no-levels", "--model-name", "full"])
    status = httpx.get(f"{views_only.url}/v1/nsn/status", timeout=10).json()
    assert status["ceiling"] == plain.default_ceiling()[0] < 32  # the top rank would cost more than dense
    assert "no more than the dense model" in status["reason"] and status["level"]["levels"] == "off"


def test_a_manual_cap_above_the_governors_top_level_is_the_top_level(full_rank):
    plain = NSNSession(full_rank, levels=False)
    info = plain.info
    governor = Governor(Quiet(), policy_from_dict({"levels": {"min_dwell_s": 0}}), plain, info.max_rank,
                        plain.level_flops, dense_flops=info.dense_flops)
    top = governor.levels.ranks[-1]
    assert top < info.max_rank
    governor.override(info.max_rank)  # allowed: a cap, and the levels stop below it
    assert governor.step(0.0).rank == top
