"""The demo model's hyper-parameters and the creation of a fresh Switch encoder-decoder from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from sida.offload.tasks import TASKS


@dataclass(frozen=True)
class DemoRecipe:
    """Every hyper-parameter of the demo model and of its four training stages (recorded in training.json)."""

    vocab_size: int = 8000
    d_model: int = 128
    d_ff: int = 512
    num_heads: int = 4
    d_kv: int = 32
    num_layers: int = 4
    num_sparse_layers: int = 2  # per stack: blocks 1 and 3 of 4
    num_experts: int = 16
    expert_capacity: int = 256
    max_input_tokens: int = 128
    router_init_std: float = 0.02  # the library's std 1.0 makes small routers collapse
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    dropout: float = 0.1
    lr: float = 4e-4
    warmup_steps: int = 300
    weight_decay: float = 0.01
    batch_size: int = 64
    epochs: int = 6
    ema_decay: float = 0.999
    heldout: int = 1000  # SST-2 train rows held out for checkpoint choice
    lm_prefix: tuple[int, int] = (16, 64)  # prefix-LM: shortest and longest prefix, in tokens
    lm_target: int = 32  # prefix-LM: tokens to predict after the prefix
    evals_per_epoch: int = 2
    revive_epochs: float = 0.5  # stage 2: fine-tune after splitting unused decoder experts
    revive_lr: float = 1e-4
    # stage 3: each token routed to one expert per encoder layer, whatever its context; one epoch per round, each
    # round's coefficient of the routers' cross-entropy against the token's assigned expert
    consistent_weights: tuple[float, ...] = (0.3, 1.0, 2.0)
    consistent_lr: float = 2e-4
    consistent_slack: float = 1.3  # an expert's share of token occurrences in the assignment: at most slack / E
    consistent_sequences: int = 20000  # sequences whose routing is counted to seed the assignment
    consistent_refresh: int = 150  # steps between re-counts of the routing (on a quarter as many sequences)
    # stage 5: the decoder and the shared embedding (the output layer too) learn to continue text, the encoder's
    # blocks frozen, on C4 and MultiRC passages cut `lm_passes` times at random, with classification rows mixed in
    # so that the label step keeps its accuracy
    lm_epochs: float = 2.5
    lm_lr: float = 2e-3
    lm_passes: int = 6
    lm_short_prefix: tuple[int, int] = (4, 64)  # prompts of a few words must work too
    lm_heldout_docs: int = 50  # the last C4 documents, kept out of training to choose the checkpoint
    lm_sst2_rows: int = 70000  # all of them
    lm_acc_drop: float = 0.005  # a checkpoint may not lose more held-out accuracy than this
    seed: int = 0


def make_config(recipe: DemoRecipe, vocab_size: int) -> SwitchTransformersConfig:
    """The Switch config of `recipe`; pad and decoder start are id 0, EOS id 1, and the task labels ride along."""
    config = SwitchTransformersConfig(
        vocab_size=vocab_size,
        d_model=recipe.d_model,
        d_ff=recipe.d_ff,
        d_kv=recipe.d_kv,
        num_heads=recipe.num_heads,
        num_layers=recipe.num_layers,
        num_decoder_layers=recipe.num_layers,
        num_sparse_encoder_layers=recipe.num_sparse_layers,
        num_sparse_decoder_layers=recipe.num_sparse_layers,
        num_experts=recipe.num_experts,
        expert_capacity=recipe.expert_capacity,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        router_z_loss_coef=recipe.router_z_loss_coef,
        dropout_rate=recipe.dropout,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
    )
    config.sida_labels = {name: list(task.labels) for name, task in TASKS.items()}
    return config


def new_model(config: SwitchTransformersConfig, router_init_std: float) -> SwitchTransformersForConditionalGeneration:
    """A randomly initialised model whose router weights are re-drawn with std `router_init_std`."""
    model = SwitchTransformersForConditionalGeneration(config)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SwitchTransformersTop1Router":
                module.classifier.weight.normal_(0.0, router_init_std)
    return model


def load_checkpoint(model_dir) -> SwitchTransformersForConditionalGeneration:
    """The model saved in `model_dir`, in fp32 (the shipped fp16 weights are trained on in fp32)."""
    return SwitchTransformersForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
