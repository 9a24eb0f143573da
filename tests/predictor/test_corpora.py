from sida.predictor.corpora import read_c4_texts


def test_c4(data_dir):
    texts = read_c4_texts(data_dir / "c4_sample" / "c4_sample.jsonl", limit=2)
    assert texts[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
