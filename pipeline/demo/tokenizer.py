"""``distillery tokenizer``: tokenizers trained on the shipped corpus, for tests, demo and benchmarks.

Two kinds: a byte-level BPE (GPT-2 style, ``build_tokenizer``) and a SentencePiece-style Unigram with
``▁`` word starts and ``<0xNN>`` byte fallback for characters absent from the corpus
(Llama style, ``build_unigram_tokenizer``).
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from storage import atomic_write

CORPUS = Path(__file__).parent / "assets" / "kjv.jsonl.gz"
QA_CORPUS = Path(__file__).parent / "assets" / "kjv_qa.jsonl.gz"  # the same verses as prompt/response and chat
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Each turn ends with EOS, so a model trained on assistant turns learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_texts(path: Path = CORPUS, limit_bytes: int | None = None) -> Iterator[str]:
    """Yield the ``text`` of each JSON line of a (gzipped) corpus, up to ``limit_bytes`` of text."""
    opener = gzip.open if path.suffix == ".gz" else open
    used = 0
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            used += len(text)
            yield text
            if limit_bytes is not None and used >= limit_bytes:
                return


UNK = "<unk>"  # the Unigram tokenizer's unknown token; byte fallback means it is never produced
BYTE_PIECES = [f"<0x{byte:02X}>" for byte in range(256)]
# The characters of the byte pieces' spelling. Kept in the Unigram vocabulary so that a literal "<0x41>" in
# the text is always cheaper to spell with ordinary pieces than with the (very unlikely) byte piece.
_BYTE_PIECE_CHARS = list("<>x0123456789ABCDEF")


def _check_vocab_size(vocab_size: int, minimum: int, kind: str) -> None:
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small for a {kind} (need >= {minimum})")


def _save(backend, out_dir: str | Path, **special_tokens: str) -> Path:
    """Save a trained ``tokenizers.Tokenizer`` atomically as a transformers tokenizer with the chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                        **special_tokens)
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    with atomic_write(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def build_tokenizer(out_dir: str | Path, vocab_size: int = 8192, corpus: Path = CORPUS,
                    limit_bytes: int | None = None) -> Path:
    """Train a byte-level BPE on ``corpus`` and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab_size(vocab_size, 300, "byte-level BPE")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_texts(corpus, limit_bytes), trainer)
    return _save(backend, out_dir)


def build_unigram_tokenizer(out_dir: str | Path, vocab_size: int = 8192, corpus: Path = CORPUS,
                            limit_bytes: int | None = None) -> Path:
    """Train a SentencePiece-style Unigram on ``corpus`` and save it as a transformers tokenizer folder.

    Words start with ``▁`` (the first word too); a character the corpus lacks becomes the ``<0xNN>`` pieces
    of its UTF-8 bytes, so decoding inverts encoding except that a leading space is dropped (as in
    SentencePiece, " x" and "x" encode alike). Ids: EOS 0, PAD 1, ``<unk>`` 2, ``<0x00>``..``<0xFF>``
    3..258, then the trained pieces; ``vocab_size`` counts all of them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS, PAD, UNK]
    # room for the specials, the byte pieces and at least 256 trained pieces (the alphabet first)
    _check_vocab_size(vocab_size, len(specials) + len(BYTE_PIECES) + 256, "byte-fallback Unigram")
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    # UnigramTrainer (tokenizers 0.23) has no byte_fallback option: train the rest of the vocabulary,
    # then add the byte pieces ourselves and switch byte fallback on in the model.
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES),
        special_tokens=specials,
        unk_token=UNK,
        initial_alphabet=_BYTE_PIECE_CHARS,
        show_progress=False,
    )
    backend.train_from_iterator(corpus_texts(corpus, limit_bytes), trainer)
    trained = json.loads(backend.to_str())["model"]["vocab"]  # [[piece, log-prob]], specials first
    if [piece for piece, _ in trained[:len(specials)]] != specials or any(p in BYTE_PIECES for p, _ in trained):
        raise RuntimeError("unexpected Unigram training output: special tokens not first, or a byte piece learned")
    # Byte pieces are only meant for fallback; a score far below any trained piece keeps them off every
    # ordinary segmentation.
    byte_score = min(score for _, score in trained) - 1000.0
    vocab = ([tuple(entry) for entry in trained[:len(specials)]] + [(piece, byte_score) for piece in BYTE_PIECES]
             + [tuple(entry) for entry in trained[len(specials):]])
    backend.model = models.Unigram(vocab, unk_id=specials.index(UNK), byte_fallback=True)
    return _save(backend, out_dir, unk_token=UNK)
