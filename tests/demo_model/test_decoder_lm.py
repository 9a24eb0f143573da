"""The decoder-only MoE demo model: the builder end to end on a tiny config, and the shipped models/sida-olmoe-demo."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sida.demo_model.decoder_card import label_accuracy, lm_blocks, lm_loss, routing_figures, wikitext_split
from sida.offload.model_loader import fingerprint
from sida.offload.tasks import LABEL_WORDS, TASKS
from sida.predictor.artifact import load_predictor
from sida.predictor.traces import collect_lm_traces
from sida.predictor.train import hit_rates

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "sida-olmoe-demo"
SWITCH = REPO / "models" / "sida-switch-demo"
SLICE = {
    "sst2/train.tsv": 200,
    "sst2/dev.tsv": 40,
    "mrpc/train.tsv": 30,
    "mrpc/dev.tsv": 20,
    "c4_sample/c4_sample.jsonl": 8,
    "multirc/train.jsonl": 1,
    "wikitext2/wiki.valid.tokens": 140,  # 3 articles
}


@contextmanager
def torch_threads(n: int):
    """One torch thread inside the block (the builder's setting), the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _data_slice(data_dir: Path, out: Path) -> Path:
    """The first lines of each file the builder reads, laid out as the shared data folder is."""
    for rel, n in SLICE.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with (data_dir / rel).open(encoding="utf-8") as f:
            (out / rel).write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
    return out


def _load(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, data_dir):
    """The builder run end to end (train, save, predictor, card) on a data slice, a tiny config and 20 steps."""
    from sida.demo_model.decoder_lm import OlmoeRecipe, build

    tmp = tmp_path_factory.mktemp("olmoe")
    data = _data_slice(data_dir, tmp / "data")
    recipe = OlmoeRecipe(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_experts=4,
        block_tokens=64,
        lm_batch=8,
        cls_batch=16,
        max_steps=20,
        warmup_steps=5,
        wiki_heldout_articles=1,
        val_c4_docs=2,
        val_sst2_rows=20,
        predictor_sst2_rows=40,
        predictor_epochs=1,
    )
    with torch_threads(1):
        card = build(data, tmp / "model", recipe, tmp / "work", SWITCH, log=lambda *_: None)
    return tmp / "model", data, recipe, card


def test_builder_saves_an_fp16_olmoe_with_every_layer_moe(tiny_build):
    out, _, recipe, _ = tiny_build
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["architectures"] == ["OlmoeForCausalLM"]
    assert config["num_experts"] == 4 and config["num_experts_per_tok"] == 2 and config["num_hidden_layers"] == 2
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 1, 1)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    model, _ = _load(out)
    assert all(type(layer.mlp).__name__ == "OlmoeSparseMoeBlock" for layer in model.model.layers)
    training = json.loads((out / "training.json").read_text())
    assert training["training"]["step"] == recipe.max_steps and training["training"]["history"]


def test_tokenizer_reads_a_prompt_bos_first_with_single_token_labels(tiny_build):
    _, tok = _load(tiny_build[0])
    ids = tok("sst2 sentence: a gorgeous movie .")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    for word in LABEL_WORDS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_card_figures_are_measured(tiny_build):
    """Each card figure is recomputed here by a different path (unbatched, the library's own loss) and agrees."""
    out, data, recipe, card = tiny_build
    model, tok = _load(out)
    dev = TASKS["sst2"].read(data / "sst2" / "dev.tsv")
    one_by_one = sum(label_accuracy(model, tok, [e], "sst2", recipe.block_tokens) for e in dev) / len(dev)
    assert card["sst2_dev_accuracy"] == round(one_by_one, 4)
    _, wiki = wikitext_split(data / "wikitext2" / "wiki.valid.tokens", recipe.wiki_heldout_articles)
    blocks = lm_blocks(tok, wiki, recipe.block_tokens)
    with torch.no_grad():
        library = model(input_ids=blocks, labels=blocks).loss
    assert card["heldout"]["wikitext_loss"] == pytest.approx(float(library), abs=2e-4)
    assert card["heldout"]["wikitext_tokens"] == blocks[:, 1:].numel()
    for layer in card["routing_wikitext_heldout"].values():
        assert sum(layer["slot_share"]) == pytest.approx(1.0, abs=1e-3)
        assert sum(layer["top1_counts"]) == layer["tokens"]
    traces = collect_lm_traces(model, tok, wiki, fingerprint(out), top_t=4, max_tokens=recipe.block_tokens)
    pred, meta = load_predictor(out / "predictor", card["fingerprint"])
    rates = hit_rates(pred, traces, ks=(1, 2, 3))
    assert card["predictor_wikitext_heldout"]["top1_hit_rate"] == round(rates["top1_hit_rate"], 4)
    assert meta["model_fingerprint"] == fingerprint(out) == card["fingerprint"]
    readme = (out / "README.md").read_text()
    assert f"{card['sst2_dev_accuracy']:.4f}" in readme and f"{card['heldout']['wikitext_loss']:.3f}" in readme


def test_heldout_articles_are_never_trained_on(tiny_build, data_dir):
    from sida.demo_model.decoder_lm import read_data

    out, data, recipe, _ = tiny_build
    _, tok = _load(out)
    train, held = wikitext_split(data / "wikitext2" / "wiki.valid.tokens", recipe.wiki_heldout_articles)
    assert held and train and not set(train) & set(held)
    rows = read_data(data, tok, recipe).lm.flatten().tolist()
    text = f" {' '.join(map(str, rows))} "

    def words(paragraph: str) -> str:
        return f" {' '.join(map(str, tok(paragraph, add_special_tokens=False)['input_ids'][:12]))} "

    assert words(train[0]) in text  # the check can find a paragraph
    assert not any(words(p) in text for p in held)


def test_training_resumes_from_its_checkpoint(tiny_build):
    """A second run of the same recipe picks up the finished run's checkpoint: no step is redone, and the weights
    are the ones saved (up to fp16 rounding)."""
    from sida.demo_model.decoder_lm import make_model, read_data, train_model

    out, data, recipe, _ = tiny_build
    saved, tok = _load(out)
    model = make_model(recipe, tok)
    with torch_threads(1):
        state = train_model(model, tok, read_data(data, tok, recipe), recipe, out.parent / "work", log=lambda *_: None)
    assert state["step"] == recipe.max_steps
    weight = model.model.layers[0].mlp.experts.down_proj
    assert torch.allclose(weight, saved.model.layers[0].mlp.experts.down_proj, atol=1e-3)


# ------------------------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def shipped():
    """The shipped model, its tokenizer and card.json; the tests run on one thread, as the card was measured."""
    assert (SHIPPED / "config.json").is_file(), f"{SHIPPED} missing: python -m sida.demo_model.decoder_lm"
    model = AutoModelForCausalLM.from_pretrained(SHIPPED, local_files_only=True, dtype=torch.float32).eval()
    card = json.loads((SHIPPED / "card.json").read_text())
    with torch_threads(1):
        yield model, AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True), card


def test_shipped_model_loads_and_fits(shipped):
    model, tok, card = shipped
    assert type(model).__name__ == "OlmoeForCausalLM" and model.config.model_type == "olmoe"
    assert model.config.num_experts == 16 and model.config.num_experts_per_tok == 2
    assert all(type(layer.mlp).__name__ == "OlmoeSparseMoeBlock" for layer in model.model.layers)
    assert len(tok) == model.config.vocab_size
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 30 * 1024 * 1024
    assert card["fingerprint"] == fingerprint(SHIPPED)
    predictor = json.loads((SHIPPED / "predictor" / "predictor.json").read_text())
    assert predictor["model_fingerprint"] == card["fingerprint"]


def test_shipped_card_matches_a_recomputation(shipped, data_dir):
    """Routing on a slice of the held-out paragraphs agrees with card.json where a slice can: the same held-out
    split, router confidence close to the whole set's, and every expert the slice uses used in the whole set."""
    model, tok, card = shipped
    recipe = json.loads((SHIPPED / "training.json").read_text())["recipe"]
    _, wiki = wikitext_split(data_dir / "wikitext2" / "wiki.valid.tokens", recipe["wiki_heldout_articles"])
    assert card["heldout"]["wikitext_paragraphs"] == len(wiki)
    traces = collect_lm_traces(model, tok, wiki[:40], card["fingerprint"], top_t=16, max_tokens=recipe["block_tokens"])
    for layer, figures in routing_figures(traces, 16, 2).items():
        full = card["routing_wikitext_heldout"][layer]
        assert abs(figures["mean_top1_prob"] - full["mean_top1_prob"]) < 0.05
        assert full["experts_unused"] <= figures["experts_unused"]  # the whole set uses every expert the slice does


@pytest.mark.slow
def test_shipped_card_figures_match_a_full_recomputation(shipped, data_dir):
    """SST-2 dev accuracy and the held-out WikiText loss, recomputed on the whole sets, equal card.json's."""
    model, tok, card = shipped
    recipe = json.loads((SHIPPED / "training.json").read_text())["recipe"]
    dev = TASKS["sst2"].read(data_dir / "sst2" / "dev.tsv")
    assert card["sst2_dev_accuracy"] == round(label_accuracy(model, tok, dev, "sst2", recipe["block_tokens"]), 4)
    _, wiki = wikitext_split(data_dir / "wikitext2" / "wiki.valid.tokens", recipe["wiki_heldout_articles"])
    loss, tokens = lm_loss(model, lm_blocks(tok, wiki, recipe["block_tokens"]))
    assert tokens == card["heldout"]["wikitext_tokens"] and round(loss, 4) == card["heldout"]["wikitext_loss"]
