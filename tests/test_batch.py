"""Continuous batching (``deploy.batch``): every generation that runs at one rank decodes in one
call, and each one gets the tokens it gets alone — through mixed lengths, chunked prompts, joins
and leaves between steps, different ranks and rank changes, sampling with a seed, and a failure."""

import numpy as np
import pytest

from deploy import NSNSession
from deploy.batch import Batch, Batcher, Stream


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    random = np.random.default_rng(seed)
    return [random.integers(3, 90, size=int(random.integers(1, 41))).tolist() for _ in range(count)]


def run(batcher: Batcher, requests: list[dict], rank_of=None, arrive_every: int = 2, on_step=None) -> list[list[int]]:
    """Open ``requests`` (``Batcher.open`` keyword arguments) one every ``arrive_every`` steps; step
    until every stream ended; each request's tokens, in order."""
    session = batcher.runtime
    rank_of = rank_of or (lambda stream: session.info.max_rank)
    streams, tokens, step = [], {}, 0
    while len(streams) < len(requests) or batcher.streams:
        assert step < 2000, "the batcher never finished"
        if len(streams) < len(requests) and step % arrive_every == 0:
            streams.append(batcher.open(**requests[len(streams)], stop_ids=set(), tag=len(streams)))
            tokens[streams[-1].tag] = []
        if on_step is not None:
            on_step(step, streams)
        for stream, outcome in batcher.step(rank_of):
            assert not isinstance(outcome, Exception), outcome
            tokens[stream.tag].append(outcome.token)
            assert outcome.rank == rank_of(stream)
            if stream.done:
                batcher.close(stream)
        step += 1
    return [tokens[n] for n in range(len(requests))]


@pytest.mark.parametrize("arch, level", [("llama", False), ("gpt2", False), ("llama", True)])
def test_each_request_gets_its_solo_tokens_through_mixed_lengths_chunks_joins_and_leaves(exported, arch, level):
    session = NSNSession(exported(arch)[0].path.parent)
    if level:  # on the rank's level, as a server runs: a prompt chunk before the last computes no logits
        session.prepare(session.info.max_rank, wait=True)
    budgets = [40, 3, 25, 1, 60, 12, 30, 7, 45]
    requests = [{"prompt_ids": p, "max_new_tokens": n} for p, n in zip(prompts(9), budgets)]
    requests[4].update(do_sample=True, temperature=0.8, top_k=20, seed=7)  # a sampled one, reproducible by its seed
    requests[6].update(do_sample=True, top_p=0.9, seed=11)
    expected = [session.generate(r["prompt_ids"], stop_ids=set(), **{k: v for k, v in r.items() if k != "prompt_ids"})
                .token_ids for r in requests]
    sizes = []
    batcher = Batcher(session, prefill_chunk=8)  # prompts up to 40 tokens: read over several steps
    assert run(batcher, requests, on_step=lambda step, streams: sizes.append(batcher.last_sizes)) == expected
    assert max(max(s, default=0) for s in sizes) >= 4  # they did share calls
    assert (session.last_level is not None) == level


def test_a_stop_token_ends_a_request_and_the_rest_run_on(exported):
    session = NSNSession(exported("llama")[0].path.parent)
    requests = [{"prompt_ids": p, "max_new_tokens": 30} for p in prompts(4, seed=1)]
    plain = [session.generate(r["prompt_ids"], 30, stop_ids=set()).token_ids for r in requests]
    stop = plain[0][10]
    expected = [tokens[:tokens.index(stop) + 1] if stop in tokens else tokens for tokens in plain]
    batcher = Batcher(session)
    streams = [batcher.open(**r, stop_ids={stop}, tag=n) for n, r in enumerate(requests)]
    got = {n: [] for n in range(4)}
    while batcher.streams:
        for stream, step in batcher.step(lambda stream: 16):
            got[stream.tag].append(step.token)
            assert step.stop == (step.token == stop)
            if stream.done:
                batcher.close(stream)
    assert [got[n] for n in range(4)] == expected and all(s.done for s in streams)


def test_requests_at_different_ranks_decode_in_one_call_per_rank_and_follow_a_moving_ceiling(exported):
    """Each request's ``max_rank`` groups it; the ceiling falls to 6 at step 12 and rises at 30:
    rows move between batches, and every request gets what ``generate`` gives alone with the same
    rank at each step."""
    session = NSNSession(exported("llama")[0].path.parent)
    caps = [16, 4, 11, 16, 4, 9]
    requests = prompts(6, seed=2)

    def ceiling(step):
        return 6 if 12 <= step < 30 else 16

    expected = [session.generate(p, 40, stop_ids=set(), rank_at=lambda i, cap=cap: min(ceiling(i), cap)).token_ids
                for p, cap in zip(requests, caps)]
    batcher = Batcher(session, prefill_chunk=8192)  # every prompt read at step 0, so token i comes at step i
    calls = []
    original = batcher._decode
    batcher._decode = lambda batch: (calls.append((batch.rank, len(batch.streams))), original(batch))[1]
    streams = [batcher.open(p, 40, stop_ids=set(), tag=n) for n, p in enumerate(requests)]
    got = {n: [] for n in range(6)}
    for step in range(40):
        for stream, outcome in batcher.step(lambda stream: min(ceiling(step), caps[stream.tag])):
            got[stream.tag].append(outcome.token)
            assert outcome.rank == min(ceiling(step), caps[stream.tag])
    assert [got[n] for n in range(6)] == expected and all(stream.done for stream in streams)
    assert {rank for rank, _ in calls} == {4, 6, 9, 11, 16}  # one call per rank at each step...
    assert all(rows == 2 for rank, rows in calls if rank == 16) and len(calls) < 6 * 39  # ...that rows share


def test_a_batched_row_computes_its_solo_logits(exported):
    """Rows of 3, 17 and 30 cached tokens, left-padded into one cache: each row's logits are the
    ones ``decode_step`` gives that sequence alone (to rounding, with an absolute floor)."""
    session = NSNSession(exported("llama")[0].path.parent)
    batch = Batch(session, 16)
    streams, solo = [], []
    for length in (3, 17, 30):
        ids = np.random.default_rng(length).integers(3, 90, size=length + 1)
        stream = Stream(ids[:length].tolist(), 4, None, np.random.default_rng(0), set(), read=length)
        _, stream.cache = session.decode_step(ids[None, :length], None, 0)
        stream.tokens = [int(ids[length])]
        solo.append(session.decode_step(ids[None, length:], stream.cache, length)[0][0])
        streams.append(stream)
    batch.join(streams)
    assert batch.mask.sum(axis=1).tolist() == [3, 17, 30] and batch.width == 30
    logits = batch.step()
    for row, expected in zip(logits, solo):
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)


def test_steady_steps_never_lay_the_cache_out_again_and_a_leave_drops_unneeded_padding(exported):
    session = NSNSession(exported("llama")[0].path.parent)
    layouts = []

    class Counting(type(session)):
        def host_cache(self, cache):
            layouts.append(1)
            return super().host_cache(cache)

    session.__class__ = Counting
    batcher = Batcher(session)
    long_one = batcher.open([5] * 30, max_new_tokens=8, stop_ids=set())
    others = [batcher.open([7, 8], max_new_tokens=20, stop_ids=set()) for _ in range(3)]
    batcher.step(lambda s: 16)  # every prompt read (36 tokens, within one step's chunk), first tokens out
    assert batcher.last_sizes == [] and all(len(s.tokens) == 1 for s in [long_one, *others])
    batcher.step(lambda s: 16)  # all four join one batch (84 padded positions is less than a call's worth)
    assert batcher.last_sizes == [4]
    layouts.clear()
    for _ in range(5):
        batcher.step(lambda s: 16)  # steady: no layout at all
    assert layouts == [] and batcher.last_sizes == [4]
    while not long_one.done:
        batcher.step(lambda s: 16)
    batcher.close(long_one)
    batcher.step(lambda s: 16)  # the long row leaves: the others' padding goes with it, its row stays free
    (batch,) = batcher.batches
    assert batch.rows == [*others, None] and batch.width == max(s.length for s in others) < 30  # no padding left
    for stream in others[:2]:
        batcher.close(stream)
    batcher.step(lambda s: 16)  # more rows free than used: the free ones go
    assert batch.rows == others[2:] and batch.mask.tolist() == [[1] * batch.width]


def test_a_stream_that_leaves_frees_its_row_and_the_next_one_takes_it_in_place(exported, monkeypatch):
    """Four streams share a call; the first to finish frees its row without the cache being laid out
    again; a stream that arrives then takes that row (written in place) and a free row's output is
    never read: every stream gets its solo tokens, and no layout happens after the first."""
    session = NSNSession(exported("llama")[0].path.parent)
    layouts = []
    original = Batch._lay_out
    monkeypatch.setattr(Batch, "_lay_out", lambda self, joining, *free: (layouts.append(len(joining)), original(
        self, joining, *free))[1])
    requests = [([7, 8, 9], 4), ([9, 4, 1], 30), ([3, 3, 5], 30), ([6, 2, 8], 30), ([4, 4], 12)]
    expected = [session.generate(p, n, stop_ids=set()).token_ids for p, n in requests]
    batcher = Batcher(session)
    streams = [batcher.open(p, n, stop_ids=set(), tag=i) for i, (p, n) in enumerate(requests[:4])]
    got = {i: [] for i in range(5)}

    def step():
        for stream, outcome in batcher.step(lambda s: 16):
            got[stream.tag].append(outcome.token)
            if stream.done:
                batcher.close(stream)

    step()  # the four prompts read, first tokens out
    step()  # they join one batch: its one layout
    assert layouts == [4] and batcher.last_sizes == [4]
    while not streams[0].done:
        step()
    step()  # the first leaves: its row is freed, nothing laid out
    (batch,) = batcher.batches
    assert batch.rows[0] is None and batch.rows[1:] == streams[1:] and layouts == [4]
    assert batcher.last_sizes == [3]
    streams.append(batcher.open(*requests[4], stop_ids=set(), tag=4))
    step()  # its prompt read
    step()  # it takes the free row, in place
    assert batch.rows == [streams[4], *streams[1:4]] and layouts == [4] and batcher.last_sizes == [4]
    while batcher.streams:
        step()
    assert [got[i] for i in range(5)] == expected


def test_a_row_that_would_pad_the_others_too_much_decodes_beside_them_at_the_same_rank(exported):
    """With room for 20 padded positions per call: three 2-token prompts share a call; a 50-token
    prompt arriving later (150 padded positions) gets a call of its own at the same rank, while
    its prompt is read a bounded chunk per step and the three get a token at every step; each
    request still gets its solo tokens."""
    session = NSNSession(exported("llama")[0].path.parent)
    requests = [[7, 8], [9, 4], [3, 3], list(range(5, 55))]
    expected = [session.generate(p, 40, stop_ids=set()).token_ids for p in requests]
    batcher = Batcher(session, prefill_chunk=12, padding_per_call=20)
    short = [batcher.open(p, 40, stop_ids=set(), tag=n) for n, p in enumerate(requests[:3])]
    got = {n: [] for n in range(4)}

    def step():
        for stream, outcome in batcher.step(lambda s: 16):
            got[stream.tag].append(outcome.token)

    for _ in range(3):
        step()
    long_one = batcher.open(requests[3], 40, stop_ids=set(), tag=3)
    while not long_one.tokens:
        before = [len(got[n]) for n in range(3)]
        step()
        assert [len(got[n]) for n in range(3)] == [b + 1 for b in before]  # never stalled by the reading
        assert long_one.read <= 12 * (len(got[0]) - 3)  # at most one chunk per step
    step()
    assert sorted(batcher.last_sizes) == [1, 3]  # two calls at one rank
    while batcher.streams:
        step()
        for stream in [*short, long_one]:
            if stream.done:
                batcher.close(stream)
    assert [got[n] for n in range(4)] == expected


def test_a_long_prompt_is_read_on_the_reader_beside_the_steps_and_every_request_gets_its_solo_tokens(
        exported, monkeypatch):
    """Three streams decode; a long prompt arrives and its chunks are read by a second session (one
    thread) on a thread of its own while the steps go on, on that session too (the three get a
    token at every step); a second long prompt whose client leaves while its chunk is being read
    ends quietly; each request gets the tokens it gets alone, the long one's first token included."""
    import deploy.batch

    monkeypatch.setattr(deploy.batch, "BESIDE_PROMPT", 30)
    session = NSNSession(exported("llama")[0].path.parent, intra_op_threads=2)
    session.prepare(16, wait=True)
    reader = session.prompt_reader()
    reader.prepare(16, wait=True)
    calls = []
    original = reader.decode_step
    reader.decode_step = lambda *args, **kwargs: (calls.append((args[0].shape[1], int(args[0].sum()))),
                                                   original(*args, **kwargs))[1]
    requests, budgets = [[7, 8], [9, 4], [3, 3], list(range(5, 55))], [100, 100, 100, 40]
    expected = [session.generate(p, n, stop_ids=set()).token_ids for p, n in zip(requests, budgets)]
    batcher = Batcher(session, prefill_chunk=12, reader=reader)
    for n, p in enumerate(requests[:3]):
        batcher.open(p, 100, stop_ids=set(), tag=n)
    got = {n: [] for n in range(4)}
    steps_on_reader = []
    decode_batch = reader.decode_batch
    reader.decode_batch = lambda *args: (steps_on_reader.append(1), decode_batch(*args))[1]

    def step():
        for stream, outcome in batcher.step(lambda s: 16):
            assert not isinstance(outcome, Exception), outcome
            if stream.tag is not None:
                got[stream.tag].append(outcome.token)
            if stream.done:
                batcher.close(stream)

    for _ in range(3):
        step()
    long_one = batcher.open(requests[3], 40, stop_ids=set(), tag=3)
    left = batcher.open(list(range(50, 90)), 40, stop_ids=set())
    while not (long_one.tokens and left.done):
        before = [len(got[n]) for n in range(3)]
        if batcher.in_flight is not None:
            batcher.in_flight[3].result()  # the chunk's call is back before the step (as on a slow device)
        step()
        assert [len(got[n]) for n in range(3)] == [b + 1 for b in before]  # never stalled by the reading
        if long_one.tokens and batcher.in_flight is not None and batcher.in_flight[0] is left:
            batcher.close(left)  # its client went away while its chunk is read
            assert batcher.streams == 5  # held until the call is back
    assert calls[0] == (12, 0)  # first a chunk of zeros, read once the streams decoded on the reader's rank
    assert {size for size, _ in calls[1:]} <= {12, 50 % 12} and len(calls) >= 6  # then the prompts, a chunk at a time
    assert steps_on_reader  # the steps ran on the reader's other thread meanwhile
    while batcher.streams:
        step()
    assert [got[n] for n in range(4)] == expected and left.done and left.cache is None


def test_a_failure_while_the_reader_reads_a_prompt_ends_that_request_alone(exported, monkeypatch):
    from concurrent import futures

    import deploy.batch

    monkeypatch.setattr(deploy.batch, "BESIDE_PROMPT", 30)
    session = NSNSession(exported("llama")[0].path.parent, intra_op_threads=2)
    session.prepare(16, wait=True)
    reader = session.prompt_reader()
    reader.prepare(16, wait=True)
    original = reader.decode_step

    def decode_step(ids, *args, **kwargs):
        if int(ids[0, 0]) == 60:
            raise RuntimeError("injected fault")
        return original(ids, *args, **kwargs)

    reader.decode_step = decode_step
    expected = session.generate([7, 8], 30, stop_ids=set()).token_ids
    batcher = Batcher(session, prefill_chunk=12, reader=reader)
    runner = batcher.open([7, 8], 30, stop_ids=set())
    batcher.step(lambda s: 16)
    faulty = batcher.open(list(range(60, 95)), 10, stop_ids=set())
    tokens, failures = [runner.tokens[0]], []
    while batcher.streams:
        if batcher.in_flight is not None:
            futures.wait([batcher.in_flight[3]])  # the reader's call is back before the step
        for stream, outcome in batcher.step(lambda s: 16):
            if isinstance(outcome, Exception):
                failures.append((stream, str(outcome)))
            elif stream is runner:
                tokens.append(outcome.token)
            if stream.done:
                batcher.close(stream)
    assert failures == [(faulty, "injected fault")] and faulty.done and faulty.cache is None
    assert tokens == expected  # the other request never noticed


def test_a_runtime_that_cannot_batch_is_refused_with_the_reason(exported):
    session = NSNSession(exported("llama")[0].path.parent)
    session.input_shapes = {k: v for k, v in session.input_shapes.items() if k != "position_ids"}
    with pytest.raises(ValueError, match="position_ids"):
        Batcher(session)
    with pytest.raises(ValueError, match=r"prefill chunk must be an integer in \[1, 8192\].*got 0"):
        Batcher(NSNSession(exported("llama")[0].path.parent), prefill_chunk=0)
