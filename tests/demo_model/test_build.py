"""The demo model's recipe and the shipped artifact: label tokens, router losses, accuracy and routing spread."""

import pytest
import torch

from sida.demo_model.encoder_routing import balanced_assignment
from sida.demo_model.recipe import DemoRecipe, make_config, new_model
from sida.demo_model.tokenizer import train_tokenizer
from sida.offload.tasks import LABEL_WORDS
from tests.conftest import TINY_TEXTS


def test_label_words_are_single_tokens_in_shipped_tokenizer(demo_loaded):
    tok = demo_loaded.tokenizer
    for word in LABEL_WORDS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    # and inside a sentence too
    ids = tok("the answer is positive", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("positive") in ids


def test_tokenizer_round_trips_ptb_and_raw_text(demo_loaded):
    tok = demo_loaded.tokenizer
    assert tok.decode(tok("it 's a charming journey .")["input_ids"], skip_special_tokens=True) == (
        "it 's a charming journey ."
    )
    ids = tok("It's GREAT, isn't it?")["input_ids"]
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id


def test_sparse_blocks_and_nonzero_router_losses_during_training():
    """v5 computes aux/z losses only when not every block is sparse; both must be live in the recipe."""
    tok = train_tokenizer(TINY_TEXTS, vocab_size=300)
    recipe = DemoRecipe(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=4, num_sparse_layers=2, num_experts=4)
    config = make_config(recipe, tok.get_vocab_size())
    assert config.decoder_start_token_id == 0 and config.pad_token_id == 0 and config.eos_token_id == 1
    model = new_model(config, recipe.router_init_std)
    sparse = [i for i, b in enumerate(model.encoder.block) if b.is_sparse]
    assert sparse == [1, 3] and [i for i, b in enumerate(model.decoder.block) if b.is_sparse] == [1, 3]
    router = model.encoder.block[1].layer[-1].mlp.router.classifier.weight
    assert router.std().item() < 0.05  # re-initialised, not the library's std 1.0
    model.train()
    enc = torch.tensor([tok.encode(t).ids for t in TINY_TEXTS[:4] if len(tok.encode(t).ids) >= 8][:2])[:, :8]
    out = model(input_ids=enc, labels=enc[:, :4].contiguous(), output_router_logits=True)
    for name in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        assert float(getattr(out, name).detach()) > 0, name
    out.loss.backward()
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_demo_model_shape(demo_loaded):
    c = demo_loaded.config
    layers = demo_loaded.adapter.moe_layers(demo_loaded.model)
    assert c.num_experts == 16
    assert [la.stack for la in layers] == ["encoder", "encoder", "decoder", "decoder"]
    size = sum(f.stat().st_size for f in demo_loaded.path.iterdir() if f.is_file())
    assert size <= 25 * 1024 * 1024


@pytest.mark.slow
def test_demo_model_sst2_dev_accuracy(demo_loaded, data_dir):
    from sida.offload.runner import Runner
    from sida.offload.task_accuracy import evaluate

    result = evaluate(Runner(demo_loaded), "sst2", data_dir / "sst2" / "dev.tsv", progress=False)
    assert result.examples == 872
    assert result.accuracy >= 0.80


@pytest.mark.slow
def test_demo_routers_spread(demo_loaded, data_dir):
    """Every expert used and none over half the tokens: encoder layers on SST-2 dev (decoder layers, on
    WikiText-2 continuations, below)."""
    from sida.demo_model.card import routing_report
    from sida.offload.runner import Runner
    from sida.offload.tasks import get_task
    from sida.predictor.traces import classification_batches

    runner = Runner(demo_loaded)
    prompts = [e.prompt for e in get_task("sst2").read(data_dir / "sst2" / "dev.tsv")]
    enc = routing_report(demo_loaded, classification_batches(runner, prompts))
    for r in enc.values():
        if r["stack"] == "encoder":
            assert r["experts_used"] == 16 and r["max_share"] < 0.5, r


@pytest.mark.slow
def test_demo_decoder_routers_spread(demo_loaded, data_dir):
    """Decoder layers on WikiText-2 continuations (text never trained on): every expert used (the respread stage
    splits busy experts into idle ones) and none over half the tokens."""
    from sida.demo_model.card import routing_report
    from sida.offload.runner import Runner
    from sida.predictor.corpora import read_wikitext_paragraphs
    from sida.predictor.traces import lm_batches

    runner = Runner(demo_loaded)
    # decoder layers see one token per SST-2 example; they are measured on multi-token continuations
    wiki = read_wikitext_paragraphs(data_dir / "wikitext2" / "wiki.valid.tokens", 200)
    for r in routing_report(demo_loaded, lm_batches(runner, wiki)).values():
        if r["stack"] == "decoder":
            assert r["experts_used"] == 16 and r["max_share"] < 0.5, r


def test_balanced_assignment_follows_scores_within_slack():
    """Stage 3's per-token targets: argmax of the mean router logits, shifted per expert until loads are
    within the slack; tokens never seen get no target."""
    g = torch.Generator().manual_seed(0)
    vocab, experts = 400, 8
    counts = torch.randint(1, 50, (vocab, experts), generator=g)
    counts[-10:] = 0  # unseen
    scores = torch.randn(vocab, experts, generator=g)
    sums = scores * counts.sum(1, keepdim=True)
    # already balanced preferences: the assignment is the plain argmax
    target = balanced_assignment(counts, sums, slack=2.0)
    assert (target[-10:] == -1).all()
    assert torch.equal(target[:-10], scores[:-10].argmax(1))
    # every token prefers expert 0: the offsets spread them, each expert within [1/slack, slack] of its share
    skewed = sums.clone()
    skewed[:, 0] += 3 * counts.sum(1)
    target = balanced_assignment(counts, skewed, slack=1.3)
    freq = counts.sum(1).double()
    load = torch.bincount(target[:-10], weights=freq[:-10], minlength=experts) / freq.sum() * experts
    assert load.max() <= 1.3 and load.min() >= 1 / 1.3, load


def _data_slice(data_dir, out, lines: dict[str, int]):
    """The first lines of each training file of `data_dir` (header included), laid out as `data_dir` is."""
    for rel, n in lines.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with (data_dir / rel).open(encoding="utf-8") as f:
            (out / rel).write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
    return out


@pytest.mark.slow
def test_lm_stage_trains_the_decoder_alone(tmp_path, tiny_dir, data_dir):
    """Stage 5 trains the decoder and the shared embedding (the encoder's blocks byte-equal), the output layer stays
    tied to the embedding, and the kept checkpoint continues held-out text better than the start."""
    import shutil

    from sida.demo_model.recipe import load_checkpoint
    from sida.demo_model.stages import lm

    files = {"sst2/train.tsv": 200, "mrpc/train.tsv": 40, "c4_sample/c4_sample.jsonl": 16, "multirc/train.jsonl": 2}
    data = _data_slice(data_dir, tmp_path / "data", files)
    out = shutil.copytree(tiny_dir, tmp_path / "model")
    recipe = DemoRecipe(heldout=40, batch_size=16, lm_epochs=1.0, lm_passes=1, lm_heldout_docs=3, lm_sst2_rows=60)
    recipe = DemoRecipe(**{**recipe.__dict__, "lm_acc_drop": 1.0, "lm_lr": 3e-3})  # any accuracy: a tiny random model
    before = load_checkpoint(out).state_dict()
    report = lm(data, out, recipe, log=lambda *_: None)
    after = load_checkpoint(out).state_dict()
    frozen = [k for k in before if k.startswith(("encoder.block.", "encoder.final_layer_norm."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder.block."))
    assert not torch.equal(before["shared.weight"], after["shared.weight"])
    model = load_checkpoint(out)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.shared.weight
    assert report["final"]["heldout_lm_loss"] < report["start"]["heldout_lm_loss"]


def test_build_demo_runs_stage5_only_when_asked(tmp_path, monkeypatch):
    """`--stage lm` runs stage 5 alone over --out; `--stage respread` (and `all`) stop at stage 4."""
    import json

    from sida.demo_model import build

    ran: list[str] = []
    fake = [(key, name, lambda *a, key=key: ran.append(key) or {"best": {}}) for key, name, _ in build.LATER_STAGES]
    monkeypatch.setattr(build, "LATER_STAGES", fake)
    monkeypatch.setattr(build, "OPTIONAL_STAGES", [("stage5", "lm", lambda *a: ran.append("stage5") or {"best": {}})])
    monkeypatch.setattr(build, "finalize", lambda out, reports, recipe: ran.append("finalize"))
    (tmp_path / "training.json").write_text(json.dumps({"recipe": {}, "stage1": {"best": {}}}))
    build.main(["--stage", "lm", "--out", str(tmp_path), "--torch-threads", "1"])
    assert ran == ["stage5", "finalize"]
    ran.clear()
    build.main(["--stage", "respread", "--out", str(tmp_path), "--torch-threads", "1"])
    assert ran == ["stage4", "finalize"]
