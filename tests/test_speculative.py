"""Self-speculative decoding: the low ranks draft, the target rank verifies. Greedy output is the
target rank's own, token for token, for every pair of ranks; sampling follows the target's
distribution through the accept/reject rule."""

import numpy as np
import pytest

from deploy import NSNSession
from deploy.speculative import Speculation, accept, check_speculation

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


class Recorded(Speculation):
    """A speculation that keeps each round's (proposed, kept), and never switches itself off (on
    these tiny models a round's timing is noise)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, auto_off=False, **kwargs)
        self.kept_by_round = []

    def learn(self, proposed, kept):
        self.kept_by_round.append((proposed, kept))
        super().learn(proposed, kept)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_speculation_gives_the_target_ranks_tokens_for_every_pair_of_ranks(exported, arch):
    session = NSNSession(exported(arch)[0].path.parent)
    for target in (16, 11, 4):
        session.rank = target
        plain = session.generate(PROMPT, max_new_tokens=100, stop_ids=set())
        for draft in range(1, target):
            for k in (1, 4):
                speculation = Recorded(draft, k)
                result = session.generate(PROMPT, max_new_tokens=100, stop_ids=set(), speculative=speculation)
                assert result.token_ids == plain.token_ids, (target, draft, k)
                assert set(result.ranks) == {target} and result.drafted == speculation.drafted


def test_rounds_where_every_draft_is_rejected_and_rounds_where_every_draft_is_kept_both_stay_identical(exported):
    session = NSNSession(exported("llama")[0].path.parent, rank=16)
    plain = session.generate(PROMPT, max_new_tokens=100, stop_ids=set())
    for draft in (1, 15):  # far below the target: drafts rejected; one below it: drafts kept
        speculation = Recorded(draft, 4)
        assert session.generate(PROMPT, max_new_tokens=100, stop_ids=set(),
                                speculative=speculation).token_ids == plain.token_ids
        kept = [kept for _, kept in speculation.kept_by_round]
        assert (0 in kept) if draft == 1 else any(k == p for p, k in speculation.kept_by_round)


def test_a_stop_token_or_the_token_budget_ends_a_speculative_round_early(exported):
    session = NSNSession(exported("llama")[0].path.parent, rank=16)
    plain = session.generate(PROMPT, max_new_tokens=40, stop_ids=set())
    stop = plain.token_ids[25]
    expected = plain.token_ids[:plain.token_ids.index(stop) + 1]
    for budget, stops in ((40, {stop}), (7, set())):
        result = session.generate(PROMPT, max_new_tokens=budget, stop_ids=stops, speculative=Recorded(15, 8))
        assert result.token_ids == (expected if stops else plain.token_ids[:budget])


def test_the_accept_reject_rule_samples_the_target_distribution():
    random = np.random.default_rng(0)
    target = np.array([0.5, 0.3, 0.15, 0.05])
    draft = np.array([0.1, 0.2, 0.3, 0.4])
    draws = 40_000
    counts = np.zeros(4)
    for _ in range(draws):
        proposal = int(random.choice(4, p=draft))
        counts[accept(proposal, target, draft, random)[1]] += 1
    # each share within 4.5 standard errors of the target's probability
    assert np.all(np.abs(counts / draws - target) <= 4.5 * np.sqrt(target * (1 - target) / draws))


def test_sampled_speculation_is_reproducible_and_counts_what_it_drafts(exported):
    session = NSNSession(exported("llama")[0].path.parent, rank=16)
    runs = [session.generate(PROMPT, max_new_tokens=30, do_sample=True, temperature=0.8, top_k=20, seed=5,
                             stop_ids=set(), speculative=Recorded(12, 3)) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 30
    assert 0 <= runs[0].accepted <= runs[0].drafted > 0


def test_speculation_switches_itself_off_once_it_costs_more_per_token_than_plain_decoding():
    cheap, dear = Speculation(4), Speculation(4)
    for speculation, round_ms in ((cheap, 20.0), (dear, 70.0)):
        assert not speculation.ready  # the plain round after the prompt comes first
        speculation.timed(False, 30.0, 1)  # plain: 30 ms a token
        for _ in range(8):
            assert speculation.ready
            speculation.timed(True, round_ms, 2)  # two tokens kept a round
    assert not cheap.off and cheap.speculative_ms == 10.0 and cheap.ready
    assert dear.off and not dear.ready
    assert Speculation(4, auto_off=False).ready


def test_draft_ranks_and_draft_lengths_are_checked():
    for draft, k, words in ((0, 4, "draft rank must be an integer in [1, 15]"), (16, 4, "[1, 15], got 16"),
                            (4, 0, "draft tokens (k) must be an integer in [1, 16]"), (4, 17, "got 17"),
                            (True, 4, "got True")):
        with pytest.raises(ValueError) as error:
            check_speculation(draft, k, 16)
        assert words in str(error.value)


def test_nsn_run_speculative_prints_the_same_tokens_and_what_was_drafted(exported):
    import json

    from click.testing import CliRunner

    from deploy.cli import run_command

    export = str(exported("llama")[0].path.parent)
    args = [export, "--prompt", "w1 w2 w3", "--ranks", "16", "--max-new-tokens", "24", "--json"]
    plain = json.loads(CliRunner().invoke(run_command, args).stdout)
    result = CliRunner().invoke(run_command, [*args, "--speculative", "12", "--draft-tokens", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["token_ids"] == plain["token_ids"] and report["speculative"]["draft_rank"] == 12
    assert 0 <= report["speculative"]["accepted"] <= report["speculative"]["drafted"]


def test_the_server_drafts_with_a_low_rank_and_answers_what_it_answers_without(serve, exported):
    export = exported("llama")[0].path.parent
    plain = serve([export, "--no-governor", "--model-name", "tiny"])
    drafting = serve([export, "--no-governor", "--model-name", "tiny", "--speculative", "12"])
    answers = [server.client().completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=24, temperature=0)
               for server in (plain, drafting)]
    assert answers[1].choices[0].text == answers[0].choices[0].text
    report = answers[1].model_extra["nsn"]["speculative"]
    assert report["draft_rank"] == 12 and 0 <= report["accepted"] <= report["drafted"]
    assert "speculative" not in answers[0].model_extra["nsn"]
    assert drafting.metric("nsn:spec_decode_num_draft_tokens_total") == report["drafted"]
    assert drafting.metric("nsn:spec_decode_num_accepted_tokens_total") == report["accepted"]


def test_with_a_draft_rank_a_lone_request_drafts_and_concurrent_ones_are_batched_all_with_their_own_text(
        serve, exported):
    """``--speculative``: a generation that starts while nothing else runs drafts (one sequence per
    round pays when the device is idle); generations that start beside others decode in shared calls
    instead. Every one answers what it answers alone."""
    import threading

    import httpx

    export = exported("llama")[0].path.parent
    session = NSNSession(export)
    expected = {n: session.generate([n + 3, 7, 9], max_new_tokens=60).token_ids for n in range(5)}
    server = serve([export, "--no-governor", "--model-name", "tiny", "--speculative", "15"])
    notes = httpx.get(f"{server.url}/v1/nsn/status", timeout=10).json()["notes"]
    assert any("continuous batching" in note and "rank 15 drafts for a generation that starts alone" in note
               for note in notes)
    results = {}

    def one(n):
        body = httpx.post(f"{server.url}/v1/completions", json={"prompt": [n + 3, 7, 9], "max_tokens": 60,
                                                                "temperature": 0}, timeout=60).json()
        results[n] = body

    alone = threading.Thread(target=one, args=(0,))
    alone.start()
    alone.join()
    together = threading.Barrier(4)
    threads = [threading.Thread(target=lambda n=n: (together.wait(timeout=30), one(n))) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for body in results.values():
        assert set(body["nsn"]["token_ranks"]) == {16}
    assert "speculative" in results[0]["nsn"]  # it started alone: it drafted
    assert sum("speculative" not in results[n]["nsn"] for n in range(1, 5)) >= 3  # they shared calls
    texts = {n: session.reply_text(expected[n]) for n in range(5)}
    assert {n: body["choices"][0]["text"] for n, body in results.items()} == texts


def test_the_speculative_benchmark_times_both_ways_at_each_level_above_the_draft(exported, tmp_path):
    import json

    from click.testing import CliRunner

    from calibration.cli import bench_command

    out = tmp_path / "speculative.json"
    result = CliRunner().invoke(bench_command, ["--model", str(exported("llama")[0].path.parent), "--speculative", "8",
                                                "--ranks", "4,12,16", "--threads", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == "nsn-bench-speculative/1" and [row["rank"] for row in report["rows"]] == [12, 16]
    for row in report["rows"]:
        assert set(row["tokens_per_s"]) == {"plain", "speculative", "speculative, never off"}
        assert 0 <= row["acceptance"] <= 1 and isinstance(row["switched_off"], bool)
    again = CliRunner().invoke(bench_command, ["--from-json", str(out)])
    assert again.exit_code == 0 and "| 16 |" in again.stdout and "draft rank 8" in again.stdout


def test_a_frontier_that_names_a_draft_rank_turns_drafting_on_in_nsn_serve(serve, exported, tmp_path):
    """nsn-calibrate times each rank as a draft and names the best one when it pays; nsn-serve under
    a policy with that frontier drafts with it, no flag needed. (The tiny model's timings are noise,
    so the frontier's findings are set here: what is tested is that the server follows them.)"""
    import json

    from click.testing import CliRunner

    from calibration.cli import calibrate_command

    export = exported("llama")[0].path.parent
    data = tmp_path / "d.txt"
    data.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(12)) for i in range(4)))
    frontier_path = tmp_path / "frontier.json"
    run = CliRunner().invoke(calibrate_command, [str(export), "--ranks", "8,15,16", "--repeats", "1", "--data",
                                                 str(data), "--prompt-tokens", "8", "--context-tokens", "8",
                                                 "--output", str(frontier_path)])
    assert run.exit_code == 0, run.output
    assert "self-speculative drafts for rank 16" in run.output
    frontier = json.loads(frontier_path.read_text())
    assert [c["draft_rank"] for c in frontier["speculative"]["candidates"]] == [8, 15]
    frontier["speculative"].update(draft_rank=15, acceptance=0.9, speedup=1.3, why=None)
    frontier.update(levels=[8, 16], profiles="1-8,9-16")  # the tiny model's timings are noise: fix the levels too
    frontier_path.write_text(json.dumps(frontier))
    (tmp_path / "sysfs").mkdir()
    (tmp_path / "p.toml").write_text('[levels]\nfrontier = "frontier.json"\n')
    server = serve([export, "--policy", tmp_path / "p.toml", "--sysfs-root", tmp_path / "sysfs", "--model-name", "t"])
    answer = server.client().completions.create(model="t", prompt="w1 w2 w3", max_tokens=24, temperature=0)
    nsn = answer.model_extra["nsn"]
    assert nsn["speculative"]["draft_rank"] == 15 and set(nsn["token_ranks"]) == {16}
    session = NSNSession(export)
    assert answer.choices[0].text == session.reply_text(session.generate("w1 w2 w3", max_new_tokens=24).token_ids)


def test_the_identity_check_script_compares_drafted_and_plain_tokens_on_an_export(exported, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "speculative_identity.py"
    export = exported("llama")[0].path.parent
    out = tmp_path / "identity.json"
    run = subprocess.run([sys.executable, str(script), str(export), "--pairs", "3:16,15:16", "--tokens", "40",
                          "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["all_identical"] and len(report["rows"]) == 4 and "4 of 4 runs identical" in run.stdout
    bad = subprocess.run([sys.executable, str(script), str(export), "--pairs", "16:3", "--output",
                          str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "'16:3' is not DRAFT:TARGET with DRAFT < TARGET" in bad.stderr
    assert not (tmp_path / "x.json").exists()
