"""Character and byte tokenizers for language modelling: vocabulary, unknown characters, save/load."""
import pytest

from pipeline.lm.tokenizer import ByteTokenizer, CharTokenizer, UNKNOWN, load_tokenizer, save_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def test_char_vocabulary_is_sorted_and_round_trips():
    tok = CharTokenizer.fit(TEXT)
    assert tok.chars[0] == UNKNOWN and tok.chars[1:] == sorted(set(TEXT))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT)) + 1


def test_unknown_characters_map_to_id_zero_deterministically():
    tok = CharTokenizer.fit(TEXT)
    ids = tok.encode("hear Zoë!")
    assert ids == CharTokenizer.fit(TEXT).encode("hear Zoë!")
    assert [i for i, c in zip(ids, "hear Zoë!") if c not in TEXT] == [0, 0, 0]
    assert tok.unknown_count("hear Zoë!") == 3
    assert tok.decode(ids) == f"hear {UNKNOWN}o{UNKNOWN}{UNKNOWN}"


def test_min_count_drops_rare_characters():
    tok = CharTokenizer.fit("aaab", min_count=2)
    assert tok.encode("ab") == [1, 0]


def test_save_load(tmp_path):
    for tok in (CharTokenizer.fit(TEXT + "ë"), ByteTokenizer()):
        save_tokenizer(tok, tmp_path / "tok.json")
        back = load_tokenizer(tmp_path / "tok.json")
        assert type(back) is type(tok) and back.encode(TEXT + "ë") == tok.encode(TEXT + "ë")


def test_load_rejects_unknown_kind(tmp_path):
    (tmp_path / "tok.json").write_text('{"kind": "bpe"}')
    with pytest.raises(ValueError, match="tok.json: unknown tokenizer kind 'bpe'"):
        load_tokenizer(tmp_path / "tok.json")


def test_bytes_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode("Zoë")
    assert len(ids) == 4 and max(ids) < 256 and tok.decode(ids) == "Zoë"
