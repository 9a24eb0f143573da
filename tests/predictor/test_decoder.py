import torch

from predictor.decoder import PrevTokenTable, decoder_hit_rates


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

    from predictor.artifact import PredictorError
    from predictor.decoder import DecoderGuess

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
