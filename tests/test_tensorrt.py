"""TensorRT: profile plans, the compatibility check, the builder and NSNEngine — proven against a
double held to the recorded TensorRT API (``trt_double.py``), and, where ``import tensorrt`` and a
GPU work, against the real thing (tests marked ``tensorrt``)."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import inspect
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

import trt_double
from deploy import NSNSession
from deploy.metadata import NSNModelInfo
from deploy.tensorrt.build import BuildError, BuildOptions, build_engine
from deploy.tensorrt.compat import check_graph
from deploy.tensorrt.engine import EngineMismatchError, NSNEngine
from deploy.tensorrt.plan import RankRange, ShapeBounds, make_plan, parse_ranges, plan_for_export

SURFACES = Path(__file__).resolve().parent / "data" / "trt"  # the recorded real API: see its README
BOUNDS = ShapeBounds(max_seq=32, max_context=64, opt_seq=8, opt_context=16)
PROMPT = [5, 17, 3, 60, 22, 9]


def real_tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart
    except ImportError as error:
        pytest.skip(f"needs TensorRT and cuda-python ({error})")
    if cudart.cudaGetDeviceCount()[0] != cudart.cudaError_t.cudaSuccess:
        pytest.skip("needs an NVIDIA GPU")
    return None, None  # build_engine / NSNEngine import the real modules themselves


@pytest.fixture(params=["double", pytest.param("real", marks=pytest.mark.tensorrt)])
def backend(request):
    """``(trt, cudart)`` to pass to the builder and engine: the double, or None for the real ones."""
    if request.param == "real":
        return real_tensorrt_or_skip()
    cudart = trt_double.make_cudart()
    return trt_double.make_tensorrt(cudart), cudart


def info(max_rank=16, flops=None) -> NSNModelInfo:
    flops = flops or [1000 + 100 * r for r in range(1, max_rank + 1)]
    return NSNModelInfo(max_rank, "text-generation", "slice", {}, [], flops, flops[-1], 0, "")


# ---- plan ------------------------------------------------------------------------------------------------
def test_explicit_ranges_must_cover_every_rank_once():
    ranges = parse_ranges("1-4,5-16", info())
    assert [(r.low, r.high) for r in ranges] == [(1, 4), (5, 16)]
    with pytest.raises(FileNotFoundError, match="nsn-calibrate"):
        parse_ranges("frontier.json", info())
    for spec, words in [("1-4,6-16", "a gap at rank 5"), ("1-8,5-16", "an overlap at rank 5"),
                        ("1-8", "must end at 16"), ("2-16", "a gap at rank 1"), ("1-4,x", "is not LOW-HIGH"),
                        ("1-20", "must end at 16")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_ranges(spec, info())


def test_a_count_gives_ranges_of_equal_flops_span_with_the_flops_midpoint_as_opt():
    # FLOPs grow quadratically here: equal FLOPs spans are wide at low ranks, narrow at high ones.
    model = info(100, [r * r for r in range(1, 101)])
    ranges = parse_ranges("4", model)
    assert ranges[0].low == 1 and ranges[-1].high == 100
    assert all(a.high + 1 == b.low for a, b in zip(ranges, ranges[1:]))
    spans = [model.flops(r.high) - model.flops(r.low) for r in ranges]
    assert max(spans) - min(spans) < 0.1 * model.flops(100)
    assert [r.high - r.low for r in ranges] == sorted([r.high - r.low for r in ranges], reverse=True)
    for r in ranges:
        middle = (model.flops(r.low) + model.flops(r.high)) / 2
        assert all(abs(model.flops(r.opt) - middle) <= abs(model.flops(x) - middle) for x in range(r.low, r.high + 1))
    assert len(parse_ranges("16", info())) == 16
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        parse_ranges("17", info())


def test_decoder_plan_has_prefill_and_decode_profiles_per_range_setting_every_dynamic_input(exported):
    result, _ = exported("llama")
    plan = plan_for_export(result.path.parent, "1-5,6-16", BOUNDS)
    assert [(p.phase, str(p.ranks)) for p in plan.profiles] == [
        ("prefill", "1-5"), ("decode", "1-5"), ("prefill", "6-16"), ("decode", "6-16")]
    graph_inputs = {i.name for i in onnx.load(str(result.path), load_external_data=False).graph.input} - {"rank"}
    for profile in plan.profiles:
        assert set(profile.shapes) == graph_inputs
    prefill, decode = plan.profiles[0], plan.profiles[1]
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 8), (1, 32))
    assert prefill.shapes["past_key_values.0.key"] == ((1, 2, 0, 8),) * 3
    assert decode.shapes["input_ids"] == ((1, 1),) * 3
    assert decode.shapes["past_key_values.0.key"] == ((1, 2, 1, 8), (1, 2, 16, 8), (1, 2, 63, 8))
    assert decode.shapes["attention_mask"] == ((1, 2), (1, 17), (1, 64))
    assert plan.profile_for(7, "decode").index == 3
    again = type(plan).from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


def test_encoder_plan_has_one_encode_profile_per_range(exported):
    result, _ = exported("bert")
    plan = plan_for_export(result.path.parent, "2", ShapeBounds(max_batch=4, opt_batch=2, max_seq=64, opt_seq=16))
    assert [p.phase for p in plan.profiles] == ["encode", "encode"]
    assert plan.profiles[0].shapes["input_ids"] == ((1, 1), (2, 16), (4, 64))


def test_bounds_are_checked():
    for bounds, words in [(ShapeBounds(opt_seq=600), "--opt-seq 600"), (ShapeBounds(max_context=100), "--max-context"),
                          (ShapeBounds(max_batch=0), "--max-batch")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            make_plan(info(), {"input_ids": ["batch_size", "sequence_length"]}, [RankRange(1, 16, 8)], bounds)


# ---- compatibility check -----------------------------------------------------------------------------------
def test_slice_exports_pass_the_check_and_mask_exports_are_refused_naming_the_node(exported):
    assert check_graph(exported("llama")[0].path) == []
    assert check_graph(exported("bert")[0].path) == []
    problems = check_graph(exported("llama", "mask")[0].path)
    assert len(problems) == 1 and "flows into data" in str(problems[0]) and "--rank-mode slice" in str(problems[0])
    assert "/model/layers.0/" in problems[0].node


def test_unsupported_operator_opset_and_rank_type_are_reported(exported, tmp_path):
    import shutil

    source = exported("gpt2")[0].path.parent
    shutil.copytree(source, tmp_path / "e")
    model = onnx.load(str(tmp_path / "e" / "model.onnx"), load_external_data=False)
    model.graph.node.append(onnx.helper.make_node("Unique", ["input_ids"], ["unique_out"], name="odd_unique"))
    model.opset_import[0].version = 21
    model.graph.input[[i.name for i in model.graph.input].index("rank")].type.tensor_type.elem_type = \
        onnx.TensorProto.INT32
    onnx.save_model(model, str(tmp_path / "e" / "model.onnx"))
    text = " | ".join(map(str, check_graph(tmp_path / "e")))
    assert "odd_unique" in text and "Unique is not supported" in text
    assert "opset 21" in text and "[9, 20]" in text
    assert "0-d int64" in text
    with pytest.raises(ValueError, match="10.x"):
        check_graph(tmp_path / "e", trt_version="8.6")


# ---- building against the double ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_engine(tmp_path_factory, exported):
    cudart = trt_double.make_cudart()
    trt = trt_double.make_tensorrt(cudart)
    result, _ = exported("llama")
    plan = plan_for_export(result.path.parent, "1-5,6-16", BOUNDS)
    cache = tmp_path_factory.mktemp("cache") / "timing.cache"
    phases = []
    engine_dir = build_engine(result.path.parent, tmp_path_factory.mktemp("engines") / "llama", plan,
                              BuildOptions(fp16=True, timing_cache=str(cache)),
                              progress=lambda *args: phases.append(args), trt=trt, cudart=cudart)
    return engine_dir, result, plan, cache, phases


def test_build_writes_the_plan_manifest_and_timing_cache(llama_engine):
    engine_dir, result, plan, cache, phases = llama_engine
    manifest = json.loads((engine_dir / "engine.json").read_text())
    assert manifest["tensorrt_version"] == "10.3.0" and manifest["gpu"] == "Fake Orin (test double)"
    assert manifest["compute_capability"] == "8.7"
    assert type(plan).from_dict(manifest["plan"]) == plan and manifest["build"]["fp16"] is True
    assert manifest["nsn"]["nsn.max_rank"] == "16"
    assert len(manifest["source"]["model.onnx"]) == 64
    assert {p.name for p in engine_dir.iterdir()} >= {"model.plan", "engine.json", "config.json", "tokenizer.json",
                                                       "nsn_output.json"}
    assert cache.read_bytes() and phases[-1][1] == phases[-1][2] == 4


def test_every_profile_after_the_first_asks_for_no_extra_weight_memory(exported, monkeypatch):
    cudart = trt_double.make_cudart()
    trt = trt_double.make_tensorrt(cudart)
    targets = []
    original = trt.IBuilderConfig.add_optimization_profile
    monkeypatch.setattr(trt.IBuilderConfig, "add_optimization_profile",
                        lambda self, profile: targets.append(profile.extra_memory_target) or original(self, profile))
    result, _ = exported("llama")
    plan = plan_for_export(result.path.parent, "3", BOUNDS)
    from deploy.tensorrt.build import add_profiles

    builder = trt.Builder(trt.Logger())
    add_profiles(trt, builder, builder.create_builder_config(), plan)
    assert targets == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_the_double_refuses_what_tensorrt_refuses(exported, monkeypatch, tmp_path):
    """If the builder forgot the rank shape input, passed it as a shape, or combined REFIT with
    several profiles, the build would fail: the double makes each mistake fatal."""
    result, _ = exported("llama")
    plan = plan_for_export(result.path.parent, "1-5,6-16", BOUNDS)

    def build(**options):
        cudart = trt_double.make_cudart()
        return build_engine(result.path.parent, tmp_path / "e", plan, BuildOptions(**options),
                            trt=trt_double.make_tensorrt(cudart), cudart=cudart)

    with pytest.raises(ValueError, match="one optimization profile"):
        build(refit=True)
    profile_class = trt_double.IOptimizationProfile
    monkeypatch.setattr(profile_class, "set_shape_input", lambda self, input, min, opt, max: None)
    with pytest.raises(BuildError, match="missing values for shape input 'rank'"):
        build()
    monkeypatch.undo()
    monkeypatch.setattr(profile_class, "set_shape_input",
                        lambda self, input, min, opt, max: trt_double.IOptimizationProfile.set_shape(
                            self, input, min, opt, max))
    with pytest.raises(BuildError, match="set_shape on shape input 'rank'"):
        build()
    monkeypatch.undo()
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("version, values, error", [
    ("10.3.0", ([1], [8], [16]), None),
    ("10.3.0", ([1, 1], [8], [16]), "one-element int lists"),
    ("10.3.0", ([1.0], [8], [16]), "one-element int lists"),
    ("10.3.0", ([1], [8], [2**31]), "int32"),
    ("10.16.1.11", ([1], [8], [2**31]), None),  # int64 shape values from 10.11
])
def test_the_double_holds_set_shape_input_to_the_version_rules(version, values, error):
    trt = trt_double.make_tensorrt(trt_double.make_cudart(), version)
    profile = trt.Builder(trt.Logger()).create_optimization_profile()
    profile.set_shape_input("rank", *values)
    assert profile._errors == ([] if error is None else [pytest.approx(profile._errors[0])])
    if error:
        assert error in profile._errors[0]


def plan_info(result):
    return NSNModelInfo.from_props(result.metadata)


def plan_inputs(result):
    from deploy.tensorrt.plan import graph_inputs

    return graph_inputs(onnx.load(str(result.path), load_external_data=False))


def test_a_mask_export_is_refused_before_tensorrt_is_touched(exported, tmp_path):
    result, _ = exported("llama", "mask")
    plan = plan_for_export(result.path.parent, "1", BOUNDS)
    with pytest.raises(BuildError, match="flows into data"):
        build_engine(result.path.parent, tmp_path / "e", plan, trt=object(), cudart=trt_double.make_cudart())


# ---- running: NSNEngine against NSNSession ------------------------------------------------------------------
def torch_free_session(result):
    return NSNSession(result.path.parent, providers=["CPUExecutionProvider"])


@pytest.fixture
def built(exported, tmp_path, backend):
    trt, cudart = backend

    def build(arch, profiles, bounds=BOUNDS):
        result, _ = exported(arch)
        plan = plan_for_export(result.path.parent, profiles, bounds)
        engine_dir = build_engine(result.path.parent, tmp_path / arch, plan, trt=trt, cudart=cudart)
        return NSNEngine(engine_dir, trt=trt, cudart=cudart), torch_free_session(result), cudart

    return build


@pytest.mark.parametrize("rank", [1, 5, 6, 11, 16])
def test_engine_outputs_match_onnx_runtime_at_ranks_in_every_range(built, rank):
    engine, session, _ = built("llama", "1-5,6-16")
    engine.rank = session.rank = rank
    ids = np.array([PROMPT], np.int64)
    logits_e, cache_e = engine.decode_step(ids, None, 0)
    logits_s, cache_s = session.decode_step(ids, None, 0)
    np.testing.assert_allclose(logits_e, logits_s, rtol=1e-5, atol=1e-5)
    step = np.array([[7]], np.int64)
    logits_e, cache_e = engine.decode_step(step, cache_e, len(PROMPT))
    logits_s, _ = session.decode_step(step, cache_s, len(PROMPT))
    np.testing.assert_allclose(logits_e, logits_s, rtol=1e-5, atol=1e-5)
    assert engine.active_profile == engine.plan.profile_for(rank, "decode").index
    engine.release_cache(cache_e)


@pytest.mark.parametrize("schedule", [{0: 3, 10: 5}, {0: 16, 8: 2, 20: 12}, {0: 6, 12: 16}])
def test_greedy_generation_with_rank_switches_inside_and_across_ranges_matches_onnx_runtime(built, schedule):
    engine, session, cudart = built("llama", "1-5,6-16")
    by_engine = engine.generate(PROMPT, max_new_tokens=24, stop_ids=set(), rank_at=schedule.get)
    by_session = session.generate(PROMPT, max_new_tokens=24, stop_ids=set(), rank_at=schedule.get)
    assert by_engine.token_ids == by_session.token_ids and by_engine.ranks == by_session.ranks
    crossings = sum(1 for a, b in zip(by_engine.ranks, by_engine.ranks[1:])
                    if engine.plan.profile_for(a, "decode") != engine.plan.profile_for(b, "decode"))
    assert engine.profile_switches == 2 + crossings  # prefill, first decode, then one per range crossed
    engine.close()
    if cudart is not None:
        assert cudart.allocations == {}, "device memory leaked"


def test_a_steady_state_decode_step_allocates_no_device_memory(built):
    engine, session, cudart = built("llama", "1-5,6-16")
    if cudart is None:
        pytest.skip("counts the double's allocations")
    steps = engine.generate_steps(PROMPT, max_new_tokens=20, stop_ids=set())
    engine.rank = 3
    next(steps)  # prefill: the cache pairs (2 per layer), staging and logits buffers are allocated here
    next(steps)  # the first decode step: the decode profile's first use
    before = cudart.malloc_calls
    tokens = []
    for index, step in enumerate(steps):
        engine.rank = (3, 12)[index % 2]  # switching ranks, and profiles, costs no allocation either
        tokens.append(step.token)
    assert len(tokens) == 18 and cudart.malloc_calls == before, "a steady-state decode step allocated"
    engine.rank = session.rank = 12
    assert engine.generate(PROMPT, max_new_tokens=8, stop_ids=set()).token_ids == session.generate(
        PROMPT, max_new_tokens=8, stop_ids=set()).token_ids
    engine.close()
    assert cudart.allocations == {}, "device memory leaked"


def test_batched_steps_on_the_engine_give_each_sequence_its_solo_tokens_and_steady_steps_allocate_nothing(built):
    """Four generations of mixed lengths through ``deploy.batch`` on an engine whose decode profile
    takes batches up to 4: each gets the tokens ``NSNSession`` gives it alone; once the batch is
    laid out no step allocates device memory, a leave included (the batch's buffers are reused);
    nothing leaks."""
    from deploy.batch import Batcher

    engine, session, cudart = built("llama", "1-5,6-16", dataclasses.replace(BOUNDS, max_batch=4, opt_batch=2))
    prompts = [PROMPT, [5, 9], [11, 4, 2, 8, 1], [6]]
    budgets = [16, 6, 16, 16]
    session.rank = 12
    expected = [session.generate(p, max_new_tokens=n, stop_ids=set()).token_ids for p, n in zip(prompts, budgets)]
    batcher = Batcher(engine)
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        batcher.open(p, n, stop_ids=set(), tag=i)
    got = {i: [] for i in range(4)}
    allocated = []  # device allocations per step
    while batcher.streams:
        before = cudart.malloc_calls if cudart is not None else 0
        for stream, step in batcher.step(lambda stream: 12):
            got[stream.tag].append(step.token)
            if stream.done:
                batcher.close(stream)
        allocated.append(cudart.malloc_calls - before if cudart is not None else 0)
    assert [got[i] for i in range(4)] == expected
    # step 1 reads the four prompts (their caches), step 2 lays out the batch (its device cache);
    # then steady steps, and a leave (the budget-6 one) that reuses the batch's buffers: nothing
    assert len(allocated) > 10 and set(allocated[2:]) == {0}, allocated
    engine.close()
    if cudart is not None:
        assert cudart.allocations == {}, "device memory leaked"


def test_a_sequence_joins_a_free_row_of_the_engines_batch_in_place_with_its_solo_tokens(built, monkeypatch):
    """Rows as slots on the engine: a stream that leaves frees its row; one whose prompt was just
    read takes it by copies on the device, and one that changed rank takes another by uploads of
    its host rows, without the batch being laid out again and without allocating device memory
    (only each new prompt's own cache); one leaving for another rank downloads its own row only;
    every stream gets the tokens it gets through the same steps on ONNX Runtime; nothing leaks."""
    from deploy.batch import Batch, Batcher
    from deploy.tensorrt.engine import DeviceKVCache

    engine, session, cudart = built("llama", "1-5,6-16", dataclasses.replace(BOUNDS, max_batch=4, opt_batch=2))
    session.rank = 12
    layouts, written, downloads = [], [], []
    lay_out, write_row, host_cache = Batch._lay_out, DeviceKVCache.write_row, NSNEngine.host_cache
    monkeypatch.setattr(Batch, "_lay_out", lambda self, joining, *free: (
        layouts.append(type(self.runtime).__name__), lay_out(self, joining, *free))[1])
    monkeypatch.setattr(DeviceKVCache, "write_row", lambda self, index, own, length: (
        written.append("device" if isinstance(own, DeviceKVCache) else "host"), write_row(self, index, own, length))[1])
    monkeypatch.setattr(NSNEngine, "host_cache", lambda self, cache: (downloads.append(
        isinstance(cache, DeviceKVCache) and cache.rows), host_cache(self, cache))[1])  # a whole cache downloaded

    def run(runtime):
        """Three streams at rank 12 (the second stops after 3 tokens, the third goes to rank 8 at step
        16), one at rank 8 until step 14; a fifth arrives at step 6 (4 tokens). The tokens per
        stream, and device allocations per step."""
        batcher = Batcher(runtime)
        budgets = {"a": 20, "b": 3, "c": 20, "d": 20, "e": 4}
        prompts = {"a": PROMPT, "b": [5, 9], "c": [11, 4, 2, 8, 1], "d": [7, 3, 3], "e": [6]}
        got = {tag: [] for tag in budgets}
        for tag in "abcd":
            batcher.open(prompts[tag], budgets[tag], stop_ids=set(), tag=tag)
        allocated, step = [], 0

        def rank_at(stream):
            return 8 if (stream.tag == "d" and step < 14) or (stream.tag == "c" and step >= 16) else 12
        while batcher.streams and step < 40:
            step += 1
            if step == 6:
                batcher.open(prompts["e"], budgets["e"], stop_ids=set(), tag="e")
            before = cudart.malloc_calls if cudart is not None and runtime is engine else 0
            for stream, outcome in batcher.step(rank_at):
                assert not isinstance(outcome, Exception), outcome
                got[stream.tag].append(outcome.token)
                if stream.done:
                    batcher.close(stream)
            allocated.append(cudart.malloc_calls - before if cudart is not None and runtime is engine else 0)
        return got, allocated

    expected, _ = run(session)
    layouts.clear()
    got, allocated = run(engine)
    assert got == expected and all(len(got[tag]) == n for tag, n in {"a": 20, "b": 3, "c": 20, "d": 20, "e": 4}.items())
    # "e" took "b"'s row by copies on the device, "d" (rank 8 until step 14) "e"'s by uploads
    assert written == ["device", "host"], written
    # the only layouts: the rank-12 batch's first (step 2), and "d" and later "c" each starting a
    # rank-8 batch alone (no copy); "c" left a batch of three with only its own row downloaded
    assert layouts == ["NSNEngine"] * 3, layouts
    assert not any(rows and rows > 1 for rows in downloads), downloads
    if cudart is not None:
        # device memory is allocated where prompts are read (each its own cache: steps 1 and 6) and
        # for a batch's buffers (step 2 at rank 12; step 16 at rank 8, where "c" goes on), never at
        # a join or a leave
        assert [step for step, count in enumerate(allocated, start=1) if count] == [1, 2, 6, 16], allocated
    engine.close()
    if cudart is not None:
        assert cudart.allocations == {}, "device memory leaked"


def test_an_engine_built_to_verify_drafts_decodes_speculatively_with_the_plain_tokens_and_no_allocation(built):
    """``--draft-tokens 4``: the decode profiles take 1-5 new tokens, so a round verifies its drafts
    in one call; greedy output equals plain decoding (ONNX Runtime's), for drafts in the target's
    profile range and in another; rounds after the first allocate no device memory (rejected
    drafts are cut off by copies on the device); nothing leaks."""
    from deploy.speculative import Speculation

    engine, session, cudart = built("llama", "1-5,6-16", dataclasses.replace(BOUNDS, draft_tokens=4))
    decode = engine.plan.profile_for(12, "decode")
    assert decode.shapes["input_ids"][0][1] == 1 and decode.shapes["input_ids"][2][1] == 5
    assert engine.supports_speculation and engine.max_draft_tokens == 4
    for target, draft in ((16, 11), (12, 3), (16, 15)):
        engine.rank = session.rank = target
        plain = session.generate(PROMPT, max_new_tokens=30, stop_ids=set()).token_ids
        speculation = Speculation(draft, 4, max_k=8, auto_off=False)
        steps = engine.generate_steps(PROMPT, max_new_tokens=30, stop_ids=set(), speculative=speculation)
        tokens, allocated = [], []  # device allocations made while each token was produced
        while True:
            before = cudart.malloc_calls if cudart is not None else 0
            step = next(steps, None)
            if step is None:
                break
            tokens.append(step.token)
            allocated.append((cudart.malloc_calls - before) if cudart is not None else 0)
        assert tokens == plain, (target, draft)
        assert speculation.drafted > 0 and speculation.max_k == 4  # capped by the engine's profiles
        if cudart is not None:
            assert sum(allocated[4:]) == 0, allocated
    engine.close()
    if cudart is not None:
        assert cudart.allocations == {}, "device memory leaked"


def test_an_engine_without_draft_profiles_refuses_speculation_saying_how_to_build_one(built):
    from deploy.speculative import Speculation

    engine, _, _ = built("llama", "1-5,6-16")
    with pytest.raises(ValueError, match="nsn-trt build --draft-tokens"):
        engine.generate(PROMPT, max_new_tokens=4, speculative=Speculation(3, 4))
    engine.close()


def test_engine_embeddings_match_onnx_runtime(built):
    engine, session, _ = built("bert", "1-8,9-16", ShapeBounds(max_batch=4, max_seq=64, opt_seq=16))
    texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10"]
    for rank in (3, 12):
        engine.rank = session.rank = rank
        np.testing.assert_allclose(engine.embed(texts, batch_size=4), session.embed(texts), rtol=1e-5, atol=1e-5)


def test_inputs_beyond_the_profiles_are_a_clear_error(built):
    engine, _, _ = built("llama", "1-5,6-16")
    with pytest.raises(ValueError, match=r"input 'input_ids' has shape \[1, 40\].*--max-seq"):
        engine.decode_step(np.ones((1, 40), np.int64), None, 0)


def test_an_engine_for_another_gpu_or_tensorrt_is_refused(llama_engine, tmp_path):
    import shutil

    engine_dir = llama_engine[0]
    cudart = trt_double.make_cudart()
    with pytest.raises(EngineMismatchError, match="rebuild the engine on this device"):
        NSNEngine(engine_dir, trt=trt_double.make_tensorrt(cudart, "10.16.1.11"), cudart=cudart)
    shutil.copytree(engine_dir, tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "engine.json").read_text())
    manifest["gpu"] = "Tesla T4"
    (tmp_path / "e" / "engine.json").write_text(json.dumps(manifest))
    cudart = trt_double.make_cudart()
    with pytest.raises(EngineMismatchError, match="Tesla T4"):
        NSNEngine(tmp_path / "e", trt=trt_double.make_tensorrt(cudart), cudart=cudart)


def test_rank_is_read_from_a_host_int64_buffer_that_the_engine_keeps(llama_engine):
    cudart = trt_double.make_cudart()
    engine = NSNEngine(llama_engine[0], trt=trt_double.make_tensorrt(cudart), cudart=cudart, rank=4)
    engine.decode_step(np.array([PROMPT], np.int64), None, 0)
    address = engine.context._addresses["rank"]
    assert address == engine._rank_value.ctypes.data and cudart.find(address, 8) is None
    assert engine._rank_value.dtype == np.int64 and engine._rank_value[0] == 4


# ---- the double and our code use only the real API ------------------------------------------------------------
def load_surface(version: str) -> dict:
    with gzip.open(SURFACES / f"api-surface-{version}.json.gz", "rt") as handle:
        return json.load(handle)


def parameter_names(signature: str) -> list[str]:
    inside = signature[signature.index("(") + 1: signature.rindex(") ->")]
    names, depth, current = [], 0, ""
    for ch in inside + ",":
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            names.append(current.split(":")[0].strip())
            current = ""
        else:
            current += ch
    return [n for n in names if n and n != "self"]


def double_names() -> dict[str, set[str]]:
    """Every public name the double's tensorrt defines: class -> its own members (enums: values)."""
    trt = trt_double.make_tensorrt(trt_double.make_cudart())
    names = {}
    for name in dir(trt):
        value = getattr(trt, name)
        if isinstance(value, type):
            names[name] = {m for m in vars(value) if not m.startswith("_") or m == "__init__"}
            if issubclass(value, enum.Enum):
                names[name] = {m.name for m in value}
    return names


import enum  # noqa: E402  (used by double_names)


@pytest.mark.parametrize("version", ["10.3.0", "10.16.1.11"])
def test_the_double_defines_nothing_the_real_tensorrt_lacks(version):
    surface = load_surface(version)
    trt = trt_double.make_tensorrt(trt_double.make_cudart())
    problems = []
    for class_name, members in double_names().items():
        if class_name in surface["enums"]:
            problems += [f"{class_name}.{m}" for m in members if m not in surface["enums"][class_name]]
            continue
        if class_name not in surface["classes"]:
            problems.append(class_name)
            continue
        real = surface["classes"][class_name]["members"]
        for member in members:
            if member not in real:
                problems.append(f"{class_name}.{member}")
                continue
            attribute = vars(getattr(trt, class_name))[member]
            signatures = real[member].get("signatures") or []
            if inspect.isfunction(attribute) and signatures:
                ours = [p for p in inspect.signature(attribute).parameters if p != "self"]
                theirs = [parameter_names(re.sub(r"^\d+\. ", "", s)) for s in signatures]
                if ours not in theirs:
                    problems.append(f"{class_name}.{member}{tuple(ours)} vs {theirs}")
    problems += [f for f in ("nptype",) if f not in surface["functions"]]
    for class_name, attribute in instance_attributes():  # self.x = ... inside the double's classes
        if class_name in surface["classes"] and attribute not in surface["classes"][class_name]["members"]:
            problems.append(f"{class_name}().{attribute}")
    assert problems == []


def instance_attributes():
    """(class, attribute) for every public ``self.attribute = ...`` in the double's classes."""
    tree = ast.parse(Path(trt_double.__file__).read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if (isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name)
                            and element.value.id == "self" and not element.attr.startswith("_")):
                        yield cls.name, element.attr


def code_trt_names() -> set[str]:
    """``trt.X`` and ``trt.X.Y`` (also via ``self.trt``) used anywhere in deploy/tensorrt/."""
    used = set()
    for path in (Path(__file__).parents[1] / "deploy" / "tensorrt").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in ("trt", "self") and (value.id == "trt" or chain[0] == "trt"):
                chain = chain[1:] if value.id == "self" else chain
                if chain:
                    used.add(".".join(chain[:2]))
    return used


@pytest.mark.parametrize("version", ["10.3.0", "10.16.1.11"])
def test_our_tensorrt_code_uses_only_names_the_real_api_has(version):
    surface = load_surface(version)
    missing = [name for name in sorted(code_trt_names()) if not in_surface(surface, name)]
    assert missing == []


def in_surface(surface: dict, dotted: str) -> bool:
    head, _, member = dotted.partition(".")
    if head in surface["enums"]:
        return not member or member in surface["enums"][head]
    if head in surface["classes"]:
        return not member or member in surface["classes"][head]["members"]
    return head in surface["functions"] or head in surface["constants"]


def test_what_would_break_on_tensorrt_11_is_known_and_guarded():
    """TensorRT 11 drops the FP16 builder flag (strong typing only): --fp16 then says to build an
    fp16 export instead. Nothing else we use is gone (README, Jetson section)."""
    surface = load_surface("11.4.0.106")
    missing = sorted(name for name in code_trt_names() if not in_surface(surface, name))
    assert missing == ["BuilderFlag.FP16"]


def test_the_cudart_double_and_our_code_use_only_real_cuda_python_names():
    try:
        from cuda.bindings import runtime as real
    except ImportError:
        pytest.skip("cuda-python is not installed (pip install -e '.[dev]')")
    double = trt_double.make_cudart()
    ours = {n for n in vars(double) if n.startswith("cuda")}
    source = (Path(__file__).parents[1] / "deploy" / "tensorrt" / "cuda.py").read_text()
    used = set(re.findall(r"\brt\.(cuda\w+)", source))
    assert used <= ours
    assert sorted(n for n in ours | used if not hasattr(real, n)) == []
    for enum_name in ("cudaError_t", "cudaMemcpyKind"):
        assert {m.name for m in getattr(double, enum_name)} <= {m.name for m in getattr(real, enum_name)}


# ---- the nsn-trt command ----------------------------------------------------------------------------------------
def test_nsn_trt_plan_check_build_inspect_run(exported, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import deploy.tensorrt.build as build_module
    import deploy.tensorrt.cuda as cuda_module
    from deploy.tensorrt.cli import trt_command

    cudart = trt_double.make_cudart()
    import deploy.tensorrt.engine as engine_module

    for module in (build_module, engine_module):
        monkeypatch.setattr(module, "import_tensorrt", lambda: trt_double.make_tensorrt(cudart))
    monkeypatch.setattr(cuda_module, "load_cudart", lambda: cudart)
    export_dir = str(exported("llama")[0].path.parent)
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(trt_command, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    assert "4 profiles" in ok("plan", export_dir, "--profiles", "1-5,6-16", "--max-seq", "32", "--max-context", "64",
                              "--opt-seq", "8", "--opt-context", "16")
    assert len(json.loads(ok("plan", export_dir, "--profiles", "3", "--json"))["profiles"]) == 6
    assert "ok: TensorRT 10.3" in ok("check", export_dir)
    engine_dir = tmp_path / "engine"
    assert "wrote" in ok("build", export_dir, "--output", engine_dir, "--profiles", "1-5,6-16", "--max-seq", "32",
                         "--max-context", "64", "--opt-seq", "8", "--opt-context", "16",
                         "--timing-cache", tmp_path / "cache")
    assert "Fake Orin" in ok("inspect", engine_dir) and (tmp_path / "cache").is_file()
    reports = json.loads(ok("run", engine_dir, "--ranks", "3,12", "--prompt", "w1 w2 w3", "--max-new-tokens", "4",
                            "--json"))
    session = NSNSession(export_dir)
    for report in reports:
        session.rank = report["rank"]
        assert report["token_ids"] == session.generate("w1 w2 w3", max_new_tokens=4).token_ids
    assert reports[-1]["profile_switches"] >= 4


def test_the_jetson_selfcheck_runs_every_step_and_writes_a_report(exported, tmp_path, capsys):
    """On the double and a fake Orin sysfs tree; on a real Jetson the same script runs for real."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("selfcheck", Path(__file__).parents[1] / "scripts" /
                                                  "jetson_selfcheck.py")
    selfcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selfcheck)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic\n")
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("gpu-thermal\n")
    (zone / "temp").write_text("48500\n")
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    (hwmon / "in1_label").write_text("VDD_IN\n")
    (hwmon / "curr1_input").write_text("1234\n")
    cudart = trt_double.make_cudart()
    report = tmp_path / "report.json"
    code = selfcheck.main(["--export", str(exported("llama")[0].path.parent), "--work", str(tmp_path / "work"),
                           "--report", str(report)], trt=trt_double.make_tensorrt(cudart), cudart=cudart, root=root)
    steps = {s["step"]: s for s in json.loads(report.read_text())["steps"]}
    assert code == 0, [s for s in steps.values() if s["status"] == "FAIL"]
    assert set(steps) == {"platform", "export", "nsn-trt check", "build two rank ranges",
                          "TensorRT vs ONNX Runtime in each range", "generation switching ranks",
                          "decode latency and switch cost", "governor sensors"}
    assert steps["platform"]["l4t"].startswith("# R36") and steps["platform"]["gpu"] == "Fake Orin (test double)"
    assert steps["governor sensors"]["thermal_zones_millic"] == {"gpu-thermal": "48500"}
    assert steps["governor sensors"]["ina3221_rails_ma"] == {"VDD_IN": "1234"}
    assert set(steps["decode latency and switch cost"]["decode_ms_by_rank"]) == {"1", "8", "9", "16"}
    assert "[PASS] generation switching ranks" in capsys.readouterr().out


def test_the_selfcheck_without_tensorrt_reports_fail_per_step_and_writes_the_report(exported, tmp_path, capsys,
                                                                                  monkeypatch):
    import importlib.util

    from deploy.tensorrt.cuda import TensorRTUnavailable

    spec = importlib.util.spec_from_file_location("selfcheck", Path(__file__).parents[1] / "scripts" /
                                                  "jetson_selfcheck.py")
    selfcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selfcheck)

    def missing():
        raise TensorRTUnavailable("TensorRT is not installed")

    monkeypatch.setattr(selfcheck, "import_tensorrt", missing)
    report = tmp_path / "report.json"
    code = selfcheck.main(["--export", str(exported("llama")[0].path.parent), "--work", str(tmp_path / "work"),
                           "--report", str(report)], root=tmp_path)
    steps = {s["step"]: s["status"] for s in json.loads(report.read_text())["steps"]}
    assert code == 1
    assert steps == {"import tensorrt": "FAIL", "platform": "FAIL", "export": "PASS", "nsn-trt check": "PASS",
                     "build two rank ranges": "FAIL", "governor sensors": "PASS"}
    assert "[FAIL] import tensorrt" in capsys.readouterr().out
