import pytest

from sida.offload.tasks import LABEL_WORDS, get_task


def test_sst2_dev(data_dir):
    ex = get_task("sst2").read(data_dir / "sst2" / "dev.tsv")
    assert len(ex) == 872
    assert ex[0].prompt == "sst2 sentence: it 's a charming and often affecting journey ."
    assert ex[0].label == "positive"
    assert sum(e.label == "positive" for e in ex) == 444


def test_mrpc_dev_with_bom_header(data_dir):
    ex = get_task("mrpc").read(data_dir / "mrpc" / "dev.tsv")
    assert len(ex) == 408 and sum(e.label == "equivalent" for e in ex) == 279
    assert ex[0].prompt.startswith("mrpc sentence1: ") and " sentence2: " in ex[0].prompt


def test_multirc_train_answers(data_dir):
    ex = get_task("multirc").read(data_dir / "multirc" / "train.jsonl", limit=5)
    assert len(ex) == 5 and all(e.label in ("true", "false") for e in ex)
    assert "paragraph: While this process moved along, diplomacy continued its rounds." in ex[0].prompt


def test_unlabeled_split_has_no_labels(data_dir):
    ex = get_task("sst2").read(data_dir / "sst2" / "test.tsv", limit=3)
    assert all(e.label is None for e in ex)


def test_errors(tmp_path, data_dir):
    with pytest.raises(ValueError, match="unknown task 'cola'"):
        get_task("cola")
    with pytest.raises(FileNotFoundError):
        get_task("sst2").read(tmp_path / "absent.tsv")
    with pytest.raises(ValueError, match="expected an SST-2 tsv"):
        get_task("sst2").read(data_dir / "mrpc" / "dev.tsv")


def test_label_words_are_distinct():
    assert len(set(LABEL_WORDS)) == len(LABEL_WORDS) == 6
