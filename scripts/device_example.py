"""From a workstation's export to a served model, on a device that has only the device install
(``pip install '.[cpu,serve]'`` from a clone or the built wheel, plus ``[trt]`` and JetPack's TensorRT on a Jetson):

    python scripts/device_example.py EXPORT_DIR [--work runs/device-example]

1. ``nsn-calibrate``: the rank frontier of this device -> frontier.json (levels, TensorRT profiles);
2. ``nsn-trt check`` and ``nsn-trt build`` with the frontier's profile ranges -> an engine. Without
   TensorRT (any machine but a Jetson or an NVIDIA GPU) the engine is built on the test double that
   the test suite holds to TensorRT's recorded API, and the step says so;
3. ``nsn-serve`` under the governor, its levels from the frontier: one request through the OpenAI
   API, then SIGTERM, which drains and exits 0.

Every step is a command a person would type; the script prints each one and stops at the first
that fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(title: str, command: list[str]) -> subprocess.CompletedProcess:
    print(f"\n== {title}\n$ {shlex.join(command)}", flush=True)
    result = subprocess.run(command, text=True, capture_output=True)
    print(result.stdout.strip()[-2000:], flush=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def http_json(url: str, body: dict | None = None, timeout_s: float = 120) -> dict:
    """GET (or POST ``body``) and parse the JSON answer; the standard library is all a device needs."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def build_on_the_double(export: Path, engine: Path, profiles: str) -> None:
    """The engine on the TensorRT test double (tests/trt_double.py): the same builder code path."""
    sys.path.insert(0, str(ROOT / "tests"))
    import trt_double

    from deploy.tensorrt.build import build_engine
    from deploy.tensorrt.plan import ShapeBounds, plan_for_export

    cudart = trt_double.make_cudart()
    plan = plan_for_export(export, profiles, ShapeBounds(max_seq=64, max_context=128, opt_seq=16, opt_context=32))
    build_engine(export, engine, plan, trt=trt_double.make_tensorrt(cudart), cudart=cudart)
    print(f"built {engine} on the TensorRT test double (no TensorRT here); ranges {', '.join(map(str, plan.ranges))}")


def serve_once(model: Path, policy: Path) -> dict:
    command = [sys.executable, "-m", "deploy.serve", str(model), "--policy", str(policy), "--port", "0"]
    print(f"\n== serve under the governor, one request, SIGTERM\n$ {shlex.join(command)}", flush=True)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        url = json.loads(server.stdout.readline())["listening"]
        for _ in range(1200):
            try:
                if http_json(f"{url}/health", timeout_s=5)["status"] == "ok":
                    break
            except (urllib.error.URLError, OSError):  # 503 while loading, or not yet listening
                pass
            time.sleep(0.1)
        task = http_json(f"{url}/v1/models")["data"][0]["nsn"]["task"]
        if task == "feature-extraction":
            reply = http_json(f"{url}/v1/embeddings", {"input": ["Robots adapt their compute."]})
        else:
            reply = http_json(f"{url}/v1/completions", {"prompt": [5, 17, 3], "max_tokens": 8})
        nsn = reply["nsn"]
        print(f"{task}: ranks {nsn.get('ranks')}, governor: {nsn['governor']}")
    finally:
        server.terminate()
    code = server.wait(timeout=60)
    print(f"nsn-serve exited {code} after SIGTERM")
    if code != 0:
        raise SystemExit(f"nsn-serve exited {code}")
    return nsn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="an nsn-export directory made on a workstation")
    parser.add_argument("--work", type=Path, default=Path("runs/device-example"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    frontier = args.work / "frontier.json"
    step("calibrate the rank frontier on this device",
         ["nsn-calibrate", str(args.export), "--budget-s", "20", "--repeats", "3", "--texts", "32",
          "--output", str(frontier)])
    levels = json.loads(frontier.read_text())
    step("will TensorRT build this graph?", ["nsn-trt", "check", str(args.export)])
    step("the engine's profiles, from the frontier", ["nsn-trt", "plan", str(args.export), "--profiles", str(frontier),
                                                      "--max-seq", "64", "--max-context", "128", "--opt-seq", "16",
                                                      "--opt-context", "32"])
    engine = args.work / "engine"
    if have_tensorrt():
        step("build the engine", ["nsn-trt", "build", str(args.export), "--output", str(engine), "--profiles",
                                  str(frontier), "--max-seq", "64", "--max-context", "128", "--opt-seq", "16",
                                  "--opt-context", "32", "--overwrite"])
        served = engine
    else:
        print("\n== build the engine (TensorRT is not installed: on the test double)", flush=True)
        build_on_the_double(args.export, engine, levels["profiles"])
        served = args.export  # the double runs only inside this process: serve the export with ONNX Runtime
    policy = args.work / "policy.toml"
    policy.write_text(f'[levels]\nfrontier = "{frontier.resolve()}"\n\n[queue]\ntarget_s = 2.0\n')
    serve_once(served, policy)
    print(f"\ndone: frontier levels {levels['levels']}, profiles {levels['profiles']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
