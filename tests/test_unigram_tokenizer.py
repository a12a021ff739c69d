"""``distillery tokenizer --kind unigram``: the SentencePiece-style Unigram, its byte fallback, round trips, offsets."""
from __future__ import annotations

import re

import pytest

from pipeline.demo.tokenizer import CHAT_TEMPLATE, EOS, PAD, build_unigram_tokenizer

VOCAB = 2000
ORDINARY = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "two  spaces, trailing space ",
    "Jesus wept.",
]
UNSEEN = ["naïve €5 日本 🙂", "🙂", "line\nbreak\ttab", "<0x41> is not a byte"]
BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = build_unigram_tokenizer(tmp_path_factory.mktemp("unigram") / "tok", vocab_size=VOCAB, limit_bytes=300_000)
    return AutoTokenizer.from_pretrained(out)


def _tokens(tokenizer, text):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(tokenizer.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]))


def test_loads_with_special_tokens_and_byte_pieces(tokenizer):
    assert len(tokenizer) == VOCAB
    specials = (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert specials == (EOS, EOS, PAD, "<unk>")
    assert tokenizer.convert_tokens_to_ids([EOS, PAD, "<unk>"]) == [0, 1, 2]
    assert tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)]) == list(range(3, 259))


@pytest.mark.parametrize("text", ORDINARY + UNSEEN)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids


def test_leading_space_is_dropped(tokenizer):
    # As in SentencePiece: the first word gets a "▁" unless there is one already, so " x" encodes like "x".
    assert tokenizer.encode(" light", add_special_tokens=False) == tokenizer.encode("light", add_special_tokens=False)


def test_ordinary_text_uses_no_byte_pieces(tokenizer):
    for text in ORDINARY:
        assert not any(BYTE_TOKEN.fullmatch(token) for token, _ in _tokens(tokenizer, text)), text


def test_unseen_characters_become_utf8_byte_pieces(tokenizer):
    for char in "ï€日🙂":
        tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(f"a{char}", add_special_tokens=False))
        pieces = [token for token in tokens if BYTE_TOKEN.fullmatch(token)]
        assert bytes(int(BYTE_TOKEN.fullmatch(p).group(1), 16) for p in pieces) == char.encode("utf-8"), tokens


def test_word_starts_carry_metaspace(tokenizer):
    tokens = [token for token, _ in _tokens(tokenizer, "And God said")]
    assert tokens[0].startswith("▁")  # prepend_scheme="first": the first word too
    assert sum(token.startswith("▁") for token in tokens) == 3
    assert not any(" " in token for token in tokens)


@pytest.mark.parametrize("text", ORDINARY + UNSEEN)
def test_offsets_index_the_original_text(tokenizer, text):
    tokens = _tokens(tokenizer, text)
    i = 0
    while i < len(tokens):
        token, (start, end) = tokens[i]
        assert 0 <= start <= end <= len(text)
        if BYTE_TOKEN.fullmatch(token):
            # The byte pieces of one unseen run (one or more characters) all report the run's span.
            run = [t for t, span in tokens[i:] if span == (start, end) and BYTE_TOKEN.fullmatch(t)]
            assert bytes(int(BYTE_TOKEN.fullmatch(t).group(1), 16) for t in run) == text[start:end].encode("utf-8")
            i += len(run)
            continue
        if i == 0 and token.startswith("▁") and not text.startswith(" "):
            # The prepended "▁" covers no original character: "▁And" spans "And"; a lone "▁" reports
            # the first character's span, which the next token reports too.
            token = token[1:]
            if not token:
                assert start == 0 and end <= tokens[1][1][1]
                i += 1
                continue
        assert text[start:end] == token.replace("▁", " "), (token, (start, end))
        i += 1


def test_chat_template_renders(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who wept?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == f"<|user|>\nWho wept?{EOS}\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who wept?"}], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.eos_token_id in ids


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        build_unigram_tokenizer(tmp_path / "tok", vocab_size=300, limit_bytes=10_000)
