"""The real switch-base-N shapes (google/switch-base-{8..256}), with random weights, for benchmarks on a GPU box.

sida never downloads checkpoints, and speed and memory depend only on the shapes, which are these
published config values: d_model 768, d_ff 3072, 12 heads x d_kv 64, 12+12 blocks, every 2nd block sparse.
"""

from __future__ import annotations

import torch
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

SWITCH_BASE_EXPERTS = (8, 16, 32, 64, 128, 256)

# Paper Table 2 (GiB, fp32): whole model, MoE part. Used to check the shapes, see tests/bench/test_switch_shapes.py.
PAPER_TABLE2_GIB = {8: (2.298, 1.7932), 64: (14.112, 13.608), 128: (27.614, 27.11), 256: (54.62, 54.114)}


def switch_base_config(num_experts: int) -> SwitchTransformersConfig:
    """The published switch-base-N configuration (N experts per MoE layer)."""
    if num_experts not in SWITCH_BASE_EXPERTS:
        raise ValueError(f"switch-base-{num_experts} does not exist; choose from {SWITCH_BASE_EXPERTS}")
    return SwitchTransformersConfig(
        vocab_size=32128,
        d_model=768,
        d_ff=3072,
        d_kv=64,
        num_heads=12,
        num_layers=12,
        num_decoder_layers=12,
        num_sparse_encoder_layers=6,
        num_sparse_decoder_layers=6,
        num_experts=num_experts,
        expert_capacity=64,
        router_bias=False,
        dense_act_fn="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
    )


def switch_base_model(
    num_experts: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SwitchTransformersForConditionalGeneration:
    """A randomly initialised switch-base-N; `device="meta"` gives the shapes without allocating memory."""
    config = switch_base_config(num_experts)
    with torch.device(device):
        model = SwitchTransformersForConditionalGeneration(config)
    return model.to(dtype).eval()
