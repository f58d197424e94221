"""Export an NSN model to ONE ONNX graph whose int64 ``rank`` input selects the rank at run time.

Inputs and outputs are declared by Hugging Face Optimum's ``OnnxConfig`` for the architecture
(decoders: ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/.value``
-> ``logits``, ``present.{i}.key/.value``; encoders -> ``last_hidden_state``), plus ``rank``.
``rank`` means exactly what ``set_rank`` means in torch; the graph clamps it into ``[1, R_l]`` per
layer, so a raw caller's out-of-range value can never index outside a weight.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import shutil
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch

from .architectures import SUPPORTED_ARCHITECTURES, TARGETS
from .attention import grouped
from deploy.atomic import atomic_directory, check_output
from .checkpoint import TOKENIZER_FILES
from .flops import attention_flops_per_token, model_flops
from .layers import RANK_MODES, validate_rank
from .models import is_causal_lm
from .surgery import max_rank as model_max_rank
from .surgery import rank as at_rank
from .surgery import traced_rank

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
METADATA_VERSION = "1"
TASKS = ("text-generation", "feature-extraction")
MIN_OPSET = 14  # scaled-dot-product attention and Trilu need opset 14


class ExportError(ValueError):
    """An export that cannot proceed: unsupported model, bad option, or an op the opset lacks."""


@dataclass
class ExportResult:
    path: Path
    task: str
    inputs: list[str]
    outputs: list[str]
    metadata: dict[str, str]
    checks: list = None


def infer_task(model) -> str:
    return "text-generation" if is_causal_lm(model) else "feature-extraction"


def check_exportable(model, task: str, opset: int, rank_mode: str) -> None:
    arch = getattr(model.config, "model_type", None)
    if arch not in TARGETS:
        raise ExportError(f"architecture {arch!r} is not supported for export; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if task not in TASKS:
        raise ExportError(f"task must be one of {TASKS}, got {task!r}")
    if task == "text-generation" and not is_causal_lm(model):
        raise ExportError(f"task text-generation needs a causal LM (e.g. *ForCausalLM), got {type(model).__name__}; "
                          f"use --task feature-extraction")
    if rank_mode not in RANK_MODES:
        raise ExportError(f"rank mode must be one of {RANK_MODES}, got {rank_mode!r}")
    check_opset(opset)


def newest_opset() -> int:
    """The newest opset both the installed torch exporter and the installed onnx can write."""
    from torch.onnx import _constants

    return min(onnx.defs.onnx_opset_version(), int(getattr(_constants, "ONNX_MAX_OPSET", 20)))


def check_opset(opset) -> None:
    newest = newest_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset!r} is outside the supported range [{MIN_OPSET}, {newest}] (attention "
                          f"needs >= {MIN_OPSET}; torch {torch.__version__} exports up to {newest}); use --opset 17")


def rank_onnx_config(model, task: str, dummy_rank: int | None):
    """Optimum's ``OnnxConfig`` for this architecture, with an extra scalar int64 ``rank`` input
    (none when ``dummy_rank`` is ``None``: a fixed-rank graph)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the configs with the TasksManager)
    from optimum.exporters.tasks import TasksManager
    from optimum.utils.input_generators import DummyInputGenerator

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=model, task=task, library_name="transformers")
    except (KeyError, ValueError) as error:
        raise ExportError(f"Optimum has no ONNX config for {type(model).__name__} / {task}: {error}") from None
    base_class = type(constructor(model.config, task=task))
    if dummy_rank is None:
        return configured(base_class, model, task)

    class RankInputGenerator(DummyInputGenerator):
        SUPPORTED_INPUT_NAMES = ("rank",)

        def __init__(self, *args, **kwargs):
            pass

        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            return torch.tensor(dummy_rank, dtype=torch.int64)

    class RankOnnxConfig(base_class):
        DUMMY_INPUT_GENERATOR_CLASSES = base_class.DUMMY_INPUT_GENERATOR_CLASSES + (RankInputGenerator,)

        @property
        def inputs(self):
            inputs = super().inputs
            inputs["rank"] = {}  # a scalar: no dynamic axes
            return inputs

    return configured(RankOnnxConfig, model, task)


def configured(config_class, model, task: str):
    if task == "text-generation":
        # One graph for prefill and decode: the cache is always an input (empty at prefill).
        return config_class(model.config, task=task, use_past=True, use_past_in_inputs=True)
    return config_class(model.config, task=task)


def forward_with_rank(model, rank_mode: str):
    """A forward that names ``rank`` (Optimum passes only named inputs) and drives the NSN layers."""
    from optimum.exporters.onnx._traceable_decorator import traceable_check_model_inputs

    original = type(model).forward
    if hasattr(original, "__wrapped__"):
        original = traceable_check_model_inputs(original.__wrapped__)
    accepted = set(inspect.signature(type(model).forward).parameters)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                token_type_ids=None, rank=None, use_cache=None, **kwargs):
        named = {"position_ids": position_ids, "past_key_values": past_key_values,
                 "token_type_ids": token_type_ids, "use_cache": use_cache}
        extra = {k: v for k, v in named.items() if v is not None and k in accepted}
        with traced_rank(self, rank, rank_mode):
            return original(self, input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)

    return types.MethodType(forward, model)


def nsn_metadata(model, task: str, rank_mode: str, opset: int, fixed_rank: int | None = None) -> dict[str, str]:
    """The NSN facts every downstream tool reads from the ONNX file (all values are strings)."""
    config = model.nsn_config
    top = model_max_rank(model)
    flops = [model_flops(model, r) for r in range(1, top + 1)]
    return {
        "nsn.format_version": METADATA_VERSION,
        "nsn.task": task,
        "nsn.rank_mode": rank_mode,
        "nsn.max_rank": str(top),
        "nsn.layer_ranks": json.dumps(config.layer_ranks),
        "nsn.trained_ranks": json.dumps(config.trained_ranks),
        "nsn.log_variances": json.dumps({str(k): v for k, v in config.log_variances.items()}),
        # FLOPs per token at rank r (index r-1); add attention_flops_per_context_token * context.
        "nsn.flops_per_rank": json.dumps(flops),
        "nsn.dense_flops": str(model_flops(model, None)),
        "nsn.attention_flops_per_context_token": str(attention_flops_per_token(model.config, 1)),
        "nsn.source_model": f"{model.config.model_type}/{type(model).__name__}",
        "nsn.init": json.dumps({"method": config.init, "calibration_tokens": config.calibration_tokens}),
        "nsn.opset": str(opset),
        **({"nsn.fixed_rank": str(fixed_rank)} if fixed_rank is not None else {}),
    }


def check_weights(weights: str, rank_mode: str) -> None:
    from .int8 import WEIGHT_FORMATS

    if weights not in WEIGHT_FORMATS:
        raise ExportError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if weights == "int8" and rank_mode != "slice":
        raise ExportError(f"int8 weights keep rank slicing (a scale per rank component), so they need slice mode; "
                          f"got rank mode {rank_mode!r}: use --rank-mode slice")


def write_metadata(path: Path, metadata: dict[str, str], weights: str = "fp32") -> None:
    """Add ``metadata_props`` and store every weight in one external file, ``model.onnx_data``
    (int8 ones with ``weights="int8"``: ``nsn_export.int8``).

    External data keeps models over 2 GB valid, lets ONNX Runtime and our weight views map the
    weights from the file instead of copying them, and lets TensorRT parse the same pair.
    """
    proto = onnx.load(str(path), load_external_data=True)
    if weights == "int8":
        from .int8 import quantize_graph

        quantize_graph(proto)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or proto.metadata_props.add()
        prop.key, prop.value = key, value
    for stale in path.parent.iterdir():  # tensors the exporter wrote one file per tensor
        if stale != path:
            stale.unlink()
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_FILE, size_threshold=1024)
    # The weights' identity travels in the graph, so that a frontier or an engine names the model
    # it was measured on without anyone hashing the weights again. The save above left ``proto``
    # pointing at model.onnx_data: writing it again rewrites the graph alone.
    from deploy.frontier import file_sha256

    prop = proto.metadata_props.add()
    prop.key, prop.value = "nsn.weights_sha256", file_sha256(path.parent / DATA_FILE)
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The graph's ``metadata_props`` (its weight locations checked, no weight read)."""
    from deploy.external_data import load_graph

    proto = load_graph(path)
    return {p.key: p.value for p in proto.metadata_props}


@contextlib.contextmanager
def quiet_logger(name: str):
    """Silence a library's advice (e.g. Optimum preferring opset 18) while we export."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_optimum_export(model, config, path: Path, opset: int) -> tuple[list[str], list[str]]:
    from optimum.exporters.onnx.convert import export_pytorch

    try:
        with warnings.catch_warnings(), quiet_logger("torch.onnx"), quiet_logger("optimum"), grouped(model):
            warnings.simplefilter("ignore")  # tracer warnings about the rank-dependent slice are expected
            return export_pytorch(model, config, opset, path)
    except torch.onnx.errors.UnsupportedOperatorError as error:
        raise ExportError(f"opset {opset} is too old for an operator in this model ({error}); "
                          f"use a newer opset, e.g. --opset 17") from None
    except torch.onnx.errors.OnnxExporterError as error:
        raise ExportError(f"ONNX export failed at opset {opset}: {error}") from None


def export_onnx(model, output_dir: str | Path, opset: int = 17, rank_mode: str = "slice", task: str | None = None,
                overwrite: bool = False, tokenizer_dir: str | Path | None = None, verify: bool = True,
                fixed_rank: int | None = None, progress: Callable[[str], None] | None = None,
                weights: str = "fp32") -> ExportResult:
    """Export ``model`` (an NSN model) to ``output_dir/model.onnx`` plus its config and tokenizer files.

    ``weights="int8"`` stores the factors and embeddings as int8 with a scale per rank component
    or row (``nsn_export.int8``); the graph is then verified against the model with those same
    rounded weights, so the check stays as tight as for fp32.

    With ``verify`` the graph is checked against PyTorch (``verify.verify_onnx``) before it lands;
    a mismatch raises ``VerificationError``. The directory appears whole and verified or not at
    all; an existing one is refused unless ``overwrite``.

    ``fixed_rank`` instead exports a *specialist*: the weights pre-sliced at that rank and no
    ``rank`` input (a baseline for benchmarks; it is not verified here).
    """
    from .int8 import fake_quantized
    from .verify import require_passed, verify_onnx

    report = progress or (lambda message: None)
    output_dir = Path(output_dir)
    check_output(output_dir, [tokenizer_dir], overwrite)
    task = task or infer_task(model)
    check_exportable(model, task, opset, rank_mode)
    top = model_max_rank(model)
    check_weights(weights, rank_mode)
    if fixed_rank is not None:
        fixed_rank, verify = validate_rank(fixed_rank, top), False
    config = rank_onnx_config(model, task, dummy_rank=None if fixed_rank else max(1, top // 2))
    metadata = {**nsn_metadata(model, task, rank_mode, opset, fixed_rank), "nsn.weights": weights}
    names: dict[str, list] = {}

    def fill(tmp: Path) -> None:
        report(f"tracing {type(model).__name__} with a dynamic rank input (opset {opset}, {rank_mode} mode)")
        if fixed_rank is not None:
            with at_rank(model, fixed_rank, rank_mode):
                names["inputs"], names["outputs"] = run_optimum_export(model, config, tmp / MODEL_FILE, opset)
        else:
            saved_forward = model.__dict__.get("forward")
            model.forward = forward_with_rank(model, rank_mode)
            try:
                names["inputs"], names["outputs"] = run_optimum_export(model, config, tmp / MODEL_FILE, opset)
            finally:
                if saved_forward is None:
                    del model.forward
                else:
                    model.forward = saved_forward
        report("writing NSN metadata" + (" and int8 weights" if weights == "int8" else ""))
        write_metadata(tmp / MODEL_FILE, metadata, weights)
        if verify:
            with fake_quantized(model) if weights == "int8" else contextlib.nullcontext():
                names["checks"] = verify_onnx(tmp / MODEL_FILE, model, progress=report)
            require_passed(names["checks"])
        model.config.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)

    atomic_directory(output_dir, fill, kind="nsn-onnx-export", inputs=[tokenizer_dir])
    return ExportResult(output_dir / MODEL_FILE, task, names["inputs"], names["outputs"], metadata,
                        names.get("checks"))


def export_dense_onnx(model, output_dir: str | Path, opset: int = 17, task: str | None = None) -> Path:
    """Export a plain (not NSN) Hugging Face model with Optimum: the baseline a user would deploy
    without NSN. Returns the path of ``model.onnx``; the directory appears whole or not at all."""
    from optimum.exporters.onnx import onnx_export_from_model

    optimum_task = {"text-generation": "text-generation-with-past"}.get(task or infer_task(model), "feature-extraction")
    with warnings.catch_warnings(), quiet_logger("optimum"):
        warnings.simplefilter("ignore")
        atomic_directory(Path(output_dir), lambda tmp: onnx_export_from_model(
            model, tmp, task=optimum_task, opset=opset, do_validation=False), kind="dense-onnx-export")
    return Path(output_dir) / MODEL_FILE
