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
    counted = encoder.metric("nsn:prompt_tokens_total") or 0.0
    texts = ["w1 w2 w3", "w4 w5"]
    result = client.embeddings.create(model="tiny-bert", input=texts, encoding_format="float",
                                      extra_body={"nsn": {"max_rank": 6}})
    session = NSNSession(exported("bert")[0].path.parent, rank=6)
    expected = session.embed(texts)
    np.testing.assert_allclose(np.array([d.embedding for d in result.data]), expected, rtol=1e-5, atol=1e-6)
    assert result.model_extra["nsn"]["ranks"]["first"] == 6 and result.usage.prompt_tokens == 5
    assert encoder.metric("nsn:prompt_tokens_total") == counted + 5  # the metric counts what usage reports
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
        ready = threading.Barrier(32)

        def one(n):
            client = server.client()
            ready.wait(timeout=60)  # all 32 arrive together: 16 run at once, the queue takes the next ones
            try:
                stream = client.completions.create(model="llama", prompt=[n + 1, 7], max_tokens=150,
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
    assert 503 in results.values()  # 16 run at once, 8 wait: the rest are told to come back
    assert httpx.get(f"{tight.url}/health", timeout=10).status_code == 200


def test_streams_share_decode_calls_and_one_that_disconnects_mid_batch_leaves_the_rest_whole(serve, long_decoder_dir):
    """Six streams decode together (the batch-size histogram shows calls of several sequences); one
    client leaves after a few tokens: its row leaves the batch, and the other five get exactly the
    text each gets alone."""
    expected = {n: reply_text(long_decoder_dir, [n + 2, 9, n + 3], max_new_tokens=60) for n in range(6)}
    server = serve([long_decoder_dir, "--no-governor", "--model-name", "llama"])
    assert any(note.startswith("continuous batching") for note in
               httpx.get(f"{server.url}/v1/nsn/status", timeout=10).json()["notes"])
    results: dict = {}
    threads = [stream_in_thread(server, [n + 2, 9, n + 3], 60, results, n) for n in range(1, 6)]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"prompt": [2, 9, 3], "max_tokens": 60,
                                                                    "stream": True, "temperature": 0},
                      timeout=30) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(data)
    for thread in threads:
        thread.join(timeout=120)
    assert results == {n: expected[n] for n in range(1, 6)}
    deadline = time.monotonic() + 30
    while server.metric("nsn:request_success_total", finished_reason="abort") != 1.0:
        assert time.monotonic() < deadline, "the stream whose client left kept running"
        time.sleep(0.1)
    calls = server.metric("nsn:decode_batch_size_count")
    assert calls and server.metric("nsn:decode_batch_size_sum") / calls > 1.5  # calls were shared
    assert server.metric("nsn:num_requests_running") == 0 and server.metric("nsn:kv_cache_tokens") == 0


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


# ---- one request never hurts another ---------------------------------------------------------------------------
def run_jobs(scheduler, jobs, timeout_s=60):
    """Submit ``jobs`` and collect each one's events until its last (done or error)."""
    from deploy.serve.scheduler import Job

    events = {n: [] for n in range(len(jobs))}
    finished = threading.Semaphore(0)

    def emitter(n):
        def emit(event, payload):
            events[n].append((event, payload))
            if event != "token":
                finished.release()
        return emit

    for n, (prompt, max_tokens) in enumerate(jobs):
        scheduler.submit(Job("generate", emitter(n), prompt_ids=prompt, max_tokens=max_tokens))
    for _ in jobs:
        assert finished.acquire(timeout=timeout_s), "a job never finished"
    return events


@pytest.mark.parametrize("batching", [True, False])
def test_a_failure_while_running_one_generation_ends_that_one_alone(decoder_dir, batching):
    """A fault injected into one of four concurrent generations (a real ONNX Runtime session that
    raises on the call that feeds that request's fifth token, alone or batched with the others):
    that client gets a 500 error event, the other three get every token they would get alone."""
    from deploy.serve.scheduler import Scheduler

    prompts = [[5, 9], [77, 3], [11, 4, 2], [6]]
    expected = {n: NSNSession(decoder_dir).generate(p, max_new_tokens=12, stop_ids=set()).token_ids
                for n, p in enumerate(prompts)}
    fault = (len(prompts[1]) + 4, expected[1][4])  # (position, token) of the poisoned request's fifth token
    fed = {(len(p) + i, t) for n, p in enumerate(prompts) if n != 1 for i, t in enumerate(expected[n])}
    assert fault not in fed  # no other request feeds that token at that position

    class Faulty(NSNSession):
        def check(self, token_ids, position_ids):
            if any((int(p), int(t)) == fault for t, p in zip(token_ids[:, -1], position_ids[:, -1])):
                raise RuntimeError("injected fault")

        def decode_step(self, token_ids, cache, past_length, **options):
            self.check(token_ids, np.array([[past_length + token_ids.shape[1] - 1]]))
            return super().decode_step(token_ids, cache, past_length, **options)

        def decode_batch(self, token_ids, cache, attention_mask, position_ids):
            self.check(token_ids, position_ids)
            return super().decode_batch(token_ids, cache, attention_mask, position_ids)

    runtime = Faulty(decoder_dir)
    runtime.stop_ids = set()
    scheduler = Scheduler(runtime, batching=batching)
    assert (scheduler.batcher is not None) == batching
    scheduler.start()
    try:
        events = run_jobs(scheduler, [(p, 12) for p in prompts])
        assert events[1][-1][0] == "error" and events[1][-1][1]["status"] == 500
        assert [p["token"] for e, p in events[1] if e == "token"] == expected[1][:5]  # it had streamed, then failed
        for n in (0, 2, 3):
            assert [p["token"] for e, p in events[n] if e == "token"] == expected[n]
            assert events[n][-1][0] == "done" and events[n][-1][1]["finish_reason"] == "length"
        again = run_jobs(scheduler, [([5, 9], 12)])  # and the scheduler still serves
        assert [p["token"] for e, p in again[0] if e == "token"] == expected[0]
    finally:
        scheduler.stop()


def stream_in_thread(server, prompt, max_tokens, results, key, **extra):
    def run():
        try:
            stream = server.client().completions.create(model="llama", prompt=prompt, max_tokens=max_tokens,
                                                        temperature=0, stream=True, **extra)
            results[key] = "".join(c.choices[0].text for c in stream if c.choices)
        except Exception as error:  # recorded: the test compares it with the expected text
            results[key] = repr(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_subnormal_temperature_is_refused_and_three_running_streams_finish_whole(serve, long_decoder_dir):
    server = serve([long_decoder_dir, "--no-governor", "--model-name", "llama", "--max-tokens", "400"])
    prompts = {n: [n + 2, 9] for n in range(3)}
    expected = {n: reply_text(long_decoder_dir, p, max_new_tokens=300, stop_ids=set()) for n, p in prompts.items()}
    results: dict = {}
    threads = [stream_in_thread(server, p, 300, results, n, extra_body={"ignore_eos": True})
               for n, p in prompts.items()]
    deadline = time.monotonic() + 30
    while (server.metric("nsn:num_requests_running") or 0) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for temperature in (b"5e-324", b"1e-310", b"2e-6"):
        bad = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "w1", "max_tokens": 4, "temperature": '
                         + temperature + b"}", headers={"Content-Type": "application/json"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature", bad.text
        assert "give 0 for greedy decoding or a value in [1e-05, 100]" in bad.json()["error"]["message"]
    for thread in threads:
        thread.join(timeout=120)
    assert results == expected


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def send_raw(url: str, head: bytes, body_chunks, read_timeout_s: float = 30) -> bytes:
    """Send a request as raw bytes (``body_chunks`` an iterable); what the server answered (the
    server may close the connection mid-body: that is how it refuses the rest)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout_s) as sock:
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    return answer


def chunked(total_bytes: int, piece: int = 1 << 20):
    sent = 0
    while sent < total_bytes:
        size = min(piece, total_bytes - sent)
        yield b"%x\r\n" % size + b"x" * size + b"\r\n"
        sent += size
    yield b"0\r\n\r\n"


def test_chunked_bodies_are_counted_as_they_stream_and_refused_at_the_limit(decoder, decoder_dir):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    baseline = rss_mib(decoder.process.pid)
    for mib in (5, 50, 300):
        answer = send_raw(decoder.url, head, chunked(mib << 20))
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert rss_mib(decoder.process.pid) < max(300, baseline + 50), f"{mib} MiB grew the server to " \
                                                                        f"{rss_mib(decoder.process.pid):.0f} MiB"
    small = send_raw(decoder.url, head, [b'%x\r\n{"prompt": "w1", "max_tokens": 2}\r\n0\r\n\r\n'
                                         % len(b'{"prompt": "w1", "max_tokens": 2}')])
    assert small.startswith(b"HTTP/1.1 200"), small[:300]  # a chunked body within the limit is served
    smuggled = send_raw(decoder.url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n", chunked(50 << 20))
    assert smuggled.startswith(b"HTTP/1.1 400") and b"both Content-Length and Transfer-Encoding" in smuggled
    assert rss_mib(decoder.process.pid) < max(300, baseline + 50)
    assert httpx.get(f"{decoder.url}/health", timeout=10).status_code == 200


def test_half_sent_requests_are_cut_off_at_the_request_timeout(serve, decoder_dir):
    import socket

    server = serve([decoder_dir, "--no-governor", "--request-timeout-s", "1"])
    host, port = server.url.removeprefix("http://").split(":")
    held = []
    for n in range(20):  # half a request line, half the headers, a body that never comes
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall([b"POST /v1/compl", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
                      b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"][n % 3])
        held.append(sock)
    time.sleep(2.5)
    for n, sock in enumerate(held):
        answer = b""
        with sock:
            while data := sock.recv(65536):
                answer += data
        # closed: silently for unfinished headers, with a 408 for an unfinished body
        assert answer == b"" if n % 3 < 2 else answer.startswith(b"HTTP/1.1 408"), answer
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                      timeout=30).status_code == 200


def test_a_non_streamed_request_whose_client_left_is_cancelled(serve, long_decoder_dir):
    server = serve([long_decoder_dir, "--no-governor", "--max-tokens", "100000"])
    body = json.dumps({"prompt": PROMPT, "max_tokens": 90_000, "ignore_eos": True}).encode()
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while server.metric("nsn:num_requests_running") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while server.metric("nsn:request_success_total", finished_reason="abort") != 1.0:
        assert time.monotonic() < deadline, "the generation kept running after its client left"
        time.sleep(0.1)
    assert server.metric("nsn:num_requests_running") == 0 and server.metric("nsn:kv_cache_tokens") == 0


def sse_events(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_with_streams_running_ends_each_with_an_error_event_and_done(serve, long_decoder_dir, signals):
    """Generations far longer than the shutdown timeout: during the drain new requests get 503 with
    Retry-After; at the timeout (3 s), or at once on a second SIGTERM (with a 600 s timeout), every
    stream gets an error event saying the server is shutting down, then [DONE]; the process exits 0
    with no traceback."""
    shutdown_s = "3" if signals == 1 else "600"
    server = serve([long_decoder_dir, "--no-governor", "--max-tokens", "100000", "--shutdown-timeout", shutdown_s])
    received: dict = {}

    def one(n):
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": [n + 2, 5], "max_tokens": 90_000, "stream": True, "ignore_eos": True}) as r:
            received[n] = sse_events(r)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while (server.metric("nsn:num_requests_running") or 0) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT}, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "shutting_down"
    if signals == 2:
        server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    for thread in threads:
        thread.join(timeout=30)
    for n in range(3):
        events = received[n]
        assert events[-1] == "[DONE]", events[-3:]
        assert "shutting down" in json.loads(events[-2])["error"]["message"], events[-2]
        assert len(events) > 3  # tokens streamed before the drain ended them
    assert "Traceback" not in server.stderr() and "CancelledError" not in server.stderr()


def test_a_host_other_machines_reach_warns_once_when_no_api_key_guards_it(capsys):
    from deploy.serve.cli import check_host

    for host, key, warned in (("0.0.0.0", None, True), ("0.0.0.0", "sesame", False), ("127.0.0.1", None, False),
                              ("localhost", None, False), ("::1", None, False)):
        check_host(host, key)
        err = capsys.readouterr().err
        assert (f"--host {host} is reachable from other machines" in err and "NSN_API_KEY (or --api-key)" in err) \
            == warned, (host, err)
        assert err.count("warning") == int(warned)


def test_an_embedding_request_that_fails_in_a_shared_batch_fails_alone(exported):
    """Embedding requests waiting together run in one call; when that call fails they are retried
    one by one, so only the request at fault gets the error and the others their vectors."""
    from deploy.serve.scheduler import Job, Scheduler

    poison = [77, 77, 77]

    class Faulty(NSNSession):
        def embed(self, texts, **kwargs):
            if poison in list(texts):
                raise RuntimeError("injected fault")
            return super().embed(texts, **kwargs)

    export = exported("bert")[0].path.parent
    inputs = {0: [[3, 5, 7]], 1: [poison], 2: [[9, 2], [4, 4, 4, 4]]}
    events: dict = {}
    finished = threading.Semaphore(0)
    scheduler = Scheduler(Faulty(export))
    jobs = [Job("embed", lambda event, payload, n=n: (events.__setitem__(n, (event, payload)), finished.release()),
                inputs=items) for n, items in inputs.items()]
    with scheduler.condition:  # all three wait together, so the scheduler takes them in one batch
        for job in jobs:
            scheduler.waiting.append(job)
    scheduler.start()
    try:
        for _ in jobs:
            assert finished.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert events[1][0] == "error" and events[1][1]["status"] == 500
    for n in (0, 2):
        assert events[n][0] == "done"
        np.testing.assert_allclose(events[n][1]["embeddings"], NSNSession(export).embed(inputs[n]), rtol=1e-5, atol=1e-6)
