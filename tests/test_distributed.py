"""Data parallelism: ``train_nsn`` under ``torchrun`` (two CPU processes, gloo) learns what one
process learns with the same global batch, the ``s_k`` included and identical on every process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import nsn_export as nsn
from distributed_train import untrained_student
from tiny import tiny_text

HERE = Path(__file__).resolve().parent
STEPS = 6
GLOBAL_BATCH = 8
pytestmark = pytest.mark.slow  # over a minute on 2 cores together: `python -m pytest -m "not slow"` skips it
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun command runs


def train(launcher: list[str], output: Path, per_device_batch: int) -> tuple[dict, dict]:
    """Run ``distributed_train.py`` under ``launcher``: ``({process: facts}, {process: weights})``."""
    output.mkdir()
    done = subprocess.run(launcher + [str(HERE / "distributed_train.py"), str(output), str(per_device_batch),
                                      str(STEPS)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in output.glob("objective-*.json")}
    weights = {int(p.stem.split("-")[1]): safetensors.torch.load_file(p) for p in output.glob("weights-*.safetensors")}
    return facts, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    single = train([sys.executable], root / "one", GLOBAL_BATCH)
    double = train(TORCHRUN + ["--standalone", "--nproc_per_node", "2"], root / "two", GLOBAL_BATCH // 2)
    return single, double


def test_two_processes_really_ran_data_parallel(runs):
    (single_facts, _), (double_facts, double_weights) = runs
    assert sorted(double_facts) == [0, 1] and sorted(double_weights) == [0, 1]
    assert {f["world_size"] for f in double_facts.values()} == {2}
    assert single_facts[0]["world_size"] == 1


def test_every_process_ends_with_identical_weights_and_s_k(runs):
    _, (facts, weights) = runs
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    assert facts[0]["s_k"] == facts[1]["s_k"]
    assert facts[0]["sample_counts"] == facts[1]["sample_counts"]


def test_two_processes_learn_what_one_process_learns_with_the_same_global_batch(runs):
    (single_facts, single_weights), (double_facts, double_weights) = runs
    start = untrained_student().state_dict()
    for name, tensor in single_weights[0].items():
        torch.testing.assert_close(double_weights[0][name], tensor, rtol=1e-4, atol=1e-4, msg=name)
    moved = max(float((tensor - start[name]).abs().max()) for name, tensor in single_weights[0].items())
    assert moved > 1e-2  # training moved the weights far beyond the tolerance
    s_single, s_double = single_facts[0]["s_k"], double_facts[0]["s_k"]
    assert s_single.keys() == s_double.keys() and len(s_single) >= 3  # the anchor and sampled lower ranks
    for rank_value, s in s_single.items():
        assert abs(s_double[rank_value] - s) < 1e-4, rank_value
    assert single_facts[0]["sample_counts"] == double_facts[0]["sample_counts"]


def test_nsn_train_under_torchrun_writes_one_checkpoint(nsn_checkpoint, tmp_path):
    nsn_train = shutil.which("nsn-train", path=str(Path(sys.executable).parent)) or shutil.which("nsn-train")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(tiny_text(16)) + "\n")
    done = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node", "2", "--no-python", nsn_train,
                           "--model", str(nsn_checkpoint("llama")), "--data", str(data), "--output",
                           str(tmp_path / "trained"), "--steps", "2", "--batch-size", "4", "--distill", "kl"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # process 0 saves; the other does not race it
    trained = nsn.load_nsn(tmp_path / "trained")
    assert 16 in trained.nsn_config.trained_ranks and trained.nsn_config.log_variances
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "trained"]  # no scratch left
