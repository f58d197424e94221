"""Load benchmark of nsn-serve: requests/s, tokens/s, time to first token and inter-token latency
(p50 / p99) at 1, 4, 8 and 16 concurrent clients, on MiniLM embeddings and on decoders: the
realistic decoder of nsn-bench (24 layers, hidden 896, random weights) or any decoder export given
by its directory (the SmolLM2 export). For decoders, the server with continuous batching and with
``--no-batching`` run side by side in one run (both up, each concurrency level on one then the
other), and a long prompt arrives while four streams run: how much it widens their gaps. Also
the server's overhead against calling NSNSession directly at one client.

    python scripts/bench_serve.py [--models minilm,decoder,PATH] [--clients 1,4,8,16] [--output runs/serve-bench.json]

Needs the export extra for the built-in exports (built once, cached in --work-dir) and the serve
extra. The clients run in this process on the same machine as the server, so on a small machine
they take CPU from it: the numbers are an upper bound on the server's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.atomic import atomic_file, check_output_files  # noqa: E402
from deploy.text import model_max_length  # noqa: E402

SENTENCES = ["Robots adapt their compute to the battery.", "The governor lowers the rank when the device is hot.",
             "A lower rank is a smaller, faster model.", "Every rank of a nested subspace network is valid."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def minilm_export(work: Path) -> Path:
    out = work / "minilm-onnx"
    if not (out / "model.onnx").is_file():
        import nsn_export as nsn
        from nsn_export.export import export_onnx
        from nsn_export.models import default_model_dir, load_hf_model

        source = default_model_dir()
        model = load_hf_model(source)
        nsn.adapt(model, "all-linear", max_rank=1.0)
        export_onnx(model, out, tokenizer_dir=source, verify=False, overwrite=True)
    return out


def decoder_export(work: Path) -> Path:
    out = work / "decoder-onnx-2"  # the number changes when the export's graph does (2: grouped attention)
    if not (out / "model.onnx").is_file():
        import nsn_export as nsn
        from calibration.bench import build_dense_model
        from nsn_export.export import export_onnx

        model = build_dense_model("realistic")
        nsn.adapt(model, "all-linear", max_rank=0.5)
        export_onnx(model, out, verify=False, overwrite=True)
    return out


class Server:
    def __init__(self, model_dir: Path, threads: int, extra: tuple[str, ...] = ()):
        self.process = subprocess.Popen([sys.executable, "-m", "deploy.serve", str(model_dir), "--port", "0",
                                         "--no-governor", "--threads", str(threads), "--max-queue", "1000",
                                         "--max-tokens", "100000", "--model-name", "m", *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, cwd=Path(__file__).resolve().parents[1])
        self.url = json.loads(self.process.stdout.readline())["listening"]
        for _ in range(3000):
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    level = httpx.get(f"{self.url}/v1/nsn/status", timeout=5).json().get("level") or {}
                    if "views (level building)" not in (level.get("runs_on"), level.get("reader")):  # as it will run
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("nsn-serve never became healthy")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def stream_once(client: httpx.Client, url: str, prompt: list[int], max_tokens: int,
                stamps: list[float] | None = None) -> tuple[float, list[float]]:
    """(time to first token in s, gaps between tokens in s) of one streamed completion; ``stamps``
    receives the arrival time of each token."""
    start = time.perf_counter()
    own: list[float] = []
    with client.stream("POST", f"{url}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                                                              "temperature": 0, "stream": True, "ignore_eos": True},
                       timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"finish_reason": null' in line:
                own.append(time.perf_counter())
                if stamps is not None:  # as they arrive (a caller may watch it)
                    stamps.append(own[-1])
    return own[0] - start, [b - a for a, b in zip(own, own[1:])]


def embed_once(client: httpx.Client, url: str, texts: list[str]) -> float:
    start = time.perf_counter()
    response = client.post(f"{url}/v1/embeddings", json={"model": "m", "input": texts, "encoding_format": "base64"},
                           timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start


def load(clients: int, per_client: int, one) -> dict:
    """``clients`` threads, each doing ``per_client`` requests in turn; ``one(client, stamps)`` returns
    the request's (latency, gaps) and appends each token's arrival time to ``stamps``. Tokens/s is
    given over the whole run and over its steady part, while every client has a request in flight
    (from the last client's first request to the first client's last answer: the ramp and the tail,
    where fewer streams run, left out)."""
    results, errors, stamps, spans = [], [], [], []

    def worker():
        begin = time.perf_counter()
        with httpx.Client() as client:
            for _ in range(per_client):
                try:
                    results.append(one(client, stamps))
                except Exception as error:  # counted, reported
                    errors.append(repr(error))
        spans.append((begin, time.perf_counter()))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    first = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    report = {"clients": clients, "requests": len(results), "errors": len(errors),
              "requests_per_s": round(len(results) / elapsed, 3),
              "latency_ms": {"p50": round(1e3 * percentile(first, 0.5), 2), "p99": round(1e3 * percentile(first, 0.99), 2)}}
    if gaps:
        report["inter_token_ms"] = {"p50": round(1e3 * percentile(gaps, 0.5), 2),
                                    "p99": round(1e3 * percentile(gaps, 0.99), 2)}
        report["tokens_per_s"] = round(len(gaps + first) / elapsed, 2)
        low, high = max(a for a, _ in spans), min(b for _, b in spans)
        if high > low:
            report["tokens_per_s_steady"] = round(sum(low <= t <= high for t in stamps) / (high - low), 2)
    return report


def direct_decode_ms(model_dir: Path, threads: int, prompt: list[int], max_tokens: int, repeats: int) -> dict:
    """NSNSession in this process, no server: prefill and per-token decode time (medians)."""
    from deploy import NSNSession

    session = NSNSession(model_dir, intra_op_threads=threads)
    session.set_rank(session.default_ceiling()[0])  # the rank the server runs without a governor
    session.prepare(session.rank, wait=True)  # on its level, as the server runs it once built
    session.generate(prompt, max_new_tokens=4, stop_ids=set())  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        result = session.generate(prompt, max_new_tokens=max_tokens, stop_ids=set())
        prefill.append(result.prefill_ms)
        decode.extend(result.step_latency_ms[1:])
    return {"prefill_ms": round(statistics.median(prefill), 3), "decode_ms_per_token": round(statistics.median(decode), 3)}


def long_prompt_gaps(url: str, prompt: list[int], long_prompt: list[int], streams: int = 4) -> dict:
    """``streams`` streams run; once each has sent 16 tokens a request with ``long_prompt`` arrives
    (one token asked). Their gaps: the median before it arrived and over the whole run, the worst
    while the long prompt is read (from its arrival to its first token), and the ratios."""
    stamps = [[] for _ in range(streams)]

    def run(n):
        with httpx.Client() as client:
            stream_once(client, url, prompt, 160, stamps[n])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(streams)]
    for thread in threads:
        thread.start()
    while min(len(s) for s in stamps) < 16:
        time.sleep(0.01)
    arrived = time.perf_counter()
    with httpx.Client() as client:
        first, _ = stream_once(client, url, long_prompt, 1)
    for thread in threads:
        thread.join()
    gaps = [(a, b) for s in stamps for a, b in zip(s, s[1:])]
    during = [b - a for a, b in gaps if b >= arrived and a <= arrived + first]  # overlapping the read
    before = statistics.median(b - a for a, b in gaps if b < arrived)
    median = statistics.median(b - a for a, b in gaps)
    return {"prompt_tokens": len(long_prompt), "streams": streams, "read_s": round(first, 3),
            "median_gap_before_ms": round(1e3 * before, 2), "median_gap_ms": round(1e3 * median, 2),
            "worst_gap_while_reading_ms": round(1e3 * max(during), 2),
            "worst_over_median": round(max(during) / median, 2), "worst_over_median_before": round(
                max(during) / before, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,decoder",
                        help="minilm, decoder (the realistic one) and/or paths of decoder exports")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=2000, help="tokens of the prompt that arrives mid-run "
                                                                      "(capped by the model's context)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/serve-bench"))
    parser.add_argument("--output", type=Path, default=Path("runs/serve-bench.json"))
    args = parser.parse_args(argv)
    check_output_files({"--output": args.output}, [args.work_dir])
    clients = [int(c) for c in args.clients.split(",")]
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads}, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests}
    prompt = [(7 * i) % 31000 + 5 for i in range(32)]
    for name in args.models.split(","):
        print(f"[{name}] preparing the export (cached)", file=sys.stderr, flush=True)
        if name == "minilm":
            model_dir = minilm_export(args.work_dir)
            server = Server(model_dir, args.threads)
            try:
                rows = []
                for count in clients:
                    print(f"[{name}] {count} client(s)", file=sys.stderr, flush=True)
                    one = lambda client, stamps: (embed_once(client, server.url, SENTENCES * 8), [])  # noqa: E731
                    one(httpx.Client(), [])  # warm-up
                    rows.append(load(count, args.requests, one))
                report[name] = rows
            finally:
                server.stop()
            continue
        model_dir = decoder_export(args.work_dir) if name == "decoder" else Path(name)
        name = name if name == "decoder" else model_dir.resolve().name
        print(f"[{name}] NSNSession directly", file=sys.stderr, flush=True)
        entry = {"direct": direct_decode_ms(model_dir, args.threads, prompt, args.max_tokens, 3)}
        servers = {"batched": Server(model_dir, args.threads), "no_batching": Server(model_dir, args.threads,
                                                                                    ("--no-batching",))}
        try:
            for mode in servers:
                entry[mode] = []
            for count in clients:
                for mode, server in servers.items():
                    print(f"[{name}] {count} client(s), {mode}", file=sys.stderr, flush=True)
                    one = lambda client, stamps, url=server.url: stream_once(  # noqa: E731
                        client, url, prompt, args.max_tokens, stamps)
                    one(httpx.Client(), [])  # warm-up
                    entry[mode].append(load(count, args.requests, one))
            length = min(args.long_prompt, model_max_length(model_dir) - 200)
            long_prompt = [(13 * i) % 31000 + 5 for i in range(length)]
            for mode, server in servers.items():
                print(f"[{name}] a {length}-token prompt during 4 streams, {mode}", file=sys.stderr, flush=True)
                entry[f"long_prompt_{mode}"] = long_prompt_gaps(server.url, prompt, long_prompt)
        finally:
            for server in servers.values():
                server.stop()
        one_stream = entry["batched"][0]
        steady = "tokens_per_s_steady"
        entry["batched_over_one_stream"] = {str(row["clients"]): {
            "tokens_per_s": round(row["tokens_per_s"] / one_stream["tokens_per_s"], 2),
            **({"tokens_per_s_steady": round(row[steady] / one_stream[steady], 2)}
               if steady in row and steady in one_stream else {}),
            "inter_token_p50": round(row["inter_token_ms"]["p50"] / one_stream["inter_token_ms"]["p50"], 2)}
            for row in entry["batched"]}
        entry["overhead_one_client"] = round(one_stream["inter_token_ms"]["p50"] / entry["direct"][
            "decode_ms_per_token"] - 1, 4)
        report[name] = entry
    text = json.dumps(report, indent=1)
    atomic_file(args.output, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
