import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def nsn_checkpoint(tmp_path_factory):
    """``nsn_checkpoint(arch)`` -> path of a tiny NSN checkpoint (half-rank factors, tokenizer)."""
    import nsn_export as nsn
    from tiny import tiny_model, tiny_tokenizer

    cache = {}

    def build(arch: str):
        if arch not in cache:
            model = tiny_model(arch)
            nsn.adapt(model, "all-linear", max_rank=16)
            model.nsn_config.trained_ranks = [4, 8, 16]
            cache[arch] = nsn.save_nsn(model, tmp_path_factory.mktemp("ckpt") / arch, tokenizer=tiny_tokenizer())
        return cache[arch]

    return build


@pytest.fixture(scope="session")
def exported(tmp_path_factory, nsn_checkpoint):
    """``exported(arch, mode)`` -> (export directory, the torch NSN model it came from), verified."""
    import nsn_export as nsn
    from nsn_export.export import export_onnx

    cache = {}

    def build(arch: str, mode: str = "slice"):
        if (arch, mode) not in cache:
            checkpoint = nsn_checkpoint(arch)
            model = nsn.load_nsn(checkpoint)
            result = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{arch}-{mode}", rank_mode=mode,
                                 tokenizer_dir=checkpoint)
            cache[arch, mode] = (result, model)
        return cache[arch, mode]

    return build


class Server:
    """An ``nsn-serve`` process on a free loopback port, as its users meet it."""

    def __init__(self, args: list[str], env: dict | None = None, timeout_s: float = 120):
        import json
        import subprocess
        import tempfile
        import time

        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on it
        self.process = subprocess.Popen([sys.executable, "-m", "deploy.serve", *args, "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env={**os.environ, **(env or {})}, cwd=os.path.dirname(os.path.dirname(__file__)))
        line = self.process.stdout.readline()  # {"listening": "http://127.0.0.1:PORT", ...}
        if not line:
            raise RuntimeError(f"nsn-serve did not start: {self.stderr()}")
        self.url = json.loads(line)["listening"]
        deadline = time.monotonic() + timeout_s
        import httpx

        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nsn-serve never became healthy: {self.stderr()}")
            time.sleep(0.1)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, api_key: str = "none"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def metric(self, name: str, **labels) -> float | None:
        """One sample of ``/metrics`` (None when absent)."""
        import httpx

        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except Exception:
                self.process.kill()


@pytest.fixture(scope="session")
def serve():
    """``serve(args, env)`` -> a started ``Server`` (stopped at the end of the session)."""
    servers = []

    def start(args: list[str], env: dict | None = None) -> Server:
        server = Server([str(a) for a in args], env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
