"""The oracle hash function: the router's own choices, from an untouched copy of the model.

A perfect predictor, for tests and as the upper bound in benchmarks. It costs a full forward, so it
is never a serving option. Decoder positions are those of the decoder inputs it is given.
"""

from __future__ import annotations

import torch

from sida.offload.adapters import capture_routing
from sida.offload.hash_table import HashTable
from sida.offload.model_loader import LoadedModel


class OracleHash:
    """A `HashFunction` (offload/contracts.py): encoder inputs [batch, seq] and decoder inputs [batch, steps] →
    the router's own top-k of every MoE layer as a HashTable."""

    def __init__(self, resident: LoadedModel, k: int = 3):
        self.loaded = resident
        self.layers = resident.adapter.moe_layers(resident.model)
        self.k = k

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, decoder_input_ids=None) -> HashTable:
        """One full forward of the resident model, its routers' choices recorded (the router's softmax ranking:
        DeepSeek-V3's bias-corrected choice can differ from it)."""
        extra = {} if decoder_input_ids is None else {"decoder_input_ids": decoder_input_ids}
        with capture_routing(self.layers) as cap:
            self.loaded.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        logits = {i: records[0].logits for i, records in cap.records.items()}  # [batch, seq, experts] each
        return HashTable.from_router_logits(logits, self.k)
