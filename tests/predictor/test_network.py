import pytest
import torch

from sida.predictor.network import HashPredictor, PredictorArch


def make(hidden=32):
    torch.manual_seed(0)
    return HashPredictor(PredictorArch(vocab_size=50, d_embed=16, num_experts=8, layers=(0, 1), hidden=hidden)).eval()


def batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [3, 4, 5, 6, 7, 8, 9]])
    return ids, (ids != 0).long()


def test_sparsemax_attention_is_a_sparse_distribution_over_real_tokens():
    pred = make()
    ids, mask = batch()
    x = pred.proj(pred.embed(ids))
    w = pred.attention_weights(x * 5, mask)  # scaled so that the projection really cuts
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 7))
    assert (w[0, :, 5:] == 0).all()  # padding gets no weight
    assert (w == 0).any()  # sparse, unlike softmax
    assert (w >= 0).all()


def test_shapes_and_padding_does_not_leak():
    pred = make()
    ids, mask = batch()
    with torch.no_grad():
        out = pred(ids, mask)
        alone = pred(ids[:1, :5], mask[:1, :5])
    assert out.shape == (2, 2, 7, 8)
    torch.testing.assert_close(out[:, 0, :5], alone[:, 0], rtol=1e-5, atol=1e-5)


def test_embeddings_are_frozen():
    pred = make()
    assert not pred.embed.weight.requires_grad
    ids, mask = batch()
    pred.train()
    pred(ids, mask).sum().backward()
    assert pred.embed.weight.grad is None and pred.proj.weight.grad is not None


def test_the_unpacked_lstm_computes_what_the_packed_bidirectional_lstm_computes():
    pred = make()
    torch.manual_seed(1)
    lengths = torch.tensor([7, 3, 5, 1])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    x = torch.randn(4, 7, 32)
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        ref, _ = torch.nn.utils.rnn.pad_packed_sequence(pred.lstm(packed)[0], batch_first=True, total_length=7)
        torch.testing.assert_close(pred.encode(x, mask), ref, rtol=1e-5, atol=1e-6)
    assert set(pred.state_dict()) == set(make().state_dict())  # the direction views add no parameters
    assert not any("_directions" in k for k in pred.state_dict())


def test_small_support_sparsemax_equals_the_package():
    """The inference path's top-k sparsemax gives the package's numbers, including rows whose support is wider
    than the first k (redone with the next), wider than every k (they fall back to the package), and padded
    columns."""
    from sparsemax import Sparsemax

    from sida.predictor.network import sparsemax_small_support

    full = Sparsemax(dim=-1)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 30, 40, generator=g) * torch.tensor([0.05, 1.0, 5.0, 20.0])[:, None, None]
    scores[:, :, 33:] = -1e4  # padding, as attention_weights masks it
    scores[0, 0, :33] = 0.0  # a tie over every real column: support 33 > k
    with torch.no_grad():
        fast = sparsemax_small_support(scores, full, ks=(8, 16))
        want = full(scores)
    support = (want > 0).sum(-1)
    assert (fast[0, 0] > 0).sum() == 33  # the wide rows really are there
    assert (support < 8).any() and ((support >= 8) & (support < 16)).any()  # and so are narrow and middle ones
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-6)


def test_forward_without_grad_equals_the_training_path():
    pred = make()
    ids, mask = batch()
    x = pred.proj(pred.embed(ids)) * 5
    with torch.enable_grad():
        slow = pred.attention_weights(x, mask)
    with torch.no_grad():
        fast = pred.attention_weights(x, mask)
    torch.testing.assert_close(fast, slow.detach())


def test_folded_inference_form_follows_the_weights():
    """Without gradient the forward uses folded weights (embedding through proj, query·key as one map); they must
    give the training path's outputs, and be rebuilt after an optimizer step changes the weights."""
    pred = make()
    ids, mask = batch()
    opt = torch.optim.SGD(pred.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            fast = pred(ids, mask)
        slow = pred(ids, mask)
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)
        slow.square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert not torch.allclose(pred(ids, mask), fast, atol=1e-3)  # the step moved the outputs, and the cache


def test_torch_threads_sets_and_restores_the_count():
    from sida.predictor.network import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_hash_of_left_padded_prompts_equals_the_right_padded_one():
    """A decoder-only model's prompts come left-padded: each real token gets the table rows it gets right-padded."""
    from sida.predictor.network import PredictorHash

    hash_fn = PredictorHash(make(), k=3)
    ids, mask = batch()
    right = hash_fn(ids, mask)
    left_ids = torch.stack([torch.cat([ids[0, 5:], ids[0, :5]]), ids[1]])  # row 0: two pads first
    left = hash_fn(left_ids, (left_ids != 0).long())
    for layer in (0, 1):
        assert torch.equal(left.experts[layer][0, 2:], right.experts[layer][0, :5])
        assert torch.equal(left.experts[layer][1], right.experts[layer][1])
        torch.testing.assert_close(left.probs[layer][0, 2:], right.probs[layer][0, :5])
