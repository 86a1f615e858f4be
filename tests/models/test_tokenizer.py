import pytest

from hybridopt.models.tokenizer import load_tokenizer, train_bpe_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "def f(x):\n    return x ** 2  # square\n" * 20]


def test_round_trip_is_lossless():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=400)
    for text in ["Hello, world!", "naïve café — 東京 🙂", "  leading spaces\n\ttabs\r\n", "def f(x):\n    return x"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_training_is_deterministic_and_sized():
    a = train_bpe_tokenizer(TEXTS, vocab_size=400)
    b = train_bpe_tokenizer(TEXTS, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    assert 257 <= len(a) <= 400
    assert a.eos_token == "<|endoftext|>" and a.eos_token_id is not None


def test_saved_tokenizer_loads_back(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, vocab_size=400)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded("fox jumps")["input_ids"] == tok("fox jumps")["input_ids"]


def test_folder_without_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(tmp_path)

