"""Every bad input on every command, as one table: what is run, the exit code, the words the
message must contain; and for every case, that no file outside the command's output changed and
no scratch directory was left behind. Security cases prove that a model directory cannot make us
read a file outside it.

Exit codes: 2 for a bad option value (a usage error), 1 for a bad file or a failed run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from calibration.cli import bench_command, calibrate_command
from deploy.cli import run_command
from deploy.governor.cli import governor_command
from deploy.tensorrt.cli import trt_command
from nsn_export.cli import (adapt_command, eval_command, export_command, quickstart_command, train_command,
                            verify_command)
from tiny import tiny_model, tiny_text, tiny_tokenizer

SCRATCH = ".nsn-tmp-"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, nsn_checkpoint, exported):
    """Pristine inputs, copied into each case's workspace: a Hugging Face dir, an NSN checkpoint,
    slice- and mask-mode decoder exports and an encoder export."""
    hf = tmp_path_factory.mktemp("hf") / "hf"
    tiny_model("llama").save_pretrained(hf)
    tiny_tokenizer().save_pretrained(hf)
    return {"hf": hf, "ckpt": nsn_checkpoint("llama"), "export": exported("llama")[0].path.parent,
            "mask": exported("llama", "mask")[0].path.parent, "encoder": exported("bert")[0].path.parent}


def a_rank_factor(model: onnx.ModelProto) -> onnx.TensorProto:
    """An NSN factor that the weight views serve (so ONNX Runtime's own path check never sees it)."""
    from deploy.ort.views import rank_slices

    name = rank_slices(model)[0].input[0]
    return next(i for i in model.graph.initializer if i.name == name)


def point_weight(export: Path, location: str | None = None, offset: int | None = None) -> None:
    """Rewrite a rank factor's external ``location`` / ``offset`` in ``export/model.onnx``."""
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    tensor = a_rank_factor(model)
    for entry in tensor.external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        if entry.key == "offset" and offset is not None:
            entry.value = str(offset)
    onnx.save_model(model, str(export / "model.onnx"))


def outside_copy_of_weights(ws: Path) -> None:
    """A real weight file outside the export: an unchecked reader would load it and exit 0."""
    shutil.copy(ws / "export" / "model.onnx_data", ws / "outside.bin")


def make_fifo(ws: Path) -> None:
    os.mkfifo(ws / "export" / "fifo")
    point_weight(ws / "export", "fifo")


def make_device(ws: Path) -> None:
    try:
        os.mknod(ws / "export" / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device file needs root")
    point_weight(ws / "export", "zero")


def symlink_outside(ws: Path) -> None:
    outside_copy_of_weights(ws)
    (ws / "export" / "model.onnx_data").unlink()
    (ws / "export" / "model.onnx_data").symlink_to(ws / "outside.bin")


def nan_weights(ws: Path) -> None:
    data = ws / "encoder" / "model.onnx_data"
    data.write_bytes(np.full(data.stat().st_size // 4, np.nan, np.float32).tobytes())


def truncate(path: Path, keep: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def foreign_dir(ws: Path) -> None:
    (ws / "mine").mkdir()
    (ws / "mine" / "thesis.tex").write_text("years of work")


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def steps(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        for step in setups:
            step(ws)
    return setup


@dataclass
class Case:
    id: str
    command: object
    args: list[str]  # "{ws}" is the case's workspace
    code: int
    words: tuple[str, ...]
    copy: tuple[str, ...] = ()  # sources copied into the workspace first
    setup: Callable[[Path], None] | None = None
    output: str | None = None  # the one path the command may create or change
    env: dict = field(default_factory=dict)


RUN_TEXT = ["--text", "w1 w2 w3"]
RUN_PROMPT = ["--prompt", "w1 w2", "--max-new-tokens", "2"]
VERIFY = ["{ws}/export", "--model", "{ws}/ckpt", "--ranks", "4"]

CASES = [
    # ---- a model directory may not make us read outside it (both loading paths: weight views
    # in nsn-run, plain ONNX Runtime in nsn-verify) ------------------------------------------------
    *[case for command, args, extra in [(run_command, ["{ws}/export", *RUN_PROMPT], ()),
                                         (verify_command, VERIFY, ("ckpt",))]
      for case in [
          Case(f"{command.name}-dotdot-outside", command, args, 1, ("outside the model directory", "'../outside.bin'"),
               ("export", *extra), steps(outside_copy_of_weights, lambda ws: point_weight(ws / "export", "../outside.bin"))),
          Case(f"{command.name}-absolute-path", command, args, 1, ("/etc/passwd", "not a relative path"),
               ("export", *extra), lambda ws: point_weight(ws / "export", "/etc/passwd")),
          Case(f"{command.name}-absolute-device", command, args, 1, ("/dev/zero", "not a relative path"),
               ("export", *extra), lambda ws: point_weight(ws / "export", "/dev/zero")),
          Case(f"{command.name}-symlink-outside", command, args, 1, ("outside the model directory", "outside.bin"),
               ("export", *extra), symlink_outside),
          Case(f"{command.name}-fifo", command, args, 1, ("'fifo'", "not a regular file"), ("export", *extra),
               make_fifo),
          Case(f"{command.name}-device-inside", command, args, 1, ("'zero'", "not a regular file"),
               ("export", *extra), make_device),
          Case(f"{command.name}-offset-past-end", command, args, 1, ("past the end", "model.onnx_data"),
               ("export", *extra), lambda ws: point_weight(ws / "export", offset=10**9)),
          Case(f"{command.name}-dotdot-back-inside", command, args, 0, (),
               ("export", *extra), lambda ws: point_weight(ws / "export", "../export/model.onnx_data")),
          Case(f"{command.name}-subdir-dotdot-inside", command, args, 0, (),
               ("export", *extra), lambda ws: ((ws / "export" / "sub").mkdir(),
                                               point_weight(ws / "export", "sub/../model.onnx_data"))),
      ]],
    # ---- damaged exports ----------------------------------------------------------------------
    Case("run-truncated-graph", run_command, ["{ws}/export", *RUN_PROMPT], 1, ("model.onnx", "re-export"),
         ("export",), lambda ws: truncate(ws / "export" / "model.onnx")),
    Case("run-random-graph", run_command, ["{ws}/export", *RUN_PROMPT], 1, ("model.onnx", "re-export"),
         ("export",), write("export/model.onnx", np.random.default_rng(1).bytes(5000))),
    Case("run-truncated-weights", run_command, ["{ws}/export", *RUN_PROMPT], 1, ("past the end", "truncated"),
         ("export",), lambda ws: truncate(ws / "export" / "model.onnx_data")),
    Case("run-mask-missing-weights", run_command, ["{ws}/mask", *RUN_PROMPT], 1, ("model.onnx_data", "missing"),
         ("mask",), lambda ws: (ws / "mask" / "model.onnx_data").unlink()),
    Case("run-random-weights-nan", run_command, ["{ws}/encoder", *RUN_TEXT], 1, ("NaN or inf", "re-export"),
         ("encoder",), nan_weights),
    Case("run-bad-tokenizer", run_command, ["{ws}/encoder", *RUN_TEXT], 1, ("tokenizer.json", "re-export"),
         ("encoder",), write("encoder/tokenizer.json", "{not json")),
    Case("run-config-is-a-list", run_command, ["{ws}/encoder", *RUN_TEXT], 1, ("config.json", "expected an object"),
         ("encoder",), write("encoder/config.json", "[1, 2]")),
    Case("run-no-model", run_command, ["{ws}/nothing", *RUN_TEXT], 1, ("nothing", "nsn-export first"), ()),
    Case("run-rank-zero", run_command, ["{ws}/encoder", "--ranks", "0", *RUN_TEXT], 1, ("[1, 16]",), ("encoder",)),
    Case("run-ranks-empty", run_command, ["{ws}/encoder", "--ranks", ",,", *RUN_TEXT], 2, ("names no rank",),
         ("encoder",)),
    Case("verify-truncated-graph", verify_command, VERIFY, 1, ("model.onnx", "re-export"), ("export", "ckpt"),
         lambda ws: truncate(ws / "export" / "model.onnx")),
    Case("verify-random-graph", verify_command, VERIFY, 1, ("model.onnx", "re-export"), ("export", "ckpt"),
         write("export/model.onnx", np.random.default_rng(2).bytes(5000))),
    Case("verify-missing-weights", verify_command, VERIFY, 1, ("model.onnx_data", "missing"), ("export", "ckpt"),
         lambda ws: (ws / "export" / "model.onnx_data").unlink()),
    Case("verify-random-weights", verify_command, VERIFY, 1, ("NaN or inf", "re-export"), ("export", "ckpt"),
         lambda ws: (ws / "export" / "model.onnx_data").write_bytes(
             np.full((ws / "export" / "model.onnx_data").stat().st_size // 4, np.nan, np.float32).tobytes())),
    Case("verify-no-ranks", verify_command, ["{ws}/export", "--model", "{ws}/ckpt", "--ranks", ",,,"], 2,
         ("names no rank",), ("export", "ckpt")),
    # ---- outputs may not destroy inputs or foreign directories -----------------------------------
    Case("export-over-its-checkpoint", export_command, ["--model", "{ws}/ckpt", "--output", "{ws}/ckpt",
                                                       "--overwrite"], 1, ("is the input", "ckpt"), ("ckpt",)),
    Case("export-inside-its-checkpoint", export_command, ["--model", "{ws}/ckpt", "--output", "{ws}/ckpt/onnx"],
         1, ("is inside the input",), ("ckpt",)),
    Case("export-over-a-parent", export_command, ["--model", "{ws}/ckpt", "--output", "{ws}", "--overwrite"], 1,
         ("contains the input",), ("ckpt",)),
    Case("export-over-foreign-dir", export_command, ["--model", "{ws}/ckpt", "--output", "{ws}/mine",
                                                    "--overwrite", "--no-verify"], 1,
         ("not written by nsn-export", "nsn_output.json"), ("ckpt",), foreign_dir),
    Case("export-over-a-file", export_command, ["--model", "{ws}/ckpt", "--output", "{ws}/notes.txt",
                                               "--overwrite"], 1, ("not written by nsn-export",), ("ckpt",),
         write("notes.txt", "keep me")),
    Case("export-under-a-file", export_command, ["--model", "{ws}/ckpt", "--output", "{ws}/notes.txt/out",
                                                "--no-verify"], 1, ("notes.txt", "check the path"), ("ckpt",),
         write("notes.txt", "keep me")),
    Case("export-exists-no-overwrite", export_command, ["--model", "{ws}/ckpt", "--output", "{ws}/export"], 1,
         ("already exists", "--overwrite"), ("ckpt", "export")),
    Case("adapt-over-its-source", adapt_command, ["{ws}/hf", "--output", "{ws}/hf", "--overwrite"], 1,
         ("is the input",), ("hf",)),
    Case("train-over-its-data", train_command, ["--model", "{ws}/ckpt", "--data", "{ws}/d/data.txt", "--output",
                                               "{ws}/d", "--steps", "1"], 1, ("contains the input",), ("ckpt",),
         write("d/data.txt", "w1 w2\n")),
    # ---- options checked before any model is loaded ----------------------------------------------
    Case("export-opset-too-new", export_command, ["--model", "{ws}/ckpt", "--opset", "24", "--output", "{ws}/o"], 1,
         ("opset 24", "[14, 23]", "--opset 17"), ("ckpt",), output="o"),
    Case("export-opset-too-old", export_command, ["--model", "{ws}/ckpt", "--opset", "9", "--output", "{ws}/o"], 1,
         ("opset 9", "[14, "), ("ckpt",), output="o"),
    Case("adapt-max-rank-above-one", adapt_command, ["{ws}/hf", "--output", "{ws}/o", "--max-rank", "1.5"], 2,
         ("(0, 1]",), ("hf",), output="o"),
    Case("adapt-max-rank-zero", adapt_command, ["{ws}/hf", "--output", "{ws}/o", "--max-rank", "0"], 2,
         ("int >= 1",), ("hf",), output="o"),
    Case("adapt-bad-config", adapt_command, ["{ws}/hf", "--output", "{ws}/o"], 1, ("config.json", "not valid JSON"),
         ("hf",), write("hf/config.json", "{oops"), output="o"),
    Case("train-zero-steps", train_command, ["--model", "{ws}/ckpt", "--data", "{ws}/d.txt", "--output", "{ws}/t",
                                            "--steps", "0"], 2, ("--steps", "0 is not in the range x>=1"), ("ckpt",),
         write("d.txt", "w1 w2\n"), output="t"),
    Case("run-zero-temperature", run_command, ["{ws}/encoder", "--temperature", "0", *RUN_TEXT], 2,
         ("--temperature", "x>0"), ("encoder",)),
    Case("run-no-prompt-nor-text", run_command, ["{ws}/encoder"], 2, ("exactly one of --prompt", "--text"),
         ("encoder",)),
    Case("bench-from-json-not-json", bench_command, ["--from-json", "{ws}/r.json"], 1, ("r.json", "not valid JSON"),
         (), write("r.json", "{")),
    Case("bench-from-json-not-a-report", bench_command, ["--from-json", "{ws}/r.json"], 1,
         ("r.json", "not an nsn-bench report"), (), write("r.json", '{"rows": []}')),
    Case("bench-zero-threads", bench_command, ["--threads", "0"], 2, ("--threads",), ()),
    Case("quickstart-no-ranks", quickstart_command, ["--ranks", ",", "--output", "{ws}/q"], 2, ("names no rank",), (),
         output="q"),
    Case("quickstart-unknown-init", quickstart_command, ["--init", "random", "--output", "{ws}/q"], 2,
         ("--init", "'random' is not one of", "'data-aware', 'svd'"), (), output="q"),
    Case("quickstart-init-with-a-checkpoint", quickstart_command,
         ["--model", "{ws}/ckpt", "--init", "svd", "--output", "{ws}/q"], 2,
         ("--init svd", "ckpt", "already an NSN checkpoint", "drop --init"), ("ckpt",), output="q"),
    Case("quickstart-zero-calibration-tokens", quickstart_command, ["--calibration-tokens", "0", "--output", "{ws}/q"],
         2, ("--calibration-tokens", "0 is not in the range x>=1"), (), output="q"),
    # ---- nsn-trt (TensorRT is not installed here: build and run say so) ------------------------
    Case("trt-plan-gap", trt_command, ["plan", "{ws}/export", "--profiles", "1-4,6-16"], 1,
         ("a gap at rank 5", "[1, 16]"), ("export",)),
    Case("trt-plan-too-many-ranges", trt_command, ["plan", "{ws}/export", "--profiles", "17"], 1,
         ("--profiles 17", "[1, 16]"), ("export",)),
    Case("trt-plan-opt-seq-above-max", trt_command, ["plan", "{ws}/export", "--opt-seq", "900"], 1,
         ("--opt-seq 900", "--max-seq 512"), ("export",)),
    Case("trt-plan-no-export", trt_command, ["plan", "{ws}/nothing"], 1, ("nothing", "model.onnx"), ()),
    Case("trt-check-mask-export", trt_command, ["check", "{ws}/mask"], 1, ("flows into data", "--rank-mode slice"),
         ("mask",)),
    Case("trt-check-old-tensorrt", trt_command, ["check", "{ws}/export", "--trt-version", "8.6"], 1,
         ("'8.6' is not supported", "10.x"), ("export",)),
    Case("trt-check-weights-outside", trt_command, ["check", "{ws}/export"], 1, ("outside the model directory",),
         ("export",), lambda ws: point_weight(ws / "export", "../elsewhere.bin")),
    Case("trt-build-over-its-export", trt_command, ["build", "{ws}/export", "--output", "{ws}/export",
                                                    "--overwrite"], 1, ("is the input",), ("export",)),
    Case("trt-build-bad-opt-level", trt_command, ["build", "{ws}/export", "--output", "{ws}/e", "--opt-level", "9"],
         2, ("--opt-level", "0<=x<=5"), ("export",)),
    Case("trt-build-without-tensorrt", trt_command, ["build", "{ws}/export", "--output", "{ws}/e"], 1,
         ("TensorRT", "JetPack"), ("export",), output="e"),
    Case("trt-build-mask-export", trt_command, ["build", "{ws}/mask", "--output", "{ws}/e", "--profiles", "1"], 1,
         ("would not build", "--rank-mode slice"), ("mask",), output="e"),
    Case("trt-inspect-not-an-engine", trt_command, ["inspect", "{ws}/export"], 1, ("no engine.json",), ("export",)),
    Case("trt-inspect-bad-manifest", trt_command, ["inspect", "{ws}/engine"], 1, ("engine.json", "not valid JSON"),
         (), write("engine/engine.json", "{")),
    Case("trt-run-not-an-engine", trt_command, ["run", "{ws}/export", "--prompt", "w1"], 1, ("no engine.json",),
         ("export",)),
    # ---- nsn-governor --------------------------------------------------------------------------
    Case("governor-simulate-no-scenario", governor_command, ["simulate", "{ws}/none.toml"], 1,
         ("none.toml", "no such scenario"), ()),
    Case("governor-simulate-bad-toml", governor_command, ["simulate", "{ws}/s.toml"], 1, ("s.toml", "not valid TOML"),
         (), write("s.toml", "duration_s = = 3")),
    Case("governor-simulate-unknown-preset", governor_command, ["simulate", "{ws}/s.toml"], 1,
         ("preset = 'nano-9000'", "orin-nx-25w"), (), write("s.toml", 'duration_s = 60\n[device]\npreset = "nano-9000"')),
    Case("governor-simulate-no-duration", governor_command, ["simulate", "{ws}/s.toml"], 1, ("duration_s",), (),
         write("s.toml", "[device]\n")),
    Case("governor-policy-unknown-key", governor_command, ["simulate", "{ws}/s.toml", "--policy", "{ws}/p.toml"], 1,
         ("p.toml", "[thermal] has unknown key(s) ['target']"), (),
         steps(write("s.toml", "duration_s = 60"), write("p.toml", "[thermal]\ntarget = 80"))),
    Case("governor-policy-target-above-emergency", governor_command,
         ["simulate", "{ws}/s.toml", "--policy", "{ws}/p.toml"], 1, ("target_c must be below emergency_c",), (),
         steps(write("s.toml", "duration_s = 60"), write("p.toml", "[thermal]\ntarget_c = 90\nemergency_c = 80"))),
    Case("governor-policy-missing", governor_command, ["simulate", "{ws}/s.toml", "--policy", "{ws}/none.toml"], 1,
         ("none.toml", "no such policy file"), (), write("s.toml", "duration_s = 60")),
    Case("governor-run-no-model", governor_command, ["run", "--model", "{ws}/nothing", "--duration-s", "0"], 1,
         ("nothing", "nsn-export first"), ()),
    Case("governor-run-bad-period", governor_command, ["run", "--model", "{ws}/encoder", "--period-s", "0"], 2,
         ("--period-s",), ("encoder",)),
    # ---- nsn-calibrate ---------------------------------------------------------------------------
    Case("calibrate-no-export", calibrate_command, ["{ws}/nothing", "--output", "{ws}/f.json"], 1,
         ("nothing", "nsn-export first"), (), output="f.json"),
    Case("calibrate-rank-out-of-range", calibrate_command, ["{ws}/encoder", "--ranks", "0,8", "--output",
                                                            "{ws}/f.json"], 1, ("--ranks", "[1, 16]"), ("encoder",),
         output="f.json"),
    Case("calibrate-no-ranks", calibrate_command, ["{ws}/encoder", "--ranks", ",", "--output", "{ws}/f.json"], 2,
         ("names no rank",), ("encoder",), output="f.json"),
    Case("calibrate-empty-data", calibrate_command, ["{ws}/encoder", "--data", "{ws}/e.txt", "--output",
                                                     "{ws}/f.json"], 1, ("e.txt", "no examples"), ("encoder",),
         write("e.txt", "\n"), output="f.json"),
    Case("calibrate-over-the-model", calibrate_command, ["{ws}/encoder", "--ranks", "4", "--output",
                                                         "{ws}/encoder/model.onnx"], 1,
         ("model.onnx exists and is not a frontier.json",), ("encoder",)),
    Case("calibrate-not-an-engine", calibrate_command, ["{ws}/encoder", "--engine", "{ws}/encoder", "--output",
                                                        "{ws}/f.json"], 1, ("no engine.json",), ("encoder",),
         output="f.json"),
    Case("calibrate-zero-budget", calibrate_command, ["{ws}/encoder", "--budget-s", "0"], 2, ("--budget-s",),
         ("encoder",)),
    Case("trt-plan-frontier-of-another-model", trt_command, ["plan", "{ws}/export", "--profiles", "{ws}/f.json"], 1,
         ("f.json", "another model"), ("export",),
         write("f.json", json.dumps({"format_version": 1, "model": {"graph_sha256": "0" * 64}, "levels": [1],
                                     "profiles": "1-16", "rows": [{"rank": 1, "flops_fraction": 0.1, "quality": 1,
                                                                   "latency_ms": {"decode": {"median": 1}}}]}))),
    Case("adapt-empty-calibration-data", adapt_command, ["{ws}/hf", "--output", "{ws}/o", "--calibration-data",
                                                         "{ws}/c.txt"], 1, ("c.txt", "no examples"), ("hf",),
         write("c.txt", "\n\n"), output="o"),
    Case("adapt-zero-calibration-tokens", adapt_command, ["{ws}/hf", "--output", "{ws}/o", "--calibration-tokens",
                                                          "0"], 2, ("--calibration-tokens",), ("hf",), output="o"),
    Case("eval-nothing-to-evaluate", eval_command, ["--model", "{ws}/ckpt"], 2, ("--data FILE, --retrieval",),
         ("ckpt",)),
    Case("eval-retrieval-on-a-decoder", eval_command, ["--model", "{ws}/ckpt", "--retrieval"], 2,
         ("needs an encoder",), ("ckpt",)),
    # ---- data files ------------------------------------------------------------------------------
    Case("eval-empty-data", eval_command, ["--model", "{ws}/ckpt", "--data", "{ws}/empty.txt"], 1,
         ("empty.txt", "no examples"), ("ckpt",), write("empty.txt", "")),
    Case("eval-blank-data", eval_command, ["--model", "{ws}/ckpt", "--data", "{ws}/blank.jsonl"], 1,
         ("blank.jsonl", "no examples"), ("ckpt",), write("blank.jsonl", "\n  \n\t\n")),
    Case("eval-not-utf8", eval_command, ["--model", "{ws}/ckpt", "--data", "{ws}/latin1.txt"], 1,
         ("latin1.txt", "not UTF-8"), ("ckpt",), write("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))),
    Case("eval-no-ranks", eval_command, ["--model", "{ws}/ckpt", "--data", "{ws}/d.txt", "--ranks", ","], 2,
         ("names no rank",), ("ckpt",), write("d.txt", "w1 w2\n")),
    Case("train-empty-data", train_command, ["--model", "{ws}/ckpt", "--data", "{ws}/empty.txt", "--output",
                                            "{ws}/t"], 1, ("empty.txt", "no examples"), ("ckpt",),
         write("empty.txt", " \n"), output="t"),
    Case("eval-config-is-a-list", eval_command, ["--model", "{ws}/ckpt", "--data", "{ws}/d.txt"], 1,
         ("nsn_config.json", "expected an object"), ("ckpt",),
         steps(write("d.txt", "w1 w2\n"), write("ckpt/nsn_config.json", "[]"))),
    Case("eval-checkpoint-symlink-outside", eval_command, ["--model", "{ws}/ckpt", "--data", "{ws}/d.txt"], 1,
         ("nsn_config.json", "outside the model directory"), ("ckpt",),
         steps(write("d.txt", "w1 w2\n"), write("elsewhere.json", "{}"),
               lambda ws: (ws / "ckpt" / "nsn_config.json").unlink(),
               lambda ws: (ws / "ckpt" / "nsn_config.json").symlink_to(ws / "elsewhere.json"))),
    Case("adapt-tokenizer-symlink-outside", adapt_command, ["{ws}/hf", "--output", "{ws}/o"], 1,
         ("tokenizer.json", "outside the model directory"), ("hf",),
         steps(write("elsewhere.json", "{}"), lambda ws: (ws / "hf" / "tokenizer.json").unlink(),
               lambda ws: (ws / "hf" / "tokenizer.json").symlink_to(ws / "elsewhere.json")), output="o"),
    Case("eval-bad-config-json", eval_command, ["--model", "{ws}/ckpt", "--data", "{ws}/d.txt"], 1,
         ("config.json", "not valid JSON"), ("ckpt",), steps(write("d.txt", "w1 w2\n"), write("ckpt/config.json", "{"))),
]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, size and modification time (symlinks not followed)."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else "other"
        state[str(path.relative_to(root))] = (kind, info.st_size if kind == "file" else 0,
                                              info.st_mtime_ns if kind == "file" else 0)
    return state


def timeout(seconds: int):
    def fire(signum, frame):
        raise TimeoutError(f"the command did not finish within {seconds} s (blocked on a read?)")
    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, sources, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in case.copy:
        shutil.copytree(sources[name], ws / name, symlinks=True)
    if case.setup:
        case.setup(ws)
    before = snapshot(ws)
    args = [a.replace("{ws}", str(ws)) for a in case.args]
    timeout(60)
    try:
        result = CliRunner().invoke(case.command, args)
    finally:
        signal.alarm(0)
    assert not isinstance(result.exception, TimeoutError), result.exception
    assert result.exit_code == case.code, result.output
    output = " ".join(result.output.split())  # messages may wrap
    for word in case.words:
        assert word in output, f"{word!r} not in {output!r}"
    if case.code != 0:
        assert "Traceback" not in result.output
    after = snapshot(ws)
    if case.output:
        after = {k: v for k, v in after.items() if not (k == case.output or k.startswith(case.output + "/"))}
        before = {k: v for k, v in before.items() if not (k == case.output or k.startswith(case.output + "/"))}
    assert after == before, "a file outside the output changed"
    assert not [p for p in tmp_path.rglob("*") if SCRATCH in p.name], "a scratch directory was left behind"


# ---- the library: bad input to NSNSession ------------------------------------------------------------
def test_embed_of_nothing_is_an_empty_matrix(sources):
    from deploy import NSNSession

    assert NSNSession(sources["encoder"]).embed([]).shape == (0, 32)


def test_embed_reports_truncation_and_keeps_order(sources):
    from deploy import NSNSession, TruncationWarning

    session = NSNSession(sources["encoder"])
    short = tiny_text(5, 4)
    long_text = " ".join(["w7"] * 1000)
    with pytest.warns(TruncationWarning, match="1 of 6 text.* longer than 128 tokens"):
        mixed = session.embed(short[:2] + [long_text] + short[2:], batch_size=2)
    alone = session.embed(short)
    np.testing.assert_allclose(np.delete(mixed, 2, axis=0), alone, atol=1e-5)


def test_embed_peak_memory_does_not_grow_with_the_number_of_texts(sources):
    """Peak RSS embedding 4000 texts of ~100 tokens stays within 100 MiB of embedding 40; one batch
    of 4000 would need about 1 GiB of attention scores alone."""
    script = """
import resource, sys
from deploy import NSNSession
count = int(sys.argv[2])
session = NSNSession(sys.argv[1])
texts = [" ".join(f"w{(i + j) % 90}" for j in range(100)) for i in range(count)]
assert session.embed(texts).shape == (count, 32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

    def peak_kib(count: int) -> int:
        out = subprocess.run([sys.executable, "-c", script, str(sources["encoder"]), str(count)], check=True,
                             capture_output=True, text=True, timeout=600)
        return int(out.stdout.split()[-1])

    few, many = peak_kib(40), peak_kib(4000)
    assert many - few < 100 * 1024, (few, many)


# ---- interrupted writes --------------------------------------------------------------------------------
EXPORT_SCRIPT = """
import sys
from nsn_export.cli import export_command
export_command(["--model", sys.argv[1], "--output", sys.argv[2]])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_export_leaves_no_scratch_behind(sources, tmp_path, signum):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sources["ckpt"], ckpt)
    process = subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, str(ckpt), str(tmp_path / "out")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parent)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.nsn-tmp-*/model.onnx*")) and process.poll() is None:
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signum)
    process.wait(timeout=120)
    assert process.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_scratch_of_a_killed_run_is_removed_by_the_next_run(sources, tmp_path):
    from deploy.atomic import atomic_directory

    dead_pid = 2**22 + 12345  # above the kernel's pid_max: never alive
    stale = tmp_path / f".out.nsn-tmp-new-{dead_pid}-abc"
    stale.mkdir()
    (stale / "model.onnx_data").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.nsn-tmp-new-{os.getpid()}-def"  # a concurrent run's: kept
    live.mkdir()
    atomic_directory(tmp_path / "out", lambda tmp: (tmp / "f").write_text("new"))
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "f").read_text() == "new"


def test_an_output_lost_between_the_two_renames_is_restored(tmp_path):
    from deploy.atomic import OUTPUT_MARKER, atomic_directory

    dead_pid = 2**22 + 12345
    old = tmp_path / f".out.nsn-tmp-old-{dead_pid}-abc"
    (old / "out").mkdir(parents=True)
    (old / "out" / OUTPUT_MARKER).write_text(json.dumps({"written_by": "nsn-export"}))
    (old / "out" / "weights").write_text("previous")

    def fail(tmp):
        raise ValueError("the new output could not be made")

    with pytest.raises(ValueError):
        atomic_directory(tmp_path / "out", fail)
    assert (tmp_path / "out" / "weights").read_text() == "previous" and not old.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_destination_is_one_line_and_leaves_nothing(sources, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sources["ckpt"], ckpt)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = CliRunner().invoke(export_command, ["--model", str(ckpt), "--output", str(locked / "o")])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1 and "Permission denied" in result.output and "Traceback" not in result.output
    assert list(locked.iterdir()) == []
