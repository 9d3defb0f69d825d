"""The byte-level BPE tokenizer: exact round trips, specials, token byte lengths, save/load."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer import corpus
from trainer.tokenizer import (BOS_TOKEN, SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE,
                               bos_id, decode, encode_documents, load_tokenizer, save_tokenizer,
                               token_byte_lengths, train_tokenizer)

VOCAB = 512


@pytest.fixture(scope="module")
def tok():
    docs = corpus.sample_documents()[:150]
    return train_tokenizer(corpus.batched(docs, max_docs=32), VOCAB)


@pytest.fixture(scope="module")
def token_bytes(tok):
    return token_byte_lengths(tok)


def test_specials_come_first_and_bos_is_reserved_0(tok):
    assert tok.get_vocab_size() == VOCAB
    assert [tok.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS
    assert bos_id(tok) == 0 and tok.id_to_token(0) == BOS_TOKEN


def test_token_bytes(tok, token_bytes):
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (VOCAB,)
    assert token_bytes[:4].tolist() == [0, 0, 0, 0]
    assert (token_bytes[4:] >= 1).all()
    # all 256 single bytes are in the vocabulary, each one byte long
    assert (token_bytes == 1).sum() == 256
    assert token_bytes.max() > 1  # merges happened


TRICKY = [
    "",
    "hello world",
    "<|reserved_0|>",
    "In the beginning<|reserved_0|>God <|reserved_3|><|reserved_1|>",
    "emoji 😀👩‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 a\u0308\u0323 Zalgo z\u0351\u0352\u0353",
    "中文字符和日本語のテキスト、한국어",
    "nul \x00 byte and \x01\x7f controls",
    "numbers 1234567890 3.14159 1,000,000",
    "  leading spaces\r\n\r\nCRLF\ttabs \u00a0nbsp \u2028 line sep",
    "'s 'LL 'Ve contractions",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_examples(tok, token_bytes, text):
    ids = tok.encode(text).ids
    assert decode(tok, ids) == text
    assert min(ids, default=4) >= 4, "document text must never become a special id"
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


text_with_specials = st.lists(
    st.one_of(st.text(), st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", "<|reserved_", "\x00",
                                                            "😀", "e\u0301", "漢字"])),
    max_size=8).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=text_with_specials)
def test_round_trip_any_text(tok, token_bytes, text):
    ids = tok.encode(text).ids
    assert decode(tok, ids) == text
    assert all(i >= 4 for i in ids)
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_encode_documents_batches_and_bos(tok):
    texts = ["first doc", "<|reserved_0|> is text here", "", "中文 😀"]
    plain = encode_documents(tok, texts)
    with_bos = encode_documents(tok, texts, bos=0)
    assert [a.dtype for a in plain] == [np.int32] * 4
    for text, a, b in zip(texts, plain, with_bos):
        assert a.tolist() == tok.encode(text).ids
        assert b[0] == 0 and b[1:].tolist() == a.tolist()
        assert decode(tok, a) == text
    assert encode_documents(tok, []) == []


def test_save_and_load(tmp_path, tok, token_bytes):
    save_tokenizer(tok, tmp_path)
    assert (tmp_path / TOKENIZER_FILE).is_file()
    assert np.array_equal(np.load(tmp_path / TOKEN_BYTES_FILE), token_bytes)
    loaded = load_tokenizer(tmp_path)
    text = "Amen <|reserved_0|> 😀"
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert 0 not in loaded.encode(text).ids
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nowhere")


def test_training_is_deterministic(tok):
    docs = corpus.sample_documents()[:150]
    again = train_tokenizer(corpus.batched(docs, max_docs=32), VOCAB)
    assert again.to_str() == tok.to_str()


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([["abc"]], 100)
