"""Which linear layers of each Hugging Face architecture an NSN factorises, in one table.

Patterns are regular expressions matched against the end of a module's qualified name.
"""

from __future__ import annotations

ATTENTION_LLAMA = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"
MLP_LLAMA = r"mlp\.(gate_proj|up_proj|down_proj)"

# model_type -> preset -> pattern. "all-linear" is the union of the two.
TARGETS: dict[str, dict[str, str]] = {
    "llama": {"attention": ATTENTION_LLAMA, "mlp": MLP_LLAMA},
    "mistral": {"attention": ATTENTION_LLAMA, "mlp": MLP_LLAMA},
    "qwen2": {"attention": ATTENTION_LLAMA, "mlp": MLP_LLAMA},
    "gemma": {"attention": ATTENTION_LLAMA, "mlp": MLP_LLAMA},
    "gemma2": {"attention": ATTENTION_LLAMA, "mlp": MLP_LLAMA},
    "phi3": {"attention": r"self_attn\.(qkv_proj|o_proj)", "mlp": r"mlp\.(gate_up_proj|down_proj)"},
    "gpt_neox": {"attention": r"attention\.(query_key_value|dense)", "mlp": r"mlp\.(dense_h_to_4h|dense_4h_to_h)"},
    "gpt2": {"attention": r"attn\.(c_attn|c_proj)", "mlp": r"mlp\.(c_fc|c_proj)"},
    "bert": {
        "attention": r"attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": r"layer\.\d+\.(intermediate\.dense|output\.dense)",
    },
}

PRESETS = ("all-linear", "attention", "mlp")

# Output heads and poolers are never factorised by a preset: they are small next to the body, and
# the head is often tied to the embeddings.
HEAD_NAMES = r"(lm_head|embed_out|score|classifier|cls\..*|pooler\..*|qa_outputs)"

SUPPORTED_ARCHITECTURES = tuple(sorted(TARGETS))
