"""Tiny random-weight decoder-only MoE models, one per family, at the shapes transformers' own tests use (hidden 32,
a few experts, top-2, 2 layers), saved as Hugging Face folders with the demo model's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.conftest import DEMO

ATTENTION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=8006
)  # the demo tokenizer's
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4, num_key_value_heads=4)

# family → (model_type, config fields): every family's routing and layout quirk is present at least once
FAMILIES = {
    "mixtral": ("mixtral", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (  # a shared expert with its sigmoid gate, beside the routed experts
        "qwen2_moe",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),  # fmt: skip
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            norm_topk_prob=True,
        ),
    ),  # fmt: skip
    "olmoe": ("olmoe", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    # top-4 at a budget of one expert per layer: many waves, resident experts run first
    "olmoe_top4": ("olmoe", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=4)),
    "gpt_oss": ("gpt_oss", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
    "deepseek_v2": (  # the first layer dense, group-limited greedy routing over 2 groups
        "deepseek_v2",
        dict(
            ATTENTION,
            **MLA,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            num_hidden_layers=3,
        ),
    ),  # fmt: skip
    "deepseek_v3": (  # sigmoid scores, e_score_correction_bias choosing, group limits, a dense first layer
        "deepseek_v3",
        dict(
            ATTENTION,
            **MLA,
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=16,
            num_hidden_layers=3,
        ),
    ),  # fmt: skip
    "granitemoe": ("granitemoe", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
}


def make_tiny_causal(family: str, out: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save a tiny random model of `family` in `dtype` to `out` (as transformers saves it: per-expert tensors where
    the family's conversion mapping says so, fused otherwise)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = FAMILIES[family]
    config = AutoConfig.for_model(
        model_type, **{**ATTENTION, **fields}, pad_token_id=0, eos_token_id=1, bos_token_id=None
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if model_type == "deepseek_v3":  # a bias that changes choices, so that the test sees it used
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, out / name)
    return out
