"""Router traces: which expert each *real* token went to in each MoE layer, aligned with its token.

Padding is dropped here, once (the paper's code counted it). Rows come out in (sequence, position)
order of the batch that produced them, so a trace row and its token never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.adapters import capture_routing
from offload.model_loader import LoadedModel


@dataclass
class LayerTrace:
    layer: int  # MoE layer index (encoder first)
    stack: str  # "encoder" | "decoder"
    expert: torch.Tensor  # [real_tokens] the router's top-1 expert
    top_prob: torch.Tensor  # [real_tokens] its router probability
    margin: torch.Tensor  # [real_tokens] top-1 minus top-2 probability


@torch.inference_mode()
def trace_batch(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    decoder_attention_mask: torch.Tensor,
) -> list[LayerTrace]:
    """One teacher-forced forward; the router decisions of every MoE layer for the unpadded tokens."""
    layers = loaded.adapter.moe_layers(loaded.model)
    with capture_routing(layers) as cap:
        loaded.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        )
    traces = []
    for layer in layers:
        (record,) = cap.records[layer.index]  # one call per layer in a single forward
        mask = (attention_mask if layer.stack == "encoder" else decoder_attention_mask).bool()
        top2 = record.logits.softmax(-1).topk(2, dim=-1).values  # [batch, seq, 2]
        traces.append(
            LayerTrace(
                layer.index,
                layer.stack,
                record.expert[mask],
                record.top_prob[mask],
                (top2[..., 0] - top2[..., 1])[mask],
            )
        )
    return traces


def expert_usage(traces: list[list[LayerTrace]], num_experts: int) -> dict[int, torch.Tensor]:
    """Token counts per expert, per MoE layer, summed over batches of traces."""
    usage: dict[int, torch.Tensor] = {}
    for batch in traces:
        for t in batch:
            counts = torch.bincount(t.expert, minlength=num_experts)
            usage[t.layer] = usage.get(t.layer, torch.zeros(num_experts, dtype=torch.long)) + counts
    return usage
