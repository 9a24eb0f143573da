"""Shared fixtures: the shared data folder, the shipped demo model, and a tiny random Switch model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
DEMO = REPO / "models" / "sida-switch-demo"

TINY_TEXTS = [
    "sst2 sentence: a gorgeous , witty , seductive movie .",
    "sst2 sentence: the plot is nothing but boilerplate clichés .",
    "mrpc sentence1: the cat sat on the mat . sentence2: a cat was sitting on the mat .",
    "the city council voted on tuesday to approve the new budget for schools and roads .",
] * 20


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA / "sst2" / "dev.tsv").is_file(), f"shared data not found at {DATA} (the repo expects ../shared/data)"
    return DATA


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    assert (DEMO / "config.json").is_file(), f"demo model missing at {DEMO}; rebuild with `make demo-model`"
    return DEMO


@pytest.fixture(scope="session")
def demo_loaded(demo_dir):
    from sida.offload.model_loader import load_model

    return load_model(demo_dir)


def make_tiny_switch(
    out: Path, num_experts: int = 4, seed: int = 0, expert_capacity: int = 256, d_ff: int = 64
) -> Path:
    """A randomly initialised 2+2-block Switch model (one MoE block per stack) with a real tokenizer."""
    from sida.demo_model.recipe import DemoRecipe, make_config, new_model
    from sida.demo_model.tokenizer import save_tokenizer, train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(TINY_TEXTS, vocab_size=300)
    recipe = DemoRecipe(
        d_model=32,
        d_ff=d_ff,
        num_heads=2,
        d_kv=16,
        num_layers=2,
        num_sparse_layers=1,
        num_experts=num_experts,
        expert_capacity=expert_capacity,
    )
    config = make_config(recipe, tok.get_vocab_size())
    model = new_model(config, recipe.router_init_std)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out, model_max_length=128)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_switch(tmp_path_factory.mktemp("tiny-switch"))


@pytest.fixture(scope="session")
def tiny8_dir(tmp_path_factory) -> Path:
    """8 experts and an expert capacity of 3 tokens per sequence, so that capacity drops really happen."""
    return make_tiny_switch(tmp_path_factory.mktemp("tiny8-switch"), num_experts=8, seed=1, expert_capacity=3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
