"""Tokens as bytes: what cross-tokenizer alignment and bits per byte count in.

Two views of one fact, each used where it is exact:

* ``vocab_bytes``: the bytes each vocabulary entry spells, read from the tokenizer's own vocabulary. It spells
  the teacher's side of a cache: a byte-level BPE (GPT-2, Llama 3, SmolLM) maps each byte to one printable
  character, and a SentencePiece-style vocabulary writes a space as ``▁`` and an unknown byte as ``<0xNN>``
  (byte fallback). Concatenated, the entries of a packed row give the text the teacher read.
* ``byte_ends``: where each token of a string ends, in UTF-8 bytes. It places the student's tokens on that text,
  whatever the student's tokenizer adds (a ``▁`` that a Metaspace pre-tokenizer prepends covers no byte of it).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

from pipeline.errors import ConfigError

BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The printable character that a byte-level BPE writes for each byte (GPT-2's table), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_types(tokenizer) -> set[str]:
    """The types of the tokenizer's decoder and of every step of a ``Sequence`` decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    steps = (decoder or {}).get("decoders") or [decoder or {}]
    return {step.get("type") for step in steps} | {(decoder or {}).get("type")}


def tokenizer_family(tokenizer) -> str | None:
    """``byte_level`` or ``sentencepiece`` when ``vocab_bytes`` can spell the tokenizer's entries, else None."""
    types = _decoder_types(tokenizer)
    if "ByteLevel" in types:
        return "byte_level"
    if {"Metaspace", "Replace", "ByteFallback"} & types:
        return "sentencepiece"
    return None


def _spell(piece: str, family: str, alphabet: dict[str, int]) -> bytes:
    if family == "byte_level":
        return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
    byte = BYTE_PIECE.match(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()


def vocab_bytes(tokenizer, name: str = "the tokenizer") -> list[bytes]:
    """The bytes of every id below ``len(tokenizer)``; added tokens (EOS, chat markers) spell their content.

    Raises ``ConfigError`` naming ``name`` for a tokenizer whose entries cannot be spelled (neither byte-level
    BPE nor SentencePiece-style), since alignment by bytes is then undefined.
    """
    family = tokenizer_family(tokenizer)
    if family is None:
        raise ConfigError(f"{name}: its decoder ({', '.join(sorted(filter(None, _decoder_types(tokenizer)))) or 'none'}) "
                          "is neither byte-level BPE nor SentencePiece-style, so its tokens cannot be spelled as bytes; "
                          "cross-tokenizer distillation needs one of those two families")
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    alphabet = _byte_level_alphabet()
    return [added[i].encode() if i in added else _spell(piece or "", family, alphabet)
            for i, piece in enumerate(pieces)]


def byte_lengths(spelled: list[bytes]) -> np.ndarray:
    """(V,) int64: the byte length of each entry of ``vocab_bytes``."""
    return np.fromiter((len(b) for b in spelled), dtype=np.int64, count=len(spelled))


def byte_ends(text: str, pieces: list[bytes], offsets: list[tuple[int, int]]) -> np.ndarray:
    """(n,) int64: where each token of ``text`` ends, in UTF-8 bytes; ``pieces`` are the tokens' ``vocab_bytes``
    and ``offsets`` their character offsets.

    A token covers its own bytes where the text continues with them, which is exact for the two families
    ``vocab_bytes`` spells, down to a byte-fallback piece inside a character (offsets, which count characters,
    cannot say where such a piece ends). A piece's leading space may be missing from the text: SentencePiece
    prepends ``▁`` to the first word, and a lone prepended ``▁`` covers no byte. Where the text differs otherwise
    (a normalizer rewrote it), the token ends where its offsets say.
    """
    data = text.encode()
    char_end = np.zeros(len(text) + 1, dtype=np.int64)
    if text:
        char_end[1:] = np.cumsum([len(c.encode()) for c in text])
    ends, cursor = np.zeros(len(pieces), dtype=np.int64), 0
    for index, (piece, (_, end)) in enumerate(zip(pieces, offsets)):
        if data.startswith(piece, cursor):
            cursor += len(piece)
        elif piece[:1] == b" " and data.startswith(piece[1:], cursor):
            cursor += len(piece) - 1
        else:
            cursor = max(cursor, int(char_end[end]))
        ends[index] = cursor
    return ends
