import torch

from sida.predictor.decoder_guess import PrevTokenTable, decoder_hit_rates


def test_prev_token_table_learns_a_deterministic_mapping():
    prev = torch.tensor([1, 2, 3, 1, 2, 3, 4])
    expert = torch.tensor([0, 5, 5, 0, 5, 5, 2])  # token 1 → expert 0, tokens 2,3 → expert 5
    table = PrevTokenTable(vocab_size=10, num_experts=8).fit([(7, prev, expert)])
    assert table.predict(7, torch.tensor([1, 2, 3]), 1).squeeze(1).tolist() == [0, 5, 5]
    assert table.predict(7, torch.tensor([9]), 1).item() == 5  # unseen token: the most used expert
    rates = decoder_hit_rates(table, [(7, prev, expert)])["7"]
    assert rates["prev_token_top1"] == 1.0 and rates["frequency_top1"] == round(4 / 7, 4)


def test_decoder_guess_ranks_as_the_table_and_round_trips(tmp_path):
    import pytest

    from sida.predictor.artifact import PredictorError
    from sida.predictor.decoder_guess import DecoderGuess

    prev = torch.tensor([1, 2, 3, 1, 2, 3, 4])
    expert = torch.tensor([0, 5, 5, 0, 5, 5, 2])
    table = PrevTokenTable(vocab_size=10, num_experts=8).fit([(7, prev, expert)])
    guess = DecoderGuess.from_table(table)
    ids = torch.tensor([[1, 2], [9, 4]])
    assert torch.equal(guess.predict(7, ids, 2), table.predict(7, ids.reshape(-1), 2).reshape(2, 2, 2))
    guess.save(tmp_path, "abc", {"fit": "test"})
    assert torch.equal(DecoderGuess.load(tmp_path, "abc").predict(7, ids, 3), guess.predict(7, ids, 3))
    assert DecoderGuess.load(tmp_path / "nothing", "abc") is None
    with pytest.raises(PredictorError, match="built for model abc"):
        DecoderGuess.load(tmp_path, "xyz")


def test_first_steps_are_keyed_by_the_encoder_first_token(tmp_path):
    """Every first decoder step reads the start token; what it routes to depends on the input (e.g. the task
    word a classification prompt starts with), so that step is keyed by the encoder's first token."""
    from sida.predictor.decoder_guess import DecoderGuess, decoder_keys

    dec = torch.tensor([[0, 4], [0, 4], [0, 4]])  # the start token, then token 4
    keys = decoder_keys(dec, torch.tensor([2, 3, 2]), vocab_size=10)
    assert keys.tolist() == [[12, 4], [13, 4], [12, 4]]
    expert = torch.tensor([[1, 6], [5, 6], [1, 6]])
    table = PrevTokenTable(vocab_size=10, num_experts=8).fit([(7, keys.reshape(-1), expert.reshape(-1))])
    guess = DecoderGuess.from_table(table)
    guess.save(tmp_path, "abc", {})
    guess = DecoderGuess.load(tmp_path, "abc")
    first = guess.keys(torch.zeros((3, 1), dtype=torch.long), torch.tensor([3, 2, 9]), offset=0)
    assert guess.predict(7, first, 1).reshape(-1).tolist() == [5, 1, 1]  # 9 never came first: pooled first steps
    later = guess.keys(torch.tensor([[4]]), torch.tensor([3]), offset=1)  # later steps: the input token
    assert later.tolist() == [[4]] and guess.predict(7, later, 1).item() == 6
    beams = guess.keys(torch.zeros((4, 1), dtype=torch.long), torch.tensor([3, 2]), offset=0)  # 2 rows a prompt
    assert beams.reshape(-1).tolist() == [13, 13, 12, 12]
