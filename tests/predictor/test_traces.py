import torch

from sida.offload.model_loader import load_model
from sida.predictor.traces import collect_traces, load_traces, save_traces, verify_alignment
from tests.conftest import TINY_TEXTS

INPUTS = list(dict.fromkeys(TINY_TEXTS)) + ["a b c", "the movie was good , really good , very good ."]


def test_rows_are_the_inputs_in_order(tiny8_dir):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, INPUTS, top_t=30, batch_size=2)
    assert len(traces) == len(INPUTS) and traces.layers == [0]
    assert traces.top_idx[0].shape[-1] == 8  # T clipped to the number of experts
    for i in (0, 3, len(INPUTS) - 1):
        single = collect_traces(loaded, [INPUTS[i]])
        n = int(single.attention_mask.sum())
        assert int(traces.attention_mask[i].sum()) == n
        assert torch.equal(traces.input_ids[i, :n], single.input_ids[0, :n])
        assert torch.equal(traces.top_idx[0][i, :n, 0], single.top_idx[0][0, :n, 0])
    probs = traces.top_prob[0].float()
    assert (probs[..., :-1] >= probs[..., 1:]).all()  # best first


def test_save_load_round_trip(tiny8_dir, tmp_path):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, INPUTS)
    save_traces(traces, tmp_path / "t.safetensors")
    back = load_traces(tmp_path / "t.safetensors")
    assert torch.equal(back.input_ids, traces.input_ids) and torch.equal(back.top_idx[0], traces.top_idx[0])
    assert back.fingerprint == loaded.fingerprint


def test_misaligned_traces_are_detected(tiny8_dir):
    loaded = load_model(tiny8_dir)
    traces = collect_traces(loaded, INPUTS * 3)
    assert verify_alignment(loaded, traces, rows=8) > 0.99
    perm = torch.roll(torch.arange(len(traces)), 1)  # tokens paired with the previous row's routing
    traces.input_ids, traces.attention_mask = traces.input_ids[perm], traces.attention_mask[perm]
    assert verify_alignment(loaded, traces, rows=8) < 0.9


def _tiny_olmoe():
    """A random 2-layer OLMoE causal LM (hidden 32, 4 experts, top-2) and a real tokenizer."""
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    from sida.demo_model.tokenizer import EOS, PAD, UNK, train_tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(TINY_TEXTS, vocab_size=300), pad_token=PAD, eos_token=EOS, unk_token=UNK
    )
    config = OlmoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return OlmoeForCausalLM(config).eval(), tok


def test_lm_traces_align_with_real_tokens_and_drop_padding():
    """Each row is one text's tokens in order; its routing is what each layer's router computes on that text alone
    (MoE layer i = the model's i-th layer); padded positions hold zeros."""
    from sida.predictor.traces import collect_lm_traces

    model, tok = _tiny_olmoe()
    traces = collect_lm_traces(model, tok, INPUTS, "fp", top_t=30, batch_size=3)
    assert len(traces) == len(INPUTS) and traces.layers == [0, 1] and traces.fingerprint == "fp"
    assert traces.top_idx[0].shape[-1] == 4  # T clipped to the number of experts
    lengths = [len(ids) for ids in tok(INPUTS)["input_ids"]]
    assert traces.attention_mask.sum(1).tolist() == lengths
    captured = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0]))
    for row in (0, 3, len(INPUTS) - 2, len(INPUTS) - 1):
        ids = tok(INPUTS[row], return_tensors="pt")["input_ids"]  # [1, n]
        n = ids.shape[1]
        assert torch.equal(traces.input_ids[row, :n], ids[0]) and not traces.input_ids[row, n:].any()
        with torch.no_grad():
            model(input_ids=ids)
        for layer in (0, 1):
            probs = captured[layer].softmax(-1)  # [n, E] the router of model layer `layer`, this text alone
            top = probs.topk(4, dim=-1)
            assert torch.equal(traces.top_idx[layer][row, :n], top.indices)
            assert torch.allclose(traces.top_prob[layer][row, :n], top.values, atol=1e-5)
            assert not traces.top_idx[layer][row, n:].any() and not traces.top_prob[layer][row, n:].any()


def test_lm_traces_cut_long_texts():
    from sida.predictor.traces import collect_lm_traces

    model, tok = _tiny_olmoe()
    traces = collect_lm_traces(model, tok, [" ".join(TINY_TEXTS[:6]), "a b c"], "fp", max_tokens=16)
    assert traces.attention_mask.sum(1).tolist() == [16, len(tok("a b c")["input_ids"])]
