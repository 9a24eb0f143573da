"""The demo model's tokenizer: word-level BPE trained on the training text, label words one token each."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from sida.offload.tasks import LABEL_WORDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2, in this order (make_config relies on pad 0 and EOS 1)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Word-level BPE: lower-cased, split on whitespace and punctuation (apostrophes stay in words, like PTB's 's)."""
    tok = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s']"), behavior="isolated")]
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        end_of_word_suffix="</w>",
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Label words must be one token each: their first-step logits are the classifier.
    tok.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in LABEL_WORDS])
    tok.post_processor = TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """Save `tok` in `out` as a Hugging Face fast tokenizer (tokenizer.json + tokenizer_config.json)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=model_max_length
    )
    fast.save_pretrained(out)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer saved in `model_dir` by `save_tokenizer`."""
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))
