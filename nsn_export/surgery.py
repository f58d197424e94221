"""Model surgery: replace chosen linear layers of a model with NSN layers, and control the rank.

One global ``rank`` drives the whole model: every NSN layer runs at ``min(rank, R_l)``, and
``rank`` ranges over ``[1, max_l R_l]``. The ONNX graph's ``rank`` input, the ONNX Runtime and
TensorRT runtimes and the device governor all mean exactly this number.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architectures import HEAD_NAMES, PRESETS, SUPPORTED_ARCHITECTURES, TARGETS
from .config import NSNConfig
from .layers import RANK_MODES, NSNLinear, dense_weight, is_linear, validate_rank


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    max_rank: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    init: str = "svd"


@dataclass
class AdaptReport:
    """What ``adapt`` replaced: one row per layer, FLOPs per token at full rank."""

    layers: list[LayerReport]

    @property
    def params_before(self) -> int:
        return sum(row.params_before for row in self.layers)

    @property
    def params_after(self) -> int:
        return sum(row.params_after for row in self.layers)

    def table(self) -> str:
        lines = [f"{'module':<48} {'shape':>12} {'R':>5} {'params':>19} {'FLOPs/token':>21}"]
        for row in self.layers:
            lines.append(
                f"{row.name:<48} {f'{row.out_features}x{row.in_features}':>12} {row.max_rank:>5} "
                f"{f'{row.params_before}->{row.params_after}':>19} "
                f"{f'{row.flops_before}->{row.flops_after}':>21}"
                + ("" if row.init == "svd" else f"  {row.init}")
            )
        lines.append(f"{len(self.layers)} layers, parameters {self.params_before} -> {self.params_after}")
        return "\n".join(lines)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def target_pattern(model: nn.Module, targets: str | list[str]) -> re.Pattern:
    """Compile ``targets`` (a preset, or module names / regular expressions) into one pattern."""
    if isinstance(targets, str) and targets in PRESETS:
        arch = model_type(model)
        if arch in TARGETS:
            table = TARGETS[arch]
            parts = list(table.values()) if targets == "all-linear" else [table[targets]]
        elif targets == "all-linear":
            parts = [r".+"]  # any architecture: every linear except heads and tied layers
        else:
            raise ValueError(
                f"preset {targets!r} is not defined for model type {arch!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}. Use targets='all-linear' or list module names."
            )
    else:
        names = [targets] if isinstance(targets, str) else list(targets)
        if not names:
            raise ValueError("targets is empty; pass a preset (all-linear, attention, mlp) or module names")
        parts = names
    return re.compile(r"(?:^|.*\.)(?:" + "|".join(f"(?:{p})" for p in parts) + r")$")


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """Identities of parameters that more than one module uses (e.g. an LM head tied to embeddings)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def resolve_max_rank(max_rank: int | float, in_features: int, out_features: int) -> int:
    """An int caps every layer's rank; a float in (0, 1] is a fraction of ``min(d_in, d_out)``."""
    limit = min(in_features, out_features)
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, float)):
        raise ValueError(f"max_rank must be an int >= 1 or a fraction in (0, 1], got {max_rank!r}")
    if isinstance(max_rank, float):
        if not 0.0 < max_rank <= 1.0:
            raise ValueError(f"max_rank as a fraction must be in (0, 1], got {max_rank}; "
                             f"pass an int for an absolute rank")
        return max(1, round(max_rank * limit))
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    return min(max_rank, limit)


def find_targets(model: nn.Module, targets: str | list[str] = "all-linear") -> list[str]:
    """Qualified names of the linear layers ``targets`` selects (heads and tied layers excluded)."""
    pattern = target_pattern(model, targets)
    head = re.compile(r"(?:^|.*\.)" + HEAD_NAMES + r"$")
    tied = tied_parameter_ids(model)
    preset = isinstance(targets, str) and targets in PRESETS
    chosen = []
    for name, module in model.named_modules():
        if not is_linear(module) or not pattern.match(name):
            continue
        if preset and head.match(name):
            continue
        if id(module.weight) in tied:
            continue
        chosen.append(name)
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapt(
    model: nn.Module,
    targets: str | list[str] = "all-linear",
    max_rank: int | float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    calibration: list[dict] | None = None,
    calibration_tokens: int = 16384,
    calibration_progress: Callable[[int, int], None] | None = None,
    fisher: bool = False,
    fisher_progress: Callable[[int, int], None] | None = None,
) -> AdaptReport:
    """Replace the selected linear layers of ``model`` in place by SVD-initialised ``NSNLinear``.

    ``targets``: ``"all-linear"``, ``"attention"``, ``"mlp"`` or module names / regular expressions.
    ``max_rank``: an int (capped per layer at ``min(d_in, d_out)``) or a fraction of it.
    ``calibration``: tokenised batches (``data.make_batches``); with them every layer is factorised
    data-aware (``NSNLinear.from_linear`` with its input statistics over at most
    ``calibration_tokens`` tokens), so each rank prefix is the best on those activations.
    ``fisher``: also weigh each layer's outputs by the distillation loss's Gauss-Newton matrix,
    sampled by a backward pass per calibration batch (``activations.output_moments``): each prefix
    is then the best rank-``r`` layer by a Kronecker-factored estimate of the model's loss, not of
    the layer's own error (needs ``calibration``; on MiniLM at rank 128: cosine 0.81 against 0.78).
    ``progress(done, total)`` is called after each layer (SVDs of large models take a while),
    ``calibration_progress(done, total)`` after each calibration batch, ``fisher_progress`` after
    each batch's backward pass.
    The NSN facts are stored on ``model.nsn_config``. Returns a per-layer report.
    """
    if any(isinstance(m, NSNLinear) for m in model.modules()):
        raise ValueError("model already has NSN layers; adapt it once (load checkpoints with load_nsn)")
    names = find_targets(model, targets)
    if not names:
        raise ValueError(f"targets {targets!r} matched no linear layer of this "
                         f"{type(model).__name__}; check the module names with model.named_modules()")
    if fisher and calibration is None:
        raise ValueError("fisher=True weighs the layers' outputs by gradients on calibration data; pass "
                         "calibration batches too (data.make_batches)")
    moments, gradients = {}, {}
    if calibration is not None:
        from .activations import input_moments, output_moments

        moments = input_moments(model, names, calibration, calibration_tokens, progress=calibration_progress)
        if fisher:
            gradients = output_moments(model, names, calibration, calibration_tokens, progress=fisher_progress)
    rows = []
    layer_ranks = {}
    for name in names:
        layer = model.get_submodule(name)
        out_features, in_features = dense_weight(layer).shape
        rank = resolve_max_rank(max_rank, in_features, out_features)
        nsn = NSNLinear.from_linear(layer, rank, input_moment=moments.get(name), output_moment=gradients.get(name))
        replace_module(model, name, nsn)
        layer_ranks[name] = rank
        bias = 0 if layer.bias is None else out_features
        rows.append(LayerReport(
            name, in_features, out_features, rank,
            params_before=in_features * out_features + bias,
            params_after=rank * (in_features + out_features) + bias,
            flops_before=2 * in_features * out_features,
            flops_after=nsn.flops_per_token(), init=nsn.init_method,
        ))
        if progress is not None:
            progress(len(rows), len(names))
    tokens = max((m.tokens for m in moments.values()), default=0)
    model.nsn_config = NSNConfig(layer_ranks=layer_ranks, targets=targets, max_rank_spec=max_rank,
                                 base_model=type(model).__name__,
                                 init="svd" if calibration is None else "fisher" if fisher else "whitened",
                                 calibration_tokens=tokens)
    return AdaptReport(rows)


def build_skeleton(model: nn.Module, layer_ranks: dict[str, int]) -> None:
    """Replace the named linear layers by uninitialised NSN layers of the given ranks (for loading)."""
    for name, rank in layer_ranks.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} of the NSN config does not exist in this "
                             f"{type(model).__name__}; the checkpoint does not match its config.json") from None
        out_features, in_features = dense_weight(layer).shape
        replace_module(model, name, NSNLinear(in_features, out_features, rank, bias=layer.bias is not None,
                                              device=layer.weight.device, dtype=layer.weight.dtype))


def nsn_layers(model: nn.Module) -> list[tuple[str, NSNLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NSNLinear)]


def max_rank(model: nn.Module) -> int:
    """The largest ``R_l`` in the model: the global rank ranges over ``[1, max_rank(model)]``."""
    layers = nsn_layers(model)
    if not layers:
        raise ValueError("model has no NSN layers; call adapt(model, ...) or load_nsn(path) first")
    return max(layer.max_rank for _, layer in layers)


def set_rank(model: nn.Module, rank: int, mode: str | None = None) -> int:
    """Run every NSN layer at ``min(rank, R_l)``. ``rank`` must be an int in ``[1, max_rank(model)]``.

    ``mode`` optionally switches how the rank is applied: ``"slice"`` (compute only the first
    ``rank`` components) or ``"mask"`` (compute all, zero the rest); both give the same outputs.
    """
    value = validate_rank(rank, max_rank(model))
    if mode is not None and mode not in RANK_MODES:
        raise ValueError(f"rank mode must be one of {RANK_MODES}, got {mode!r}")
    for _, layer in nsn_layers(model):
        layer.rank = value
        if mode is not None:
            layer.rank_mode = mode
    return value


def get_rank(model: nn.Module) -> int:
    layers = nsn_layers(model)
    ranks = {layer.rank for _, layer in layers if isinstance(layer.rank, int)}
    return max_rank(model) if not ranks else max(ranks)


@contextlib.contextmanager
def rank(model: nn.Module, value: int, mode: str | None = None):
    """Context manager: run ``model`` at ``value`` inside the block, then restore the previous rank."""
    previous = [(layer, layer.rank, layer.rank_mode) for _, layer in nsn_layers(model)]
    set_rank(model, value, mode)
    try:
        yield model
    finally:
        for layer, old_rank, old_mode in previous:
            layer.rank, layer.rank_mode = old_rank, old_mode


@contextlib.contextmanager
def traced_rank(model: nn.Module, rank_tensor: torch.Tensor, mode: str = "slice"):
    """Drive every NSN layer from one 0-d int64 tensor, so tracing turns the rank into a graph input."""
    previous = [(layer, layer.rank, layer.rank_mode) for _, layer in nsn_layers(model)]
    for layer, _, _ in previous:
        layer.rank, layer.rank_mode = rank_tensor, mode
    try:
        yield model
    finally:
        for layer, old_rank, old_mode in previous:
            layer.rank, layer.rank_mode = old_rank, old_mode
