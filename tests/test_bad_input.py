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

from calibration.cli import bench_command, calibrate_command, eval_command, quickstart_command
from deploy.cli import run_command
from deploy.governor.cli import governor_command
from deploy.serve.cli import serve_command
from deploy.tensorrt.cli import trt_command
from nsn_export.cli import adapt_command, export_command, train_command, verify_command
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
    Case("run-rank-zero", run_command, ["{ws}/encoder", "--ranks", "0", *RUN_TEXT], 2, ("[1, 16]",), ("encoder",)),
    Case("run-rank-above-max", run_command, ["{ws}/encoder", "--ranks", "385", *RUN_TEXT], 2,
         ("--ranks must be in [1, 16], got 385",), ("encoder",)),
    Case("run-rank-negative", run_command, ["{ws}/encoder", "--ranks", "-5", *RUN_TEXT], 2,
         ("--ranks must be in [1, 16], got -5",), ("encoder",)),
    Case("run-nan-temperature", run_command, ["{ws}/encoder", "--temperature", "nan", *RUN_TEXT], 2,
         ("--temperature", "not a finite number"), ("encoder",)),
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
                                            "--steps", "0"], 2, ("--steps", "0 is not in the range 1<=x<=10000000"), ("ckpt",),
         write("d.txt", "w1 w2\n"), output="t"),
    Case("run-zero-temperature", run_command, ["{ws}/encoder", "--temperature", "0", *RUN_TEXT], 2,
         ("--temperature", "1e-05<=x<=100"), ("encoder",)),
    Case("run-speculative-not-below-the-rank", run_command, ["{ws}/export", *RUN_PROMPT, "--ranks", "8",
                                                             "--speculative", "8"], 2,
         ("--speculative", "8 is not below the rank it drafts for (8)"), ("export",)),
    Case("run-speculative-on-an-encoder", run_command, ["{ws}/encoder", "--speculative", "4", *RUN_TEXT], 2,
         ("--speculative drafts tokens", "--prompt or --chat"), ("encoder",)),
    Case("run-speculative-zero", run_command, ["{ws}/export", *RUN_PROMPT, "--speculative", "0"], 2,
         ("--speculative", "0 is not in the range x>=1"), ("export",)),
    Case("run-draft-tokens-above-sixteen", run_command, ["{ws}/export", *RUN_PROMPT, "--speculative", "4",
                                                         "--draft-tokens", "17"], 2,
         ("--draft-tokens", "1<=x<=16"), ("export",)),
    Case("run-no-prompt-nor-text", run_command, ["{ws}/encoder"], 2, ("exactly one of --prompt", "--text"),
         ("encoder",)),
    Case("bench-from-json-not-json", bench_command, ["--from-json", "{ws}/r.json"], 1, ("r.json", "not valid JSON"),
         (), write("r.json", "{")),
    Case("bench-from-json-not-a-report", bench_command, ["--from-json", "{ws}/r.json"], 1,
         ("r.json", "not an nsn-bench report"), (), write("r.json", '{"rows": []}')),
    Case("bench-zero-threads", bench_command, ["--threads", "0"], 2, ("--threads",), ()),
    Case("bench-model-without-dense", bench_command, ["--model", "{ws}/export"], 2, ("--model and --dense go "
                                                                                      "together", "nsn-export --dense"),
         ("export",)),
    Case("bench-gguf-without-model", bench_command, ["--gguf", "{ws}/m.gguf"], 2, ("--gguf needs --model",), (),
         write("m.gguf", "GGUF")),
    Case("bench-gguf-missing", bench_command, ["--model", "{ws}/export", "--dense", "{ws}/export", "--gguf",
                                               "{ws}/none.gguf"], 2, ("none.gguf is not a file", "--gguf"), ("export",)),
    Case("bench-rank-above-the-model", bench_command, ["--model", "{ws}/export", "--dense", "{ws}/export", "--ranks",
                                                       "17"], 2, ("--ranks must be in [1, 16], got 17",), ("export",)),
    Case("bench-mask-mode-has-no-levels", bench_command, ["--model", "{ws}/mask", "--dense", "{ws}/export"], 1,
         ("no levels to compare", "--rank-mode slice"), ("mask", "export")),
    Case("bench-speculative-with-dense", bench_command, ["--model", "{ws}/export", "--dense", "{ws}/export",
                                                        "--speculative", "4"], 2,
         ("--speculative measures one export", "no --dense"), ("export",)),
    Case("bench-speculative-at-the-top-rank", bench_command, ["--model", "{ws}/export", "--speculative", "16"], 2,
         ("--speculative must be in [1, 15], got 16",), ("export",)),
    Case("bench-speculative-on-an-encoder", bench_command, ["--model", "{ws}/encoder", "--speculative", "4"], 1,
         ("is an encoder", "drafts tokens"), ("encoder",)),
    Case("bench-two-fp32-models", bench_command, ["--model", "{ws}/export", "--model", "{ws}/export", "--dense",
                                                 "{ws}/export"], 1, ("two exports with fp32 weights", "one of each"),
         ("export",)),
    Case("bench-models-of-two-models", bench_command, ["--model", "{ws}/export", "--model", "{ws}/encoder",
                                                       "--dense", "{ws}/export"], 1, ("not exports of one model",),
         ("export", "encoder")),
    Case("export-int8-in-mask-mode", export_command, ["--model", "{ws}/ckpt", "--weights", "int8", "--rank-mode", "mask",
                                                      "--output", "{ws}/o"], 1, ("need slice mode", "--rank-mode slice"),
         ("ckpt",), output="o"),
    Case("export-dense-of-a-checkpoint", export_command, ["--model", "{ws}/ckpt", "--dense", "--output", "{ws}/o"], 2,
         ("is an NSN checkpoint", "--dense exports the plain model"), ("ckpt",), output="o"),
    Case("bench-threads-above-the-cores", bench_command, ["--threads", "100000"], 2,
         ("--threads", "above this machine's"), ()),
    Case("bench-astronomical-decode-runs", bench_command, ["--decode-runs", str(10**9)], 2,
         ("--decode-runs", "1<=x<=100000"), ()),
    # ---- every count has an upper bound; sampling options name themselves ----------------------------------
    Case("run-subnormal-temperature", run_command, ["{ws}/export", *RUN_PROMPT, "--sample", "--temperature",
                                                    "5e-324"], 2, ("--temperature", "1e-05<=x<=100"), ("export",)),
    Case("run-negative-seed", run_command, ["{ws}/export", *RUN_PROMPT, "--sample", "--seed", "-1"], 2,
         ("--seed", "-1 is not in the range 0<=x<="), ("export",)),
    Case("run-astronomical-max-new-tokens", run_command, ["{ws}/export", "--prompt", "w1", "--max-new-tokens",
                                                          str(10**9)], 2, ("--max-new-tokens", "1<=x<=100000"),
         ("export",)),
    Case("run-past-the-context", run_command, ["{ws}/export", "--prompt", "w1 w2", "--max-new-tokens", "200"], 2,
         ("the prompt is 2 tokens and --max-new-tokens is 200", "context of 128", "shorten the prompt"), ("export",)),
    Case("run-prompt-longer-than-the-context", run_command, ["{ws}/export", "--prompt", " ".join(["w1"] * 20_000)],
         2, ("the prompt is 20000 tokens", "context of 128"), ("export",)),
    Case("run-empty-text", run_command, ["{ws}/encoder", "--text", ""], 2, ("--text '' is empty",), ("encoder",)),
    Case("run-empty-prompt", run_command, ["{ws}/export", "--prompt", ""], 2, ("--prompt '' is empty",), ("export",)),
    Case("run-bogus-provider", run_command, ["{ws}/encoder", "--provider", "BogusExecutionProvider", *RUN_TEXT], 2,
         ("--provider", "BogusExecutionProvider is not available", "CPUExecutionProvider", "--provider-fallback"),
         ("encoder",)),
    Case("run-threads-above-the-cores", run_command, ["{ws}/encoder", "--threads", "100000", *RUN_TEXT], 2,
         ("--threads", "above this machine's"), ("encoder",)),
    Case("calibrate-astronomical-repeats", calibrate_command, ["{ws}/encoder", "--repeats", str(10**9)], 2,
         ("--repeats", "1<=x<=1000"), ("encoder",)),
    Case("calibrate-prompt-past-the-context", calibrate_command, ["{ws}/export", "--ranks", "4", "--texts", "4",
                                                                  "--prompt-tokens", "5000", "--output", "{ws}/f.json"],
         2, ("--prompt-tokens 5000 is above the model's context of 128",), ("export",), output="f.json"),
    Case("calibrate-context-past-the-context", calibrate_command, ["{ws}/export", "--ranks", "4", "--texts", "4",
                                                                   "--context-tokens", "129", "--output",
                                                                   "{ws}/f.json"],
         2, ("--context-tokens 129 is above the model's context of 128",), ("export",), output="f.json"),
    Case("governor-bench-astronomical-ticks", governor_command, ["bench", "--ticks", str(10**12)], 2,
         ("--ticks", "1<=x<=10000000"), ()),
    Case("quickstart-no-ranks", quickstart_command, ["--ranks", ",", "--output", "{ws}/q"], 2, ("names no rank",), (),
         output="q"),
    Case("quickstart-unknown-init", quickstart_command, ["--init", "random", "--output", "{ws}/q"], 2,
         ("--init", "'random' is not one of", "'data-aware', 'svd'"), (), output="q"),
    Case("quickstart-init-with-a-checkpoint", quickstart_command,
         ["--model", "{ws}/ckpt", "--init", "svd", "--output", "{ws}/q"], 2,
         ("--init svd", "ckpt", "already an NSN checkpoint", "drop --init"), ("ckpt",), output="q"),
    Case("quickstart-zero-calibration-tokens", quickstart_command, ["--calibration-tokens", "0", "--output", "{ws}/q"],
         2, ("--calibration-tokens", "0 is not in the range 1<=x<=100000000"), (), output="q"),
    # ---- nsn-trt (TensorRT is not installed here: build and run say so) ------------------------
    Case("trt-plan-gap", trt_command, ["plan", "{ws}/export", "--profiles", "1-4,6-16"], 2,
         ("a gap at rank 5", "[1, 16]"), ("export",)),
    Case("trt-plan-too-many-ranges", trt_command, ["plan", "{ws}/export", "--profiles", "17"], 2,
         ("--profiles 17", "[1, 16]"), ("export",)),
    Case("trt-plan-opt-seq-above-max", trt_command, ["plan", "{ws}/export", "--opt-seq", "900"], 2,
         ("--opt-seq 900", "--max-seq 512"), ("export",)),
    Case("trt-plan-no-export", trt_command, ["plan", "{ws}/nothing"], 1, ("nothing", "model.onnx"), ()),
    Case("trt-plan-too-many-draft-tokens", trt_command, ["plan", "{ws}/export", "--draft-tokens", "17"], 2,
         ("--draft-tokens", "17 is not in the range 0<=x<=16"), ("export",)),
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
         ("p.toml", "unknown key 'thermal.target'", "did you mean 'target_c'?"), (),
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
                                                            "{ws}/f.json"], 2, ("--ranks", "[1, 16]"), ("encoder",),
         output="f.json"),
    Case("calibrate-no-ranks", calibrate_command, ["{ws}/encoder", "--ranks", ",", "--output", "{ws}/f.json"], 2,
         ("names no rank",), ("encoder",), output="f.json"),
    Case("calibrate-empty-data", calibrate_command, ["{ws}/encoder", "--data", "{ws}/e.txt", "--output",
                                                     "{ws}/f.json"], 1, ("e.txt", "no examples"), ("encoder",),
         write("e.txt", "\n"), output="f.json"),
    Case("calibrate-over-the-model", calibrate_command, ["{ws}/encoder", "--ranks", "4", "--output",
                                                         "{ws}/encoder/model.onnx"], 1,
         ("--output", "model.onnx is inside the input", "encoder"), ("encoder",)),
    Case("calibrate-not-an-engine", calibrate_command, ["{ws}/encoder", "--engine", "{ws}/encoder", "--output",
                                                        "{ws}/f.json"], 1, ("no engine.json",), ("encoder",),
         output="f.json"),
    Case("calibrate-zero-budget", calibrate_command, ["{ws}/encoder", "--budget-s", "0"], 2, ("--budget-s",),
         ("encoder",)),
    Case("trt-plan-frontier-of-another-model", trt_command, ["plan", "{ws}/export", "--profiles", "{ws}/f.json"], 1,
         ("f.json", "another model"), ("export",),
         write("f.json", json.dumps({"format_version": 1, "model": {"graph_sha256": "0" * 64}, "levels": [1],
                                     "profiles": "1-16", "rows": [{"rank": 1, "flops_fraction": 0.1, "quality": 1,
                                                                   "latency_ms": {"decode": {"median": 1, "p90": 1}}}]}))),
    Case("adapt-empty-calibration-data", adapt_command, ["{ws}/hf", "--output", "{ws}/o", "--calibration-data",
                                                         "{ws}/c.txt"], 1, ("c.txt", "no examples"), ("hf",),
         write("c.txt", "\n\n"), output="o"),
    Case("adapt-fisher-without-calibration-data", adapt_command, ["{ws}/hf", "--output", "{ws}/o", "--fisher"], 2,
         ("--fisher", "--calibration-data FILE"), ("hf",), output="o"),
    Case("adapt-zero-calibration-tokens", adapt_command, ["{ws}/hf", "--output", "{ws}/o", "--calibration-tokens",
                                                          "0"], 2, ("--calibration-tokens",), ("hf",), output="o"),
    Case("eval-nothing-to-evaluate", eval_command, ["--model", "{ws}/ckpt"], 2, ("--data FILE, --retrieval, --llm",),
         ("ckpt",)),
    Case("eval-teacher-without-llm", eval_command, ["--model", "{ws}/ckpt", "--retrieval", "--teacher", "{ws}/hf"],
         2, ("--teacher is the reference of --llm's agreement",), ("ckpt", "hf")),
    # ---- GGUF files and chat ---------------------------------------------------------------------------
    Case("adapt-missing-gguf", adapt_command, ["{ws}/none.gguf", "--output", "{ws}/o"], 1,
         ("none.gguf", "no such GGUF file"), (), output="o"),
    Case("adapt-gguf-that-is-not-one", adapt_command, ["{ws}/fake.gguf", "--output", "{ws}/o"], 1,
         ("fake.gguf", "not a readable GGUF file"), (), write("fake.gguf", b"GGUF" + b"\x00" * 64), output="o",
         env={"NSN_CACHE_DIR": "{ws}/cache"}),
    Case("run-chat-without-a-template", run_command, ["{ws}/export", "--chat", "hello"], 2,
         ("--chat", "has no chat template", "use --prompt"), ("export",)),
    Case("run-empty-chat", run_command, ["{ws}/export", "--chat", ""], 2, ("--chat '' is empty",), ("export",)),
    Case("run-chat-and-prompt", run_command, ["{ws}/export", "--chat", "hi", "--prompt", "w1"], 2,
         ("exactly one of --prompt or --chat",), ("export",)),
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



# ---- helpers of the hardening cases: files laid out as our commands read them ------------------------------------
def fifo(relative: str) -> Callable[[Path], None]:
    """A FIFO where a file should be: a reader that opens it blocking would hang for ever."""
    def setup(ws: Path) -> None:
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(ws / relative)
    return setup


def no_trip_sysfs(ws: Path) -> None:
    """A sysfs tree with one thermal zone and no trip point (a laptop, a CI machine)."""
    zone = ws / "sys" / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("x86_pkg_temp\n")
    (zone / "temp").write_text("45000\n")


def frontier_file(change: dict) -> Callable[[Path], None]:
    """``f.json``: a valid frontier of ``ws/export`` (ranks 2, 8, 16) with ``change`` applied."""
    def setup(ws: Path) -> None:
        from deploy.frontier import graph_sha256

        rows = [{"rank": r, "flops_fraction": r / 16, "latency_ms": {"decode": {"median": r, "p90": r}},
                 "quality": r / 16} for r in (2, 8, 16)]
        data = {"format_version": 1, "model": {"graph_sha256": graph_sha256(ws / "export" / "model.onnx"),
                                               "nsn": {"max_rank": 16}},
                "rows": rows, "levels": [2, 8, 16], "profiles": "1-2,3-8,9-16", **change}
        (ws / "f.json").write_text(json.dumps(data))
    return setup


def engine_manifest(change: Callable[[dict], None] = lambda m: None, text: str | None = None):
    """``engine/engine.json`` as nsn-trt build writes it for ``ws/export`` (``change`` edits it), or ``text``."""
    def setup(ws: Path) -> None:
        from deploy.tensorrt.plan import ShapeBounds, plan_for_export

        (ws / "engine").mkdir()
        if text is not None:
            (ws / "engine" / "engine.json").write_text(text)
            return
        plan = plan_for_export(ws / "export", "2", ShapeBounds(max_seq=32, max_context=64, opt_seq=8, opt_context=16))
        graph = onnx.load(str(ws / "export" / "model.onnx"), load_external_data=False)
        manifest = {"format_version": 1, "tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7",
                    "plan": plan.to_dict(), "build": {}, "source": {},
                    "nsn": {p.key: p.value for p in graph.metadata_props}}
        change(manifest)
        (ws / "engine" / "engine.json").write_text(json.dumps(manifest))
    return setup


def scenario(text: str) -> Callable[[Path], None]:
    return write("s.toml", text)


SIM = ["simulate", "{ws}/s.toml"]
OK_SCENARIO = "duration_s = 60\n"
GOVERN = ["run", "--model", "{ws}/encoder", "--sysfs-root", "{ws}/sys", "--duration-s", "0.3", "--period-s", "0.1"]
CALIBRATE = ["{ws}/encoder", "--ranks", "4", "--repeats", "1", "--texts", "4", "--batch", "2"]
CASES += [
    # ---- every path a command writes goes through the one output check, before any work ------------
    Case("calibrate-plot-over-the-graph", calibrate_command, [*CALIBRATE, "--output", "{ws}/f.json", "--plot",
                                                              "{ws}/encoder/model.onnx"], 1,
         ("--plot", "model.onnx is inside the input", "encoder"), ("encoder",)),
    Case("calibrate-output-inside-the-export", calibrate_command, [*CALIBRATE, "--output",
                                                                   "{ws}/encoder/frontier.json"], 1,
         ("--output", "frontier.json is inside the input"), ("encoder",)),
    Case("calibrate-plot-is-the-output", calibrate_command, [*CALIBRATE, "--output", "{ws}/f.json", "--plot",
                                                             "{ws}/f.json"], 1,
         ("--plot", "f.json is the same file as --output"), ("encoder",)),
    Case("calibrate-output-is-a-directory", calibrate_command, [*CALIBRATE, "--output", "{ws}/out"], 1,
         ("--output", "out is a directory"), ("encoder",), lambda ws: (ws / "out").mkdir()),
    Case("governor-rank-file-over-the-graph", governor_command, [*GOVERN, "--rank-file", "{ws}/encoder/model.onnx"],
         1, ("--rank-file", "is inside the input"), ("encoder",), no_trip_sysfs),
    Case("governor-log-over-the-graph", governor_command, [*GOVERN, "--log", "{ws}/encoder/model.onnx"], 1,
         ("--log", "is inside the input"), ("encoder",), no_trip_sysfs),
    Case("governor-log-is-the-rank-file", governor_command, [*GOVERN, "--log", "{ws}/r", "--rank-file", "{ws}/r"], 1,
         ("--rank-file", "is the same file as --log"), ("encoder",), no_trip_sysfs),
    Case("simulate-plot-over-the-scenario", governor_command, [*SIM, "--plot", "{ws}/s.toml"], 1,
         ("--plot", "s.toml is the input"), (), scenario(OK_SCENARIO)),
    Case("simulate-plot-over-the-policy", governor_command, [*SIM, "--policy", "{ws}/p.toml", "--plot",
                                                             "{ws}/p.toml"], 1, ("--plot", "p.toml is the input"), (),
         steps(scenario(OK_SCENARIO), write("p.toml", ""))),
    # ---- the governor fails safe and starts anywhere ------------------------------------------------
    Case("governor-default-policy-without-trip-points", governor_command, GOVERN, 0,
         ("thermal control off", "no passive trip point", "target_c and emergency_c"), ("encoder",), no_trip_sysfs),
    Case("governor-sensors-say-why-thermal-is-off", governor_command, ["sensors", "--sysfs-root", "{ws}/sys"], 0,
         ("governor thermal control off", "no passive trip point"), (), no_trip_sysfs),
    Case("governor-frontier-levels-negative", governor_command, [*GOVERN[:2], "{ws}/export", *GOVERN[3:], "--policy",
                                                                 "{ws}/p.toml"], 1,
         ("f.json", "levels[0] = -5 must be an integer in [1,"), ("export",),
         steps(no_trip_sysfs, frontier_file({"levels": [-5, 0, 16]}), write("p.toml", '[levels]\nfrontier = "f.json"'))),
    Case("governor-frontier-levels-above-the-model", governor_command, [*GOVERN[:2], "{ws}/export", *GOVERN[3:],
                                                                        "--policy", "{ws}/p.toml"], 1,
         ("f.json", "levels", "within [1, 16]"), ("export",),
         steps(no_trip_sysfs, frontier_file({"levels": [2, 999]}), write("p.toml", '[levels]\nfrontier = "f.json"'))),
    Case("governor-safe-rank-above-the-model", governor_command, [*SIM, "--policy", "{ws}/p.toml"], 1,
         ("safe_rank = 99999 must be in [0, 448]",), (),
         steps(scenario(OK_SCENARIO), write("p.toml", "[levels]\nsafe_rank = 99999"))),
    Case("governor-policy-ranks-above-the-model", governor_command, [*SIM, "--policy", "{ws}/p.toml"], 1,
         ("ranks go to 99999", "maximum rank 448"), (),
         steps(scenario(OK_SCENARIO), write("p.toml", "[levels]\nranks = [8, 99999]"))),
    # ---- no hangs: FIFOs, NaN and unbounded durations -----------------------------------------------
    Case("governor-sensors-fifo-temp", governor_command, ["sensors", "--sysfs-root", "{ws}/sys"], 0,
         ("cpu-thermal", "unreadable"), (),
         steps(write("sys/sys/class/thermal/thermal_zone0/type", "cpu-thermal\n"),
               fifo("sys/sys/class/thermal/thermal_zone0/temp"))),
    Case("governor-sensors-fifo-type", governor_command, ["sensors", "--sysfs-root", "{ws}/sys"], 0,
         ("absent thermal zones",), (),
         steps(fifo("sys/sys/class/thermal/thermal_zone0/type"),
               write("sys/sys/class/thermal/thermal_zone0/temp", "40000\n"))),
    Case("governor-policy-fifo", governor_command, [*SIM, "--policy", "{ws}/p.toml"], 1,
         ("p.toml", "not a regular file"), (), steps(scenario(OK_SCENARIO), fifo("p.toml"))),
    Case("governor-scenario-fifo", governor_command, SIM, 1, ("s.toml", "not a regular file"), (), fifo("s.toml")),
    Case("governor-scenario-is-a-directory", governor_command, SIM, 1, ("s.toml", "is a directory"), (),
         lambda ws: (ws / "s.toml").mkdir()),
    Case("governor-run-nan-duration", governor_command, ["run", "--model", "{ws}/encoder", "--duration-s", "nan"], 2,
         ("--duration-s", "not a finite number"), ("encoder",)),
    Case("governor-run-infinite-duration", governor_command, ["run", "--model", "{ws}/encoder", "--duration-s",
                                                              "inf"], 2, ("--duration-s", "inf is not"),
         ("encoder",)),
    Case("governor-sysfs-root-missing", governor_command, ["sensors", "--sysfs-root", "{ws}/none"], 1,
         ("sysfs root", "none does not exist"), ()),
    Case("governor-sysfs-root-is-a-file", governor_command, ["sensors", "--sysfs-root", "{ws}/f"], 1,
         ("sysfs root", "is not a directory"), (), write("f", "x")),
    Case("calibrate-nan-budget", calibrate_command, ["{ws}/encoder", "--budget-s", "nan"], 2,
         ("--budget-s", "not a finite number"), ("encoder",)),
    Case("calibrate-data-is-a-directory", calibrate_command, [*CALIBRATE, "--data", "{ws}/d", "--output",
                                                              "{ws}/f.json"], 1, ("d is a directory",), ("encoder",),
         lambda ws: (ws / "d").mkdir(), output="f.json"),
    Case("calibrate-data-is-a-fifo", calibrate_command, [*CALIBRATE, "--data", "{ws}/d.txt", "--output",
                                                         "{ws}/f.json"], 1, ("d.txt", "not a regular file"),
         ("encoder",), fifo("d.txt"), output="f.json"),
    Case("trt-plan-huge-max-seq", trt_command, ["plan", "{ws}/export", "--max-seq", "1" + "0" * 23], 2,
         ("--max-seq", "1<=x<=1048576"), ("export",)),
    Case("trt-plan-range-from-zero", trt_command, ["plan", "{ws}/export", "--profiles", "0-10,11-16"], 2,
         ("range 0-10 starts below rank 1",), ("export",)),
    Case("trt-plan-frontier-names-itself", trt_command, ["plan", "{ws}/export", "--profiles", "{ws}/f.json"], 1,
         ("profiles = 'f.json' must be a string like",), ("export",), frontier_file({"profiles": "f.json"})),
    Case("trt-plan-frontier-empty-latency", trt_command, ["plan", "{ws}/export", "--profiles", "{ws}/f.json"], 1,
         ("rows[0].latency_ms = {} must be a table",), ("export",),
         frontier_file({"rows": [{"rank": 2, "flops_fraction": 0.1, "quality": 1, "latency_ms": {}}]})),
    # ---- scenario files: one schema, physical ranges, unknown keys named ------------------------------
    *[Case(f"scenario-{name}", governor_command, SIM, 1, words, (), scenario(text)) for name, text, words in [
        ("duration-infinite", "duration_s = inf", ("duration_s = inf must be a number in (0, 86400] s",)),
        ("duration-huge", "duration_s = 1e9", ("duration_s = 1000000000.0 must be",)),
        ("duration-zero", "duration_s = 0", ("duration_s = 0 must be a number in (0,",)),
        ("device-not-a-table", "duration_s = 60\ndevice = 5", ("device = 5 must be a table",)),
        ("schedule-empty", "duration_s = 60\n[ambient]\nschedule = []", ("ambient.schedule = [] must be a list of 1",)),
        ("schedule-short-point", "duration_s = 60\n[ambient]\nschedule = [[0]]",
         ("ambient.schedule[0] = [0] must be [time_s, ambient_c]",)),
        ("schedule-text", 'duration_s = 60\n[ambient]\nschedule = [["a", "b"]]', ("schedule[0][0] (time_s) = 'a'",)),
        ("schedule-nan", "duration_s = 60\n[ambient]\nschedule = [[0, nan]]", ("schedule[0][1] (ambient_c) = nan",)),
        ("schedule-backwards", "duration_s = 60\n[ambient]\nschedule = [[30, 20.0], [10, 25.0]]",
         ("ambient.schedule times must not decrease",)),
        ("capacity-text", 'duration_s = 60\n[battery]\ncapacity_wh = "big"',
         ("battery.capacity_wh = 'big' must be a number in (0, 10000] Wh",)),
        ("capacity-zero", "duration_s = 60\n[battery]\ncapacity_wh = 0", ("battery.capacity_wh = 0 must be",)),
        ("capacity-negative", "duration_s = 60\n[battery]\ncapacity_wh = -1", ("battery.capacity_wh = -1 must be",)),
        ("initial-pct-500", "duration_s = 60\n[battery]\ncapacity_wh = 30\ninitial_pct = 500",
         ("battery.initial_pct = 500 must be a number in [0, 100] %",)),
        ("heat-capacity-zero", "duration_s = 60\n[device]\nc_j_per_c = 0", ("device.c_j_per_c = 0 must be",)),
        ("heat-capacity-negative", "duration_s = 60\n[device]\nc_j_per_c = -5", ("device.c_j_per_c = -5 must be",)),
        ("max-rank-zero", "duration_s = 60\n[model]\nmax_rank = 0", ("model.max_rank = 0 must be an integer in [1,",)),
        ("max-rank-negative", "duration_s = 60\n[model]\nmax_rank = -4", ("model.max_rank = -4 must be",)),
        ("max-rank-huge", "duration_s = 60\n[model]\nmax_rank = 100000000", ("model.max_rank = 100000000 must be",)),
        ("negative-demand", "duration_s = 60\n[load]\ndemand_tokens_per_s = [[0, -3.0]]",
         ("demand_tokens_per_s[0][1] (tokens_per_s) = -3.0 must be",)),
        ("quality-lengths", "duration_s = 60\n[quality]\nranks = [8, 16]\nvalues = [0.5]",
         ("quality.ranks has 2 entries and quality.values 1",)),
        ("unknown-fault-key", "duration_s = 60\n[faults]\ndropout = [[1, 2]]",
         ("unknown key 'faults.dropout'", "did you mean 'dropouts'?")),
        ("unknown-battery-key", "duration_s = 60\n[battery]\ncapacity_w = 30",
         ("unknown key 'battery.capacity_w'", "did you mean 'capacity_wh'?")),
        ("unknown-section", "duration_s = 60\n[weather]\nrain = true", ("unknown key 'weather'",)),
        ("window-backwards", "duration_s = 60\n[faults]\ndropouts = [[20, 10]]",
         ("faults.dropouts has a window that ends before it starts",)),
    ]],
    # ---- nsn-serve refuses bad options before it binds a port -------------------------------------------
    Case("serve-no-model", serve_command, ["{ws}/nothing"], 1, ("nothing", "nsn-export first"), ()),
    Case("serve-speculative-at-the-top-rank", serve_command, ["{ws}/export", "--speculative", "16"], 2,
         ("--speculative must be in [1, 15], got 16",), ("export",)),
    Case("serve-speculative-on-an-encoder", serve_command, ["{ws}/encoder", "--speculative", "4"], 2,
         ("--speculative", "is an encoder", "nothing to draft"), ("encoder",)),
    Case("serve-prefill-chunk-zero", serve_command, ["{ws}/export", "--prefill-chunk", "0"], 2,
         ("--prefill-chunk", "0 is not in the range 1<=x<=8192"), ("export",)),
    Case("serve-prefill-chunk-huge", serve_command, ["{ws}/export", "--prefill-chunk", "100000"], 2,
         ("--prefill-chunk", "100000 is not in the range 1<=x<=8192"), ("export",)),
    Case("serve-log-over-the-graph", serve_command, ["{ws}/encoder", "--log", "{ws}/encoder/model.onnx"], 1,
         ("--log", "is inside the input"), ("encoder",)),
    Case("serve-port-out-of-range", serve_command, ["{ws}/encoder", "--port", "70000"], 2, ("--port", "70000"),
         ("encoder",)),
    Case("serve-nan-period", serve_command, ["{ws}/encoder", "--period-s", "nan"], 2,
         ("--period-s", "not a finite number"), ("encoder",)),
    Case("serve-bad-policy", serve_command, ["{ws}/encoder", "--policy", "{ws}/p.toml"], 1,
         ("p.toml", "unknown key 'levels.dwell'"), ("encoder",), write("p.toml", "[levels]\ndwell = 3")),
    Case("serve-empty-host", serve_command, ["{ws}/encoder", "--host", ""], 2,
         ("--host", "is empty", "every network"), ("encoder",)),
    Case("serve-unusable-host", serve_command, ["{ws}/encoder", "--host", "no-such-host.invalid"], 2,
         ("--host", "'no-such-host.invalid' is not an address of this machine"), ("encoder",)),
    Case("serve-threads-above-the-cores", serve_command, ["{ws}/encoder", "--threads", "100000"], 2,
         ("--threads", "100000 is above this machine's", "CPU cores"), ("encoder",)),
    Case("serve-rank-above-the-model", serve_command, ["{ws}/encoder", "--no-governor", "--rank", "17"], 2,
         ("--rank must be in [1, 16], got 17",), ("encoder",)),
    Case("serve-rank-astronomical", serve_command, ["{ws}/encoder", "--rank", str(10**20)], 2,
         ("--rank must be in [1, 16], got 100000000000000000000",), ("encoder",)),
    Case("serve-policy-without-governor", serve_command, ["{ws}/encoder", "--no-governor", "--policy",
                                                          "{ws}/garbage.toml"], 2,
         ("--policy is the governor's", "--no-governor"), ("encoder",), write("garbage.toml", "not toml [")),
    Case("serve-log-without-governor", serve_command, ["{ws}/encoder", "--no-governor", "--log", "{ws}/g.log"], 2,
         ("--log is the governor's", "--no-governor"), ("encoder",)),
    Case("serve-log-in-a-missing-directory", serve_command, ["{ws}/encoder", "--log", "{ws}/none/g.log"], 2,
         ("--log", "none does not exist or is not writable"), ("encoder",)),
    Case("serve-zero-request-timeout", serve_command, ["{ws}/encoder", "--request-timeout-s", "0"], 2,
         ("--request-timeout-s",), ("encoder",)),
    Case("serve-sysfs-root-missing", serve_command, ["{ws}/encoder", "--sysfs-root", "{ws}/none"], 1,
         ("sysfs root", "does not exist"), ("encoder",)),
    # ---- engine.json: one schema ----------------------------------------------------------------------
    Case("engine-plan-is-a-list", trt_command, ["inspect", "{ws}/engine"], 1,
         ("engine.json", "plan = [1, 2] must be a table", "rebuild the engine"), ("export",),
         engine_manifest(lambda m: m.update(plan=[1, 2]))),
    Case("engine-shapes-as-text", trt_command, ["inspect", "{ws}/engine"], 1,
         ("plan.profiles[0].shapes = 'big' must be a table",), ("export",),
         engine_manifest(lambda m: m["plan"]["profiles"][0].update(shapes="big"))),
    Case("engine-negative-bounds", trt_command, ["inspect", "{ws}/engine"], 1,
         ("plan.bounds.max_seq = -3 must be an integer in [1,",), ("export",),
         engine_manifest(lambda m: m["plan"]["bounds"].update(max_seq=-3))),
    Case("engine-unknown-task", trt_command, ["inspect", "{ws}/engine"], 1,
         ("plan.task = 'translation' must be one of",), ("export",),
         engine_manifest(lambda m: m["plan"].update(task="translation"))),
    Case("engine-deeply-nested", trt_command, ["inspect", "{ws}/engine"], 1, ("engine.json", "nested too deeply"),
         ("export",), engine_manifest(text='{"format_version": 1, "plan": ' + "[" * 100_000 + "]" * 100_000 + "}")),
    Case("engine-without-max-rank", trt_command, ["run", "{ws}/engine", "--prompt", "w1"], 1,
         ("engine.json", "lacks nsn.max_rank", "re-export"), ("export",),
         engine_manifest(lambda m: m["nsn"].pop("nsn.max_rank"))),
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
        env = {k: v.replace("{ws}", str(ws)) for k, v in case.env.items()}
        result = CliRunner(env=env).invoke(case.command, args)
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


# ---- a missing extra, two ONNX Runtimes: one line that says what to install ------------------------------------
@pytest.mark.parametrize("command, args", [
    (adapt_command, ["{ws}/hf", "--output", "{ws}/o"]), (export_command, ["--model", "{ws}/ckpt"]),
    (quickstart_command, []), (eval_command, ["--model", "{ws}/ckpt", "--retrieval"]),
    (bench_command, ["--shape", "tiny"]),
])
def test_a_missing_export_extra_is_one_line_naming_the_install(command, args, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a device install: torch cannot be imported
    result = CliRunner().invoke(command, [a.replace("{ws}", str(tmp_path)) for a in args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "needs the export extra (torch not installed): pip install '.[export]' in a clone of nsn-export (or " \
           "'nsn_export-0.1.0-py3-none-any.whl[export]', a wheel built there with python -m build)" in result.output
    assert list(tmp_path.iterdir()) == []


def test_calibrate_plot_without_matplotlib_fails_before_measuring(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(calibrate_command, [str(sources["encoder"]), "--output", str(tmp_path / "f.json"),
                                                    "--plot", str(tmp_path / "f.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "nsn-calibrate --plot needs the plot extra" in " ".join(result.output.split()), result.output
    assert "calibrating" not in result.output and list(tmp_path.iterdir()) == []


def test_two_onnx_runtimes_in_one_environment_are_refused(sources, tmp_path, monkeypatch):
    fake = tmp_path / "site" / "onnxruntime_gpu-1.20.0.dist-info"  # what pip leaves for onnxruntime-gpu
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = CliRunner().invoke(run_command, [str(sources["encoder"]), *RUN_TEXT])
    assert result.exit_code == 0 and "Traceback" not in result.output  # it still runs, and says what is wrong
    assert "warning: onnxruntime and onnxruntime-gpu are both installed" in result.output
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in result.output


@pytest.mark.parametrize("version, words", [("8.6.2", "JetPack 6.0 ships TensorRT 8.6"), ("8.5.2", "JetPack 6.1")])
def test_tensorrt_older_than_10_says_which_jetpack_is_needed(sources, tmp_path, monkeypatch, version, words):
    import types

    fake = types.ModuleType("tensorrt")
    fake.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    result = CliRunner().invoke(trt_command, ["build", str(sources["export"]), "--output", str(tmp_path / "e")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"TensorRT {version} is too old" in result.output and words in result.output
    assert not (tmp_path / "e").exists()


def test_without_onnx_runtime_the_error_names_cpu_gpu_and_the_jetson_index(monkeypatch):
    from deploy.extras import MissingExtraError, import_extra

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError) as error:
        import_extra("onnxruntime", "cpu", "ONNX Runtime")
    message = str(error.value)
    assert "pip install '.[cpu]' in a clone" in message and "[gpu] instead" in message and "jetson-ai-lab" in message


# ---- the library: bad input to NSNSession ------------------------------------------------------------
def test_embed_of_nothing_is_an_empty_matrix(sources):
    from deploy import NSNSession

    assert NSNSession(sources["encoder"]).embed([]).shape == (0, 32)


@pytest.mark.parametrize("model, call, words", [
    ("encoder", lambda s: s.embed([None]), "input 0 must be a list of integers, got NoneType"),
    ("encoder", lambda s: s.embed(["w1", [1, 2]]), "not a mix of both"),
    ("encoder", lambda s: s.embed(["w1"], max_length=100000), "max_length must be an integer in [1, 128]"),
    ("encoder", lambda s: s.embed(["w1"], max_length=0), "max_length must be an integer in [1, 128]"),
    ("encoder", lambda s: s.embed([[5, 96]]), "input 0 must be in [0, 95] (the model's vocabulary), got 96"),
    ("encoder", lambda s: s.embed(["w1"], batch_size=0), "batch_size must be an integer >= 1"),
    ("export", lambda s: s.generate([99999]), "must be in [0, 95] (the model's vocabulary), got 99999"),
    ("export", lambda s: s.generate([-5]), "got -5"),
    ("export", lambda s: s.generate([1], top_k=-1, do_sample=True), "top_k must be an integer >= 0"),
    ("export", lambda s: s.generate([True]), "must be integers in [0, 95], got True"),
])
def test_the_python_api_refuses_bad_values_naming_the_range(sources, model, call, words):
    from deploy import NSNSession

    with pytest.raises(ValueError) as error:
        call(NSNSession(sources[model]))
    assert words in str(error.value)


def test_session_and_policy_constructors_refuse_bad_values(sources):
    from deploy import NSNSession
    from deploy.governor import policy_from_dict

    with pytest.raises(ValueError, match=r"intra_op_threads must be an integer >= 0"):
        NSNSession(sources["encoder"], intra_op_threads=-1)
    with pytest.raises(ValueError, match=r"p.toml: the file is null; it must be a table"):
        policy_from_dict(None, "p.toml")


def test_embed_takes_token_ids_and_matches_the_text_it_encodes(sources):
    from deploy import NSNSession

    session = NSNSession(sources["encoder"])
    ids = [session.tokenizer.encode(text).ids for text in tiny_text(3, 5)]
    np.testing.assert_allclose(session.embed(ids), session.embed(tiny_text(3, 5)), atol=1e-6)


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


# ---- nsn-serve: bad requests, each answered in the OpenAI error shape, the server healthy afterwards ------
KEY = {"Authorization": "Bearer sesame"}


@pytest.fixture(scope="module")
def keyed_servers(serve, sources):
    env = {"NSN_API_KEY": "sesame"}  # from the environment: never in a process listing
    return {"decoder": serve([sources["export"], "--no-governor", "--model-name", "m", "--max-tokens", "64"], env),
            "encoder": serve([sources["encoder"], "--no-governor", "--model-name", "e"], env)}


BAD_REQUESTS = [
    # (id, server, path, body (dict, or raw bytes), headers, status, words in error.message, error.param)
    ("malformed-json", "decoder", "/v1/completions", b'{"prompt": "w1", ', KEY, 400, "not valid JSON", None),
    ("prompt-wrong-type", "decoder", "/v1/completions", {"prompt": 5}, KEY, 400, "prompt", "prompt"),
    ("max-tokens-wrong-type", "decoder", "/v1/completions", {"prompt": "w1", "max_tokens": "many"}, KEY, 400,
     "max_tokens", "max_tokens"),
    ("n-two", "decoder", "/v1/completions", {"prompt": "w1", "n": 2}, KEY, 400, "n = 2 is not supported", "n"),
    ("unknown-field", "decoder", "/v1/completions", {"prompt": "w1", "frobnicate": 1}, KEY, 400,
     "unknown or unsupported field 'frobnicate'", "frobnicate"),
    ("logprobs", "decoder", "/v1/completions", {"prompt": "w1", "logprobs": 5}, KEY, 400, "logprobs = 5", "logprobs"),
    ("negative-max-tokens", "decoder", "/v1/completions", {"prompt": "w1", "max_tokens": -3}, KEY, 400,
     "greater than or equal to 1", "max_tokens"),
    ("huge-max-tokens", "decoder", "/v1/completions", {"prompt": "w1", "max_tokens": 10**9}, KEY, 400,
     "max_tokens = 1000000000 is above this server's limit 64", "max_tokens"),
    ("nan-temperature", "decoder", "/v1/completions", b'{"prompt": "w1", "temperature": NaN}', KEY, 400,
     "temperature", "temperature"),
    ("unknown-model", "decoder", "/v1/completions", {"model": "gpt-9", "prompt": "w1"}, KEY, 404,
     "model 'gpt-9' is not served here", "model"),
    ("prompt-too-long", "decoder", "/v1/completions", {"prompt": " ".join(["w1"] * 120), "max_tokens": 20}, KEY, 400,
     "the prompt is 120 tokens and max_tokens is 20", "max_tokens"),
    ("prompt-ids-outside-vocabulary", "decoder", "/v1/completions", {"prompt": [5, 99999]}, KEY, 400,
     "got 99999", "prompt"),
    ("empty-prompt", "decoder", "/v1/completions", {"prompt": ""}, KEY, 400, "the prompt is empty", "prompt"),
    ("several-prompts", "decoder", "/v1/completions", {"prompt": ["w1", "w2"]}, KEY, 400, "2 prompts", "prompt"),
    ("max-rank-above-model", "decoder", "/v1/completions", {"prompt": "w1", "nsn": {"max_rank": 999}}, KEY, 400,
     "nsn.max_rank = 999 is above the model's maximum rank 16", "nsn.max_rank"),
    ("min-above-max-rank", "decoder", "/v1/completions", {"prompt": "w1", "nsn": {"max_rank": 4, "min_rank": 8}}, KEY,
     400, "nsn.min_rank 8 is above nsn.max_rank 4", "nsn.min_rank"),
    ("chat-without-template", "decoder", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}]},
     KEY, 400, "has no chat template", "messages"),
    ("chat-no-messages", "decoder", "/v1/chat/completions", {"messages": []}, KEY, 400, "messages", "messages"),
    ("embeddings-on-a-decoder", "decoder", "/v1/embeddings", {"input": "w1"}, KEY, 400, "needs an encoder", None),
    ("completions-on-an-encoder", "encoder", "/v1/completions", {"prompt": "w1"}, KEY, 400, "needs a decoder", None),
    ("empty-input", "encoder", "/v1/embeddings", {"input": []}, KEY, 400, "input is empty", "input"),
    ("empty-string-input", "encoder", "/v1/embeddings", {"input": ""}, KEY, 400, "input is empty", "input"),
    ("input-wrong-type", "encoder", "/v1/embeddings", {"input": {"text": "w1"}}, KEY, 400, "input", "input"),
    ("bad-encoding-format", "encoder", "/v1/embeddings", {"input": "w1", "encoding_format": "hex"}, KEY, 400,
     "encoding_format", "encoding_format"),
    ("ten-megabyte-body", "encoder", "/v1/embeddings", b'{"input": "' + b"w1 " * (10 * 2**20 // 3) + b'"}', KEY,
     413, "above the limit of 1048576", None),
    ("chunked-body-over-the-limit", "encoder", "/v1/embeddings", iter([b'{"input": "' + b"w1 " * (2**20 // 3),
                                                                       b'"}']), KEY, 413, "above the limit", None),
    ("booleans-as-token-ids", "decoder", "/v1/completions", {"prompt": [True, False]}, KEY, 400, "prompt", "prompt"),
    ("boolean-max-tokens", "decoder", "/v1/completions", {"prompt": "w1", "max_tokens": True}, KEY, 400,
     "valid integer", "max_tokens"),
    ("boolean-input", "encoder", "/v1/embeddings", {"input": [True]}, KEY, 400, "input", "input"),
    ("boolean-max-rank", "decoder", "/v1/completions", {"prompt": "w1", "nsn": {"max_rank": True}}, KEY, 400,
     "valid integer", "nsn.max_rank"),
    ("subnormal-temperature", "decoder", "/v1/completions", b'{"prompt": "w1", "temperature": 5e-324}', KEY, 400,
     "give 0 for greedy decoding", "temperature"),
    ("nan-top-p", "decoder", "/v1/completions", b'{"prompt": "w1", "top_p": NaN}', KEY, 400, "finite number",
     "top_p"),
    ("infinite-penalty", "decoder", "/v1/completions", b'{"prompt": "w1", "presence_penalty": Infinity}', KEY, 400,
     "finite number", "presence_penalty"),
    ("lone-surrogate-prompt", "decoder", "/v1/completions", b'{"prompt": "w1 \\ud800"}', KEY, 400, "lone surrogate",
     "prompt"),
    ("lone-surrogate-chat", "decoder", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', KEY, 400, "lone surrogate", "messages.0.content"),
    ("lone-surrogate-input", "encoder", "/v1/embeddings", b'{"input": ["w1", "\\ud83d"]}', KEY, 400,
     "lone surrogate", "input"),
    ("lone-surrogate-stop", "decoder", "/v1/completions", b'{"prompt": "w1", "stop": "\\ud800"}', KEY, 400,
     "lone surrogate", "stop"),
    ("missing-key", "decoder", "/v1/completions", {"prompt": "w1"}, {}, 401, "missing or wrong API key", None),
    ("wrong-key", "decoder", "/v1/models", None, {"Authorization": "Bearer open-sesame"}, 401,
     "missing or wrong API key", None),
    ("key-without-bearer", "encoder", "/v1/embeddings", {"input": "w1"}, {"Authorization": "sesame"}, 401,
     "missing or wrong API key", None),
    ("override-not-a-rank", "decoder", "/v1/nsn/override", {"rank": "high"}, KEY, 400, "rank", "rank"),
    ("override-without-governor", "decoder", "/v1/nsn/override", {"rank": 4}, KEY, 409, "without a governor", None),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_its_status_and_an_openai_error_and_the_server_stays_healthy(keyed_servers, case):
    import httpx

    _, which, path, body, headers, status, words, param = case
    server = keyed_servers[which]
    if body is None:
        response = httpx.get(server.url + path, headers=headers, timeout=60)
    elif isinstance(body, bytes) or hasattr(body, "__next__"):  # bytes, or an iterator: sent chunked
        response = httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                              timeout=60)
    else:
        response = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
    assert error["param"] == param and "Traceback" not in response.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    ok = httpx.post(server.url + ("/v1/completions" if which == "decoder" else "/v1/embeddings"),
                    json={"prompt": "w1", "max_tokens": 2} if which == "decoder" else {"input": "w1"}, headers=KEY,
                    timeout=60)
    assert ok.status_code == 200, ok.text
