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


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what a byte-level BPE vocabulary holds)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = 0
    table = {}
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_gguf(path, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
              intermediate: int = 64, context: int = 256):
    """A tiny Llama GGUF file laid out as llama.cpp writes SmolLM2's: a byte-level BPE vocabulary
    (ChatML special tokens at ids 0-2, the 256 bytes, a few merges), ``add_bos_token`` false, eos
    ``<|im_end|>``, a ChatML chat template, tied embeddings, F32 tensors with random values."""
    import gguf
    import numpy as np

    alphabet = byte_level_alphabet()
    merges = ["Ġ t", "Ġ a", "h e", "Ġt he", "i n", "Ġ w", "o n", "e r"]
    tokens = GGUF_SPECIALS + alphabet + [m.replace(" ", "") for m in merges]
    token_types = [3] * len(GGUF_SPECIALS) + [1] * (len(tokens) - len(GGUF_SPECIALS))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHATML)
    random = np.random.default_rng(seed)

    def weight(*shape):
        return (random.standard_normal(shape) * 0.08).astype(np.float32)

    head_dim = hidden // heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(intermediate, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(intermediate, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, intermediate))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dense_and_nsn_exports(root, arch: str, max_rank: int = 32):
    """In ``root``: a tiny model as Hugging Face saves it (``hf``), its dense export through
    ``nsn-export --dense`` (``dense``), and its NSN exports at ``max_rank``, fp32 (``fp32``) and int8
    (``int8``). Returns ``root``."""
    from click.testing import CliRunner

    import nsn_export as nsn
    from nsn_export.cli import export_command
    from nsn_export.export import export_onnx

    model = tiny_model(arch)
    model.save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    result = CliRunner().invoke(export_command, ["--model", str(root / "hf"), "--dense", "--output",
                                                 str(root / "dense")])
    assert result.exit_code == 0, result.output
    nsn.adapt(model, "all-linear", max_rank=max_rank)
    for weights in ("fp32", "int8"):
        export_onnx(model, root / weights, tokenizer_dir=root / "hf", weights=weights)
    return root
