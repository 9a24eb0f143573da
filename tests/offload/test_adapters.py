"""The adapter is the one place that knows HF Switch internals; these tests break when those move."""

import torch

from sida.offload.adapters import adapter_for, capture_routing
from sida.offload.model_loader import load_model


def test_switch_layers_found(tiny_dir):
    loaded = load_model(tiny_dir)
    layers = loaded.adapter.moe_layers(loaded.model)
    # 2+2 blocks with one sparse block per stack: block 1 of each (the library's `i % step == 1` rule)
    assert [(la.index, la.stack, la.block) for la in layers] == [(0, "encoder", 1), (1, "decoder", 1)]
    assert layers[0].name == "encoder.block.1.layer.1.mlp"
    assert loaded.model.get_submodule(layers[1].name) is layers[1].mlp
    assert len(layers[0].experts) == 4
    assert layers[0].router.classifier.weight.shape == (4, 32)
    assert loaded.adapter.embeddings(loaded.model).weight.shape[1] == 32


def test_dense_blocks_are_not_reported(tiny_dir):
    loaded = load_model(tiny_dir)
    names = {la.name for la in loaded.adapter.moe_layers(loaded.model)}
    assert not any(n.startswith("encoder.block.0") or n.startswith("decoder.block.0") for n in names)


def test_capture_matches_router_logits_output(tiny_dir):
    loaded = load_model(tiny_dir)
    tok = loaded.tokenizer
    enc = tok(["a gorgeous , witty movie .", "the plot is nothing"], padding=True, return_tensors="pt")
    dec = torch.zeros((2, 3), dtype=torch.long)
    layers = loaded.adapter.moe_layers(loaded.model)
    with torch.no_grad(), capture_routing(layers) as cap:
        out = loaded.model(**enc, decoder_input_ids=dec, output_router_logits=True)
    (enc_rec,) = cap.records[0]
    (dec_rec,) = cap.records[1]
    enc_logits = out.encoder_router_logits
    enc_logits = enc_logits[0] if isinstance(enc_logits, tuple) else enc_logits
    torch.testing.assert_close(enc_rec.logits, enc_logits.float())
    assert enc_rec.expert.shape == enc["input_ids"].shape and dec_rec.expert.shape == (2, 3)
    assert torch.equal(enc_rec.expert, enc_rec.logits.argmax(-1))


def test_hooks_are_removed(tiny_dir):
    loaded = load_model(tiny_dir)
    layers = loaded.adapter.moe_layers(loaded.model)
    with capture_routing(layers):
        pass
    assert all(not la.router._forward_hooks for la in layers)


def test_unknown_family():
    import pytest

    with pytest.raises(ValueError, match="unsupported model_type 'resnet'"):
        adapter_for("resnet")  # not a causal LM: no experts interface to plug into
    assert adapter_for("mixtral").family == "mixtral"  # a causal LM: its modules say whether it has MoE layers
