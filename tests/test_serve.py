"""nsn-serve as its users meet it: a subprocess on a free loopback port, driven by the official
``openai`` client and raw HTTP; the same tokens and embeddings as ``NSNSession``; per-request rank
limits; load, disconnects, SIGTERM, a heating device; TensorRT (the double) through the server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from deploy import NSNSession

PROMPT = "w1 w2 w3 w4"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def reply_text(model_dir, prompt=PROMPT, rank=None, **kwargs) -> str:
    """What a client should read for ``NSNSession.generate``: the text of the tokens before a stop
    token (an end-of-sequence token ends the reply; it is not part of it)."""
    session = NSNSession(model_dir, rank=rank)
    ids = session.generate(prompt, **kwargs).token_ids
    if ids and ids[-1] in session.stop_ids:
        ids = ids[:-1]
    return session.tokenizer.decode(ids)


@pytest.fixture(scope="module")
def decoder_dir(exported, tmp_path_factory):
    """The tiny Llama export, with a chat template (carried as nsn-export carries one)."""
    target = tmp_path_factory.mktemp("served") / "llama"
    shutil.copytree(exported("llama")[0].path.parent, target)
    (target / "chat_template.jinja").write_text(TEMPLATE)
    return target


@pytest.fixture(scope="module")
def long_decoder_dir(decoder_dir, tmp_path_factory):
    """The same graph with a 500k-token context (rotary positions have no table to outgrow), so a
    generation can run long enough to be interrupted."""
    target = tmp_path_factory.mktemp("served") / "llama-long"
    shutil.copytree(decoder_dir, target)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        path = target / name
        if path.is_file():
            data = json.loads(path.read_text())
            data[key] = 500_000
            path.write_text(json.dumps(data))
    return target


@pytest.fixture(scope="module")
def decoder(serve, decoder_dir):
    return serve([decoder_dir, "--no-governor", "--model-name", "tiny-llama"])


@pytest.fixture(scope="module")
def encoder(serve, exported):
    return serve([exported("bert")[0].path.parent, "--no-governor", "--model-name", "tiny-bert"])


def test_the_model_list_names_the_model_its_ranks_and_levels(decoder):
    models = decoder.client().models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    nsn = models[0].model_extra["nsn"]
    assert nsn["max_rank"] == 16 and nsn["levels"] == [16] and nsn["task"] == "text-generation"
    assert nsn["runtime"].startswith("ONNX Runtime") and nsn["context_length"] == 128


@pytest.mark.parametrize("rank", [4, 16])
def test_completions_give_the_tokens_nsn_session_gives_at_the_same_rank(decoder, decoder_dir, rank):
    client = decoder.client()
    greedy = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"nsn": {"max_rank": rank}})
    expected = NSNSession(decoder_dir, rank=rank).generate(PROMPT, max_new_tokens=8)
    assert greedy.choices[0].text == reply_text(decoder_dir, rank=rank, max_new_tokens=8)
    assert greedy.model_extra["nsn"]["token_ranks"] == [rank] * len(expected.token_ids)
    assert greedy.usage.completion_tokens == len(expected.token_ids) and greedy.usage.prompt_tokens == 4
    sampled = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9,
                                        seed=7, extra_body={"top_k": 20, "nsn": {"max_rank": rank}})
    assert sampled.choices[0].text == reply_text(decoder_dir, rank=rank, max_new_tokens=8, do_sample=True,
                                                 temperature=0.8, top_k=20, top_p=0.9, seed=7)


def test_streamed_completion_sends_each_token_with_its_rank_then_usage_and_done(decoder, decoder_dir):
    stream = decoder.client().completions.create(model="tiny-llama", prompt=[5, 17, 3], max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"nsn": {"max_rank": 8}})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = NSNSession(decoder_dir, rank=8).generate([5, 17, 3], max_new_tokens=6)
    assert text == reply_text(decoder_dir, [5, 17, 3], rank=8, max_new_tokens=6)
    token_chunks = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert [c.model_extra["nsn"]["rank"] for c in token_chunks] == [8] * len(expected.token_ids)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
    raw = httpx.post(f"{decoder.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True},
                     timeout=30).text
    assert raw.rstrip().endswith("data: [DONE]") and raw.count("data: ") == 4  # 2 tokens, the finish, [DONE]


def test_stop_strings_cut_the_text(decoder, decoder_dir):
    options = dict(model="tiny-llama", prompt=[5, 17, 3], max_tokens=6, temperature=0,
                   extra_body={"nsn": {"max_rank": 8}})
    full = decoder.client().completions.create(**options)
    words = full.choices[0].text.split()
    assert len(words) == 6
    cut = decoder.client().completions.create(**options, stop=[words[2]])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full.choices[0].text.split(words[2])[0]


def test_chat_renders_the_template_and_matches_the_session(decoder, decoder_dir):
    messages = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w1 w2"}]
    reply = decoder.client().chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5,
                                                     temperature=0)
    session = NSNSession(decoder_dir)
    prompt = "system: w3\nuser: w1 w2\nassistant:"
    ids = session.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert reply.choices[0].message.content == reply_text(decoder_dir, ids, max_new_tokens=5)
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens == len(ids)
    stream = decoder.client().chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5,
                                                      temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content


def test_embeddings_match_the_session_as_floats_and_base64(encoder, exported):
    client = encoder.client()
    texts = ["w1 w2 w3", "w4 w5"]
    result = client.embeddings.create(model="tiny-bert", input=texts, encoding_format="float",
                                      extra_body={"nsn": {"max_rank": 6}})
    session = NSNSession(exported("bert")[0].path.parent, rank=6)
    expected = session.embed(texts)
    np.testing.assert_allclose(np.array([d.embedding for d in result.data]), expected, rtol=1e-5, atol=1e-6)
    assert result.model_extra["nsn"]["ranks"]["first"] == 6 and result.usage.prompt_tokens == 5
    as_base64 = client.embeddings.create(model="tiny-bert", input=[[3, 5, 7]])  # the client asks for base64
    np.testing.assert_allclose(as_base64.data[0].embedding, NSNSession(exported("bert")[0].path.parent).embed(
        [[3, 5, 7]])[0], rtol=1e-5, atol=1e-6)


def test_concurrent_embedding_requests_are_batched_and_each_gets_its_own_vectors(encoder, exported):
    texts = {n: [f"w{(n * 7 + j) % 90} w{j}" for j in range(20)] for n in range(8)}
    results = {}

    def one(n):
        response = httpx.post(f"{encoder.url}/v1/embeddings", json={"input": texts[n], "nsn": {"max_rank": 4 + n}},
                              timeout=120)
        results[n] = response.json() if response.status_code == 200 else response.status_code

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for n in range(8):
        expected = NSNSession(exported("bert")[0].path.parent, rank=4 + n).embed(texts[n])
        got = np.array([d["embedding"] for d in results[n]["data"]])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert results[n]["nsn"]["ranks"]["first"] == 4 + n


@pytest.mark.slow
def test_embeddings_on_the_real_minilm_match_the_session(serve, tmp_path_factory):
    import nsn_export as nsn
    from nsn_export.export import export_onnx
    from nsn_export.models import default_model_dir, load_hf_model

    source = default_model_dir()
    model = load_hf_model(source)
    nsn.adapt(model, "all-linear", max_rank=1.0)
    out = export_onnx(model, tmp_path_factory.mktemp("minilm") / "onnx", tokenizer_dir=source, verify=False).path.parent
    server = serve([out, "--no-governor", "--model-name", "minilm"])
    texts = ["Robots adapt their compute to the battery.", "The governor lowers the rank when it is hot."]
    for rank in (96, 384):
        result = server.client().embeddings.create(model="minilm", input=texts, extra_body={"nsn": {"max_rank": rank}})
        expected = NSNSession(out, rank=rank).embed(texts)
        np.testing.assert_allclose(np.array([d.embedding for d in result.data]), expected, rtol=1e-4, atol=1e-5)


def test_min_rank_above_the_ceiling_is_refused_with_retry_after(serve, decoder_dir):
    server = serve([decoder_dir, "--no-governor", "--rank", "6"])
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2,
                                                               "nsn": {"min_rank": 8}}, timeout=30)
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert "ceiling is 6" in response.json()["error"]["message"] and "min_rank 8" in response.json()["error"]["message"]
    ok = server.client().completions.create(model="llama", prompt=PROMPT, max_tokens=3, temperature=0,
                                            extra_body={"nsn": {"min_rank": 4, "max_rank": 16}})
    assert set(ok.model_extra["nsn"]["token_ranks"]) == {6}  # the ceiling wins over max_rank


def test_concurrent_streams_all_get_their_text_while_a_short_queue_overflows_into_503s(serve, long_decoder_dir):
    decoder_dir = long_decoder_dir
    expected = {n: reply_text(decoder_dir, [n + 1, 7], max_new_tokens=150) for n in range(32)}

    def run(server, results):
        def one(n):
            try:
                stream = server.client().completions.create(model="llama", prompt=[n + 1, 7], max_tokens=150,
                                                            temperature=0, stream=True)
                results[n] = "".join(c.choices[0].text for c in stream if c.choices)
            except openai.APIStatusError as error:
                results[n] = error.status_code
            except Exception as error:  # anything else is a failure of the test
                results[n] = repr(error)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    roomy = serve([decoder_dir, "--no-governor", "--model-name", "llama"])
    results: dict = {}
    run(roomy, results)
    assert results == expected
    tight = serve([decoder_dir, "--no-governor", "--max-queue", "8", "--model-name", "llama"])
    results = {}
    run(tight, results)
    assert len(results) == 32 and all(r == expected[n] or r == 503 for n, r in results.items()), results
    assert 503 in results.values()  # 16 decode in turn, 8 wait: the rest are told to come back
    assert httpx.get(f"{tight.url}/health", timeout=10).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_cache(serve, long_decoder_dir):
    server = serve([long_decoder_dir, "--no-governor", "--max-tokens", "100000"])
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 100000 - 10,
                                                                    "stream": True, "ignore_eos": True},
                      timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while server.metric("nsn:request_success_total", finished_reason="abort") != 1.0:
        assert time.monotonic() < deadline, "the generation kept running after its client left"
        time.sleep(0.1)
    assert server.metric("nsn:num_requests_running") == 0 and server.metric("nsn:kv_cache_tokens") == 0


def test_sigterm_finishes_the_requests_in_flight_refuses_new_ones_and_exits_0(serve, decoder_dir):
    server = serve([decoder_dir, "--no-governor", "--max-tokens", "2000"])
    expected = reply_text(decoder_dir, max_new_tokens=100)
    received = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 100,
                                                                    "temperature": 0, "stream": True},
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received.append(json.loads(line[6:]))
                if len(received) == 1:
                    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    assert "".join(c["choices"][0]["text"] for c in received) == expected  # finished whole
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT}, timeout=5)


def heating_tree(root, temp_c: float):
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{int(temp_c * 1000)}\n")
    (zone / "trip_point_0_type").write_text("passive\n")
    (zone / "trip_point_0_temp").write_text("85000\n")
    return zone / "temp"


def test_a_heating_device_lowers_the_rank_in_responses_and_metrics(serve, decoder_dir, tmp_path):
    temp = heating_tree(tmp_path / "sysfs", 50.0)
    policy = tmp_path / "p.toml"
    policy.write_text('[levels]\nranks = [2, 8, 16]\nmin_dwell_s = 0\n[thermal]\nzones = ["cpu-thermal"]\n')
    server = serve([decoder_dir, "--policy", policy, "--sysfs-root", tmp_path / "sysfs", "--period-s", "0.1"])
    cool = server.client().completions.create(model="llama", prompt=PROMPT, max_tokens=3, temperature=0)
    assert set(cool.model_extra["nsn"]["token_ranks"]) == {16}
    scratch = temp.with_name(".temp")  # replaced whole, as the kernel updates it: never read half written
    scratch.write_text("95000\n")
    os.replace(scratch, temp)  # above the trip + 5 degC: the emergency level
    deadline = time.monotonic() + 30
    while server.metric("nsn:rank_ceiling") != 2.0:
        assert time.monotonic() < deadline, "the governor never lowered the rank"
        time.sleep(0.1)
    hot = server.client().completions.create(model="llama", prompt=PROMPT, max_tokens=3, temperature=0)
    assert set(hot.model_extra["nsn"]["token_ranks"]) == {2}
    assert hot.model_extra["nsn"]["governor"] == "thermal: cpu-thermal 95.0 degC >= emergency 90.0 degC"
    assert server.metric("nsn:rank") == 2.0 and server.metric("nsn:temperature_celsius", zone="cpu-thermal") == 95.0
    assert server.metric("nsn:rank_switches_total") >= 1


def test_generation_through_the_server_on_the_tensorrt_double_matches_nsn_engine(exported, tmp_path):
    """In process (the double lives in this process): the real app, scheduler and routes."""
    from fastapi.testclient import TestClient

    import trt_double
    from deploy.serve.app import ServerState, create_app
    from deploy.serve.metrics import Metrics
    from deploy.serve.scheduler import Scheduler
    from deploy.tensorrt.build import build_engine
    from deploy.tensorrt.engine import NSNEngine
    from deploy.tensorrt.plan import ShapeBounds, plan_for_export
    from deploy.text import load_tokenizer

    cudart = trt_double.make_cudart()
    trt = trt_double.make_tensorrt(cudart)
    export = exported("llama")[0].path.parent
    plan = plan_for_export(export, "1-5,6-16", ShapeBounds(max_seq=32, max_context=64, opt_seq=8, opt_context=16))
    engine_dir = build_engine(export, tmp_path / "engine", plan, trt=trt, cudart=cudart)
    reference = NSNEngine(engine_dir, trt=trt, cudart=cudart, rank=4).generate(PROMPT, max_new_tokens=20,
                                                                                 stop_ids=set())
    engine = NSNEngine(engine_dir, trt=trt, cudart=cudart)
    engine.stop_ids = set()
    state = ServerState(model_name="trt", metrics=Metrics("trt"))

    def load():
        state.scheduler = Scheduler(engine, metrics=state.metrics)
        state.tokenizer = load_tokenizer(engine_dir)
        state.prompt_limit, state.context_limit = 32, 64
        state.scheduler.start()
        state.ready = True

    with TestClient(create_app(state, load=load)) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})  # warm up
        before = cudart.malloc_calls
        body = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0,
                                                    "nsn": {"max_rank": 4}}).json()
        allocated = cudart.malloc_calls - before
        state.scheduler.stop()
    assert body["choices"][0]["text"] == reference.text and body["nsn"]["token_ranks"] == [4] * 20
    assert allocated == 2 * 2 * 2  # one generation's cache: 2 buffers x (key, value) x 2 layers, then nothing
    engine.close()
