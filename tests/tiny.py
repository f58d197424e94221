"""Tiny Hugging Face models with random weights, built from config classes (no downloads)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=128)


def tiny_config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON, num_key_value_heads=2)
    if arch == "mistral":
        return transformers.MistralConfig(**COMMON, num_key_value_heads=2)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON, num_key_value_heads=2)
    if arch == "gemma":
        return transformers.GemmaConfig(**COMMON, num_key_value_heads=2, head_dim=8)
    if arch == "phi3":
        return transformers.Phi3Config(**COMMON, num_key_value_heads=4, pad_token_id=0)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**COMMON)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    if arch == "bert":
        return transformers.BertConfig(**COMMON)
    raise KeyError(arch)


DECODERS = ("llama", "qwen2", "gpt_neox", "gpt2")
ENCODERS = ("bert",)


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "eager"
    model_class = transformers.BertModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = model_class.from_config(config) if arch != "bert" else model_class(config)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: words ``w0`` .. ``w94`` plus ``[PAD]``."""
    import tokenizers

    vocab = {f"w{i}": i for i in range(95)} | {"[PAD]": 95}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[PAD]",
                                                eos_token="[PAD]")


def tiny_text(count: int, length: int = 12) -> list[str]:
    return [" ".join(f"w{(i * 7 + j * 3) % 95}" for j in range(length)) for i in range(count)]
