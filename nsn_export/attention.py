"""The attention our decoder graphs are traced with: grouped-query attention that reads the cache
as it is stored, with no copy of its key/value heads.

Transformers' eager attention (and the ONNX exporter's SDPA decomposition) repeats each key/value
head for every query head that shares it (``repeat_kv``), so a graph built from it expands, transposes
and rescales the whole cache in every layer at every step: on SmolLM2 (3 KV heads for 9 query heads)
~16 MB written per layer per token at 1,800 tokens of context, six times the layer's cache.
Here the query heads of a group are folded into the query-length axis instead, so one matmul per
KV head scores them all against the one stored copy:

    q [B, H, S, D] -> [B, KV, G*S, D];  scores = q @ k^T * scale -> [B, KV, G, S, T] + mask

The arithmetic is eager attention's (the same scale, the additive mask with the dtype's minimum, a
float32 softmax, Gemma 2's soft-capping), so a traced graph matches the model as transformers runs it.
ONNX Runtime fuses ``MatMul(q, Transpose(k))`` and the scale into one ``FusedMatMul``, so the key
cache is read in place. Only the export uses this; training and verification run the model's own.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "nsn_grouped"
# Architectures whose attention calls transformers' attention interface with eager semantics
# (``scaling``, an additive 4D mask, optional ``softcap``); others are traced as they are.
GROUPED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "gemma", "gemma2", "phi3"})


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                      **kwargs):
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    folded = query.reshape(batch, kv_heads, groups * length, dim)
    scores = torch.matmul(folded, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.reshape(batch, kv_heads, groups, length, -1)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights.reshape(batch, kv_heads, groups * length, -1), value)
    output = output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous()
    return output, None


def eager_mask(*args, **kwargs):
    """Eager attention's additive mask, looked up when called: the exporter swaps in a traceable one."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["eager"](*args, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


@contextlib.contextmanager
def grouped(model):
    """Trace ``model`` with ``grouped_attention`` (architectures outside GROUPED_ARCHITECTURES as
    they are); the model's own attention is restored afterwards."""
    if getattr(model.config, "model_type", None) not in GROUPED_ARCHITECTURES:
        yield
        return
    register()
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = saved
