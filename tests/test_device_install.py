"""The device install, as a device gets it: the wheel built from this checkout, installed with the
``cpu`` and ``serve`` extras only into a fresh virtual environment (no torch, no transformers), on
numpy 1.26 (JetPack 6) and on numpy 2. In it, the device commands work on an export made by the
workstation environment, and the export-side commands say in one line which extra to install.

Needs the package index (the extras' wheels); a second run takes them from pip's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # over a minute on 2 cores together: `python -m pytest -m "not slow"` skips it


def run(command: list[str], env_dir: Path | None = None, timeout: float = 600, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if env_dir is not None:
        environment["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{environment['PATH']}"
        environment["VIRTUAL_ENV"] = str(env_dir)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment,
                            cwd=cwd or env_dir or ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)])
    return next(out.glob("nsn_export-*.whl"))


@pytest.fixture(scope="module", params=["numpy<2", "numpy>=2"], ids=["numpy1", "numpy2"])
def device_env(request, wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with ``nsn-export[cpu,serve]`` from the wheel and ``request.param``."""
    env_dir = tmp_path_factory.mktemp("device-env")
    venv.create(env_dir, with_pip=True)
    run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"{wheel}[cpu,serve]", request.param], env_dir, timeout=1200)
    return env_dir


def device(env_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(env_dir / "bin" / args[0]), *args[1:]], env_dir, check=check)


def test_the_device_install_has_no_training_stack(device_env, request):
    python = str(device_env / "bin" / "python")
    numpy_major = run([python, "-c", "import numpy; print(numpy.__version__)"], device_env).stdout.split(".")[0]
    assert numpy_major == ("1" if "numpy1" in request.node.callspec.id else "2")
    for module in ("torch", "transformers", "optimum", "accelerate"):
        assert run([python, "-c", f"import {module}"], device_env, check=False).returncode != 0, module
    installed = json.loads(run([python, "-m", "pip", "list", "--format", "json"], device_env).stdout)
    names = {package["name"].lower() for package in installed}
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names and "fastapi" in names
    # the library says which extra is missing, in one line
    result = run([python, "-c", "import nsn_export; nsn_export.adapt"], device_env, check=False)
    assert result.returncode == 1 and "needs the export extra" in result.stderr
    assert "pip install '.[export]' in a clone" in result.stderr and "-py3-none-any.whl[export]'" in result.stderr


def test_the_device_commands_work_on_a_workstation_export(device_env, exported, tmp_path):
    encoder, decoder = exported("bert")[0].path.parent, exported("llama")[0].path.parent
    embedded = json.loads(device(device_env, "nsn-run", str(encoder), "--ranks", "4", "--text", "w1 w2",
                                 "--json").stdout)
    assert embedded["rank"] == 4 and len(embedded["embeddings"][0]) == 32
    generated = json.loads(device(device_env, "nsn-run", str(decoder), "--prompt", "w1 w2", "--max-new-tokens", "3",
                                  "--json").stdout)
    assert len(generated["token_ids"]) <= 3
    frontier = tmp_path / "frontier.json"
    device(device_env, "nsn-calibrate", str(encoder), "--ranks", "2,16", "--repeats", "1", "--texts", "4",
           "--batch", "2", "--output", str(frontier))
    assert json.loads(frontier.read_text())["rows"][-1]["quality"] == pytest.approx(1.0)
    device(device_env, "nsn-trt", "plan", str(decoder), "--profiles", "2", "--max-seq", "32", "--max-context", "64",
           "--opt-seq", "8", "--opt-context", "16")
    device(device_env, "nsn-trt", "check", str(decoder))
    scenario = tmp_path / "s.toml"
    scenario.write_text("duration_s = 120\n[ambient]\nschedule = [[0, 30.0]]\n")
    assert "governor" in device(device_env, "nsn-governor", "simulate", str(scenario)).stdout


def test_nsn_serve_starts_answers_and_stops_in_the_device_install(device_env, exported):
    import httpx

    server = subprocess.Popen([str(device_env / "bin" / "nsn-serve"), str(exported("llama")[0].path.parent),
                               "--port", "0", "--sysfs-root", str(device_env)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=device_env)
    try:
        url = json.loads(server.stdout.readline())["listening"]
        for _ in range(600):  # up to a minute
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "w1 w2", "max_tokens": 3}, timeout=60)
        assert reply.status_code == 200 and reply.json()["nsn"]["token_ranks"], reply.text
    finally:
        server.terminate()
    assert server.wait(timeout=60) == 0


@pytest.mark.parametrize("command", [
    ["nsn-adapt", "hf", "--output", "out"],
    ["nsn-export", "--model", "ckpt", "--output", "out"],
    ["nsn-train", "--model", "ckpt", "--data", "d.txt", "--output", "out"],
    ["nsn-eval", "--model", "ckpt", "--retrieval"],
    ["nsn-verify", "model.onnx", "--model", "ckpt"],
    ["nsn-quickstart"],
    ["nsn-bench"],
])
def test_the_export_commands_say_which_extra_to_install(device_env, tmp_path, command):
    result = run([str(device_env / "bin" / command[0]), *command[1:]], device_env, check=False, cwd=tmp_path)
    message = result.stdout + result.stderr
    assert result.returncode in (1, 2) and "Traceback" not in message, message
    assert "needs the export extra" in message and "pip install '.[export]' in a clone" in message
    assert len(message.strip().splitlines()) == 1, message
    assert list(tmp_path.iterdir()) == []


def test_the_device_example_runs_with_nothing_but_the_device_install(device_env, exported, tmp_path):
    """scripts/device_example.py: a workstation's export -> frontier -> engine (on the TensorRT
    double here) -> served under the governor, one request, SIGTERM."""
    result = run([str(device_env / "bin" / "python"), str(ROOT / "scripts" / "device_example.py"),
                  str(exported("llama")[0].path.parent), "--work", str(tmp_path / "work")], device_env, timeout=900)
    assert "on the TensorRT test double" in result.stdout and "nsn-serve exited 0 after SIGTERM" in result.stdout
    assert json.loads((tmp_path / "work" / "frontier.json").read_text())["levels"]
