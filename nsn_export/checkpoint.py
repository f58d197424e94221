"""NSN checkpoints: a directory like ``save_pretrained`` writes, loaded without unpickling.

Layout: the base model's ``config.json``, ``nsn_config.json`` (format version, targets, each
layer's ``R_l``, trained ranks, learned ``s_k``), ``model.safetensors``, and tokenizer files when
the source had them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deploy.atomic import atomic_directory
from deploy.external_data import confined_path, read_json_object
from .config import NSNConfig
from .surgery import build_skeleton, nsn_layers

CONFIG_FILE = "config.json"
NSN_CONFIG_FILE = "nsn_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
    "chat_template.jinja",  # transformers >= 4.43 saves the chat template here (older: in tokenizer_config.json)
)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or of an unknown format."""


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (the first name wins), made contiguous."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def save_nsn(model: nn.Module, path: str | os.PathLike, tokenizer=None,
             tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Save an NSN model as a checkpoint directory (atomically: all files or none). An existing
    ``path`` is replaced only if nsn-export wrote it, and never when it overlaps ``tokenizer_dir``."""
    return atomic_directory(Path(path), lambda tmp: write_checkpoint(model, tmp, tokenizer, tokenizer_dir),
                            kind="nsn-checkpoint", inputs=[tokenizer_dir])


def write_checkpoint(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                     tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Write the checkpoint files into an existing ``directory`` (``save_nsn`` makes it atomic)."""
    nsn_config: NSNConfig | None = getattr(model, "nsn_config", None)
    if nsn_config is None or not nsn_layers(model):
        raise ValueError("model is not an NSN model; call adapt(model, ...) before saving it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    (directory / NSN_CONFIG_FILE).write_text(json.dumps(nsn_config.to_dict(), indent=2) + "\n")
    save_file(unique_state_dict(model), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    elif tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copy2(source, directory / name)


def check_confined(path: Path) -> None:
    """Every file a load may read must resolve inside the directory ``path`` and be a regular file
    (docs/SECURITY.md): a symlink out of a checkpoint is refused before anything is read."""
    for name in (CONFIG_FILE, NSN_CONFIG_FILE, WEIGHTS_FILE, "model.safetensors.index.json", *TOKENIZER_FILES):
        confined_path(path, name, f"{path}: file")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing; an NSN checkpoint needs {CONFIG_FILE}, "
                              f"{NSN_CONFIG_FILE} and {WEIGHTS_FILE} (write one with nsn-adapt)")
    try:
        return read_json_object(path, "the file is corrupt")
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def load_nsn_config(path: str | os.PathLike) -> NSNConfig:
    path = Path(path)
    try:
        return NSNConfig.from_dict(read_json(path / NSN_CONFIG_FILE), source=str(path / NSN_CONFIG_FILE))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as error:
        raise CheckpointError(str(error)) from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing; the checkpoint has no weights")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read safetensors weights ({error}); the file is corrupt "
                              f"or truncated") from None


def alias_groups(model: nn.Module) -> dict[str, set[str]]:
    """For each state-dict name, every name that refers to the same tensor (tied weights)."""
    by_tensor: dict[tuple[int, int], set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), set()).add(name)
    return {name: group for group in by_tensor.values() for name in group}


def load_nsn(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load an NSN checkpoint directory written by ``save_nsn``. Never unpickles.

    Every tensor must be present with its exact shape; nothing is silently re-initialised.
    """
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    check_confined(path)
    base_config = read_json(path / CONFIG_FILE)
    nsn_config = load_nsn_config(path)
    tensors = load_weights(path / WEIGHTS_FILE)

    class_name = nsn_config.base_model or (base_config.get("architectures") or [None])[0]
    model_class = getattr(transformers, class_name or "", None)
    if model_class is None:
        raise CheckpointError(f"{path / NSN_CONFIG_FILE}: base model class {class_name!r} is not in "
                              f"transformers {transformers.__version__}")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / CONFIG_FILE}: not a usable model config ({error})") from None
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    model = model_class(config).to(dtype)
    build_skeleton(model, nsn_config.layer_ranks)

    expected = model.state_dict()
    aliases = alias_groups(model)
    for name, tensor in expected.items():
        stored = next((n for n in sorted(aliases.get(name, {name})) if n in tensors), None)
        if stored is None:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: tensor {name!r} is missing; the checkpoint is "
                                  f"incomplete")
        if tuple(tensors[stored].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path / WEIGHTS_FILE}: tensor {stored!r} has shape {tuple(tensors[stored].shape)}, "
                f"expected {tuple(tensor.shape)} (from {CONFIG_FILE} and {NSN_CONFIG_FILE})")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: unexpected tensor(s) {unexpected[:5]}; the weights do "
                              f"not match {CONFIG_FILE} / {NSN_CONFIG_FILE}")
    model.load_state_dict(tensors, strict=False)
    model.nsn_config = nsn_config
    model.eval()
    return model.to(device)
