"""Cross-tokenizer alignment against hand-worked examples, on tokenizers built here from explicit vocabularies."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.data.config import DataConfig
from pipeline.data.pack import prepare_splits
from pipeline.demo.tokenizer import build_unigram_tokenizer
from pipeline.models.token_bytes import _byte_level_alphabet, byte_ends, vocab_bytes
from pipeline.train.align import TextAlignment, _utf8_span
from storage import ROLE_DOCUMENT_END, ROLE_TEXT

EOS = "<eos>"


def byte_bpe(words: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE in which each of ``words`` (and each of its prefixes) is one token."""
    to_char = {byte: char for char, byte in _byte_level_alphabet().items()}
    vocab = {char: i for i, char in enumerate(sorted(to_char.values()))}
    merges = []
    for word in words:
        spelled = "".join(to_char[b] for b in word.encode())
        piece = spelled[0]
        for char in spelled[1:]:
            if piece + char not in vocab:
                vocab[piece + char] = len(vocab)
                merges.append((piece, char))
            piece += char
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


def sentencepiece(pieces: list[str]) -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram: ``pieces`` cost 1 each, single letters and digits 5, bytes 100 (fallback)."""
    vocab = [(EOS, 0.0), ("<unk>", 0.0), *((f"<0x{b:02X}>", -100.0) for b in range(256))]
    vocab += [(c, -5.0) for c in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    vocab += [(p, -1.0) for p in pieces]
    backend = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token="<unk>")


def teacher_batch(teacher, documents: list[str]) -> dict[str, torch.Tensor]:
    """One packed row of ``documents`` joined by the teacher's EOS, every token after the first a target."""
    ids, roles = [], []
    for index, text in enumerate(documents):
        ids += teacher(text, add_special_tokens=False)["input_ids"]
        roles += [ROLE_TEXT] * (len(ids) - len(roles))
        if index < len(documents) - 1:
            ids.append(teacher.eos_token_id)
            roles.append(ROLE_DOCUMENT_END)
    mask = [1] * (len(ids) - 1) + [0]
    return {"input_ids": torch.tensor([ids]), "token_role": torch.tensor([roles], dtype=torch.uint8),
            "loss_mask": torch.tensor([mask], dtype=torch.bool)}


def test_a_word_split_differently_aligns_at_the_shared_boundaries():
    teacher = byte_bpe(["In", " the", " beginning"])
    student = sentencepiece(["▁In", "▁the", "▁begin", "ning"])
    batch = TextAlignment(teacher, student).student_batch(teacher_batch(teacher, ["In the beginning"]))
    assert student.convert_ids_to_tokens(batch["input_ids"][0, :4].tolist()) == ["▁In", "▁the", "▁begin", "ning"]
    # teacher ends 2, 6, 16; student ends 2, 6, 12, 16: "▁begin" ends where no teacher token does
    assert batch["teacher_position"][0, :4].tolist() == [0, 1, 0, 2]
    assert batch["loss_mask"][0, :4].tolist() == [True, True, True, False]  # the last token has no next one
    assert batch["kd_mask"][0, :4].tolist() == [True, True, False, False]
    assert batch["target_bytes"][0, :4].tolist() == [4, 6, 4, 0]  # " the", " begin", "ning"
    assert not batch["loss_mask"][0, 4:].any() and batch["input_ids"].shape[1] == 8


def test_multibyte_characters_and_byte_fallback_pieces():
    teacher = byte_bpe(["na", "ï", "ve", " €", "5"])
    student = sentencepiece(["▁na", "ve"])
    batch = TextAlignment(teacher, student).student_batch(teacher_batch(teacher, ["naïve €5"]))
    pieces = student.convert_ids_to_tokens(batch["input_ids"][0, :9].tolist())
    assert pieces == ["▁na", "<0xC3>", "<0xAF>", "ve", "▁", "<0xE2>", "<0x82>", "<0xAC>", "5"]
    # teacher: "na" 2, "ï" 4, "ve" 6, " €" 10, "5" 11; student: 2, 3, 4, 6, 7, 8, 9, 10, 11
    assert batch["kd_mask"][0, :9].tolist() == [True, False, True, True, False, False, False, True, False]
    assert [batch["teacher_position"][0, s].item() for s in (0, 2, 3, 7)] == [0, 1, 2, 3]
    assert batch["target_bytes"][0, :8].tolist() == [1, 1, 2, 1, 1, 1, 1, 1]


def test_document_ends_become_the_students_eos_and_align_with_the_teachers():
    teacher = byte_bpe(["In", " the", "beginning"])
    student = sentencepiece(["▁In", "▁the", "▁begin", "ning"])
    batch = TextAlignment(teacher, student).student_batch(teacher_batch(teacher, ["In the", "beginning"]))
    pieces = student.convert_ids_to_tokens(batch["input_ids"][0, :5].tolist())
    assert pieces == ["▁In", "▁the", EOS, "▁begin", "ning"]  # the prepended ▁ covers no byte of "beginning"
    # virtual ends: teacher 2, 6, 7 (EOS), 16; student 2, 6, 7, 12, 16
    assert batch["teacher_position"][0, :5].tolist() == [0, 1, 2, 0, 3]
    assert batch["kd_mask"][0, :5].tolist() == [True, True, True, False, False]
    assert batch["target_bytes"][0, :4].tolist() == [4, 1, 5, 4]  # the EOS counts one byte


def test_byte_ends_of_a_prepended_piece_and_a_split_character():
    student = sentencepiece(["▁na"])
    text = "日x"
    encoded = student(text, add_special_tokens=False, return_offsets_mapping=True)
    spelled = vocab_bytes(student)
    pieces = student.convert_ids_to_tokens(encoded["input_ids"])
    assert pieces == ["▁", "<0xE6>", "<0x97>", "<0xA5>", "x"]
    assert byte_ends(text, [spelled[i] for i in encoded["input_ids"]], encoded["offset_mapping"]).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("data", "at_start", "at_end", "span"), [
    ("é€x".encode()[1:], True, False, (1, 5)),  # a sequence that begins inside "é"
    ("xé€".encode()[:-1], False, True, (0, 3)),  # one that ends inside "€"
    ("xé€".encode(), True, True, (0, 6)),
])
def test_a_sequence_cut_inside_a_character_drops_the_partial_character(data, at_start, at_end, span):
    assert _utf8_span(data, at_start, at_end) == span


def test_an_id_map_matches_tokens_spelled_alike_and_the_two_eos():
    teacher = byte_bpe(["In", " the", " beginning"])
    student = sentencepiece(["▁In", "▁the", "▁begin", "ning"])
    mapping = TextAlignment(teacher, student).id_map
    pairs = {teacher.convert_ids_to_tokens(t): student.convert_ids_to_tokens(s)
             for t, s in enumerate(mapping.tolist()) if s >= 0}
    assert pairs["Ġthe"] == "▁the" and pairs[EOS] == EOS and pairs["a"] == "a"  # " the", the document end, "a"
    assert "In" not in pairs and "Ġbeginning" not in pairs  # the student spells only " In", " begin" + "ning"
    assert len(set(pairs.values())) == len(pairs)


def test_chat_masks_line_up_by_bytes(tmp_path, tokenizer_dir):
    """The bytes a student of another tokenizer trains on are the bytes the teacher trains on: the assistant turns
    (and their EOS), not the user's or the chat markup."""
    path = tmp_path / "chat.jsonl"
    chats = [[{"role": "user", "content": "Who was first?"}, {"role": "assistant", "content": "In the beginning."}],
             [{"role": "user", "content": "Und dann?"}, {"role": "assistant", "content": "Naïve kings, €5."}]]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    teacher = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    student = AutoTokenizer.from_pretrained(str(build_unigram_tokenizer(tmp_path / "uni", 600, limit_bytes=100_000)))
    split = prepare_splits(DataConfig(path=str(path), format="chat", seq_len=128, holdout_fraction=0.0), teacher)["train"]
    alignment = TextAlignment(teacher, student)
    batch = {"input_ids": torch.from_numpy(split.input_ids.astype(np.int64)),
             "loss_mask": torch.from_numpy(split.loss_mask.astype(bool)), "token_role": torch.from_numpy(split.token_role)}
    ids, roles, mask = split.input_ids[0], split.token_role[0], split.loss_mask[0]
    spelled = vocab_bytes(teacher)
    virtual = [spelled[i] if r == ROLE_TEXT else b"|" if r == ROLE_DOCUMENT_END else b"" for i, r in zip(ids, roles)]
    flags = np.concatenate([[0], mask[:-1]])  # token j is a target when mask[j - 1]
    teacher_target = b"".join(v for v, t in zip(virtual, flags) if t)
    assert teacher_target == "In the beginning.<|endoftext|>\n|Naïve kings, €5.<|endoftext|>\n|".encode()
    row, _ = alignment.student_row(ids, roles, mask.astype(bool))
    text = b"".join(virtual)
    starts = [0, *row.ends[:-1]]
    student_target = b"".join(text[a:b] for a, b, t in zip(starts, row.ends, row.targets) if t)
    assert student_target == teacher_target
    assert alignment.student_batch(batch)["kd_mask"].sum() > 0
