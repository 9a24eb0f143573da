import pytest

from bench.switch_shapes import PAPER_TABLE2_GIB, switch_base_config, switch_base_model
from sida.offload.adapters import SwitchAdapter


@pytest.mark.parametrize("n", sorted(PAPER_TABLE2_GIB))
def test_switch_base_shapes_match_published_sizes(n):
    model = switch_base_model(n, device="meta")  # shapes only, no memory
    layers = SwitchAdapter().moe_layers(model)
    assert [la.block for la in layers] == [1, 3, 5, 7, 9, 11] * 2
    experts = sum(p.numel() for la in layers for e in la.experts for p in e.parameters())
    assert experts == 12 * n * 2 * 768 * 3072  # wi [3072, 768] + wo [768, 3072] per expert
    total_gib = sum(p.numel() for p in model.parameters()) * 4 / 2**30
    assert total_gib == pytest.approx(PAPER_TABLE2_GIB[n][0], rel=0.005)  # paper Table 2, whole model


def test_known_published_config_values():
    c = switch_base_config(128)
    assert (c.d_model, c.d_ff, c.d_kv, c.num_heads, c.num_layers, c.num_decoder_layers) == (768, 3072, 64, 12, 12, 12)
    assert (c.vocab_size, c.expert_capacity, c.num_experts) == (32128, 64, 128)


def test_unknown_size():
    with pytest.raises(ValueError, match="switch-base-7 does not exist"):
        switch_base_config(7)
