"""Students with another tokenizer: each cached sequence spelled as text, tokenized by the student, aligned by bytes.

A cache with text alignment (``Manifest.text_alignment``) marks the EOS that packing put between documents and
the padding (``token_role``); every other token is text that the teacher's vocabulary spells as bytes
(``pipeline.models.token_bytes``). So a cached sequence is a list of document pieces, and the student's sequence
is those pieces tokenized by the student, each document end written as the student's own EOS.

**One student sequence per teacher sequence.** A student sequence never straddles two teacher sequences, so the
teacher position that a student position aligns with is in the same batch row, the order of the stream stays
the cache's (a function of seed and epoch, so resumes stay elastic), and the student sees exactly the context
the teacher saw. The student sequence is padded to the longest of its micro-batch (a multiple of 8).

**Positions.** Offsets count *virtual bytes*: the bytes of the text, plus one for each document end. Teacher
position t has read the bytes up to ``E[t]`` and predicts what follows; student position s has read up to
``F[s]``. Where ``E[t] == F[s]`` both predict the same continuation of the same prefix, and s is aligned with t
(the KD loss applies there); elsewhere only CE applies. Alignment points fall on boundaries that both
tokenizations share: word starts, mostly.

**Masks carry over by bytes.** Each virtual byte is a target when the teacher token holding it is; a student
token is a target when its first byte is. The first token of a sequence is never a target (its flag belongs to
the sequence before), as in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models.token_bytes import BYTE_PIECE, byte_ends, byte_lengths, vocab_bytes
from storage import ROLE_DOCUMENT_END, ROLE_TEXT

PAD_MULTIPLE = 8


def _utf8_span(data: bytes, at_start: bool, at_end: bool) -> tuple[int, int]:
    """The part of ``data`` that decodes: a sequence cut inside a character loses the partial character."""
    lo, hi = 0, len(data)
    if at_start:
        while lo < hi and data[lo] & 0xC0 == 0x80:  # continuation bytes of a character begun before the sequence
            lo += 1
    if at_end:
        start = hi
        while start > lo and data[start - 1] & 0xC0 == 0x80:
            start -= 1
        if start > lo:
            lead = data[start - 1]
            need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            if hi - (start - 1) < need:
                hi = start - 1
    return lo, hi


@dataclass
class StudentRow:
    """One student sequence: its ids (n,), the virtual byte where each token ends (n,), and its target flags."""

    ids: list[int]
    ends: list[int]
    targets: list[bool]


class TextAlignment:
    """Turns cache batches into student batches, for one teacher tokenizer and one student tokenizer."""

    def __init__(self, teacher_tokenizer, student_tokenizer, max_positions: int | None = None):
        self.teacher_spelling = vocab_bytes(teacher_tokenizer, "the cache's tokenizer")
        self.teacher_lengths = byte_lengths(self.teacher_spelling)
        self.student = student_tokenizer
        self.student_spelling = vocab_bytes(student_tokenizer, "student.tokenizer")
        self.student_eos = student_tokenizer.eos_token_id
        self.student_pad = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None \
            else self.student_eos
        self.max_positions = max_positions
        self.id_map = self._id_map(teacher_tokenizer)

    def _id_map(self, teacher_tokenizer) -> torch.Tensor:
        """(V_t,) int64: the student id that spells each teacher id's bytes (-1: none). Injective; the teacher's
        EOS maps to the student's EOS, since both mean the end of a document."""
        first: dict[bytes, int] = {}
        pieces = self.student.convert_ids_to_tokens(list(range(len(self.student_spelling))))
        # A byte-fallback piece spells what a regular piece may spell too ("<0x61>" and "a"): the student writes
        # the regular one, so that one is matched.
        for i in sorted(range(len(pieces)), key=lambda i: bool(BYTE_PIECE.match(pieces[i] or ""))):
            first.setdefault(self.student_spelling[i], i)
        mapping = np.full(len(self.teacher_spelling), -1, dtype=np.int64)
        taken: set[int] = set()
        for i, spelled in enumerate(self.teacher_spelling):
            j = first.get(spelled, -1)
            if spelled and j >= 0 and j not in taken:
                mapping[i] = j
                taken.add(j)
        if teacher_tokenizer.eos_token_id is not None and self.student_eos is not None:
            mapping[mapping == self.student_eos] = -1
            mapping[teacher_tokenizer.eos_token_id] = self.student_eos
        return torch.from_numpy(mapping)

    def _segments(self, ids: np.ndarray, roles: np.ndarray, lengths: np.ndarray):
        """The document pieces of one teacher sequence: (text, first virtual byte, ends with a document end)."""
        ends = np.cumsum(lengths)
        pieces, begin = [], 0
        cuts = [*np.flatnonzero(roles == ROLE_DOCUMENT_END).tolist(), len(ids)]
        for cut in cuts:
            text_tokens = [j for j in range(begin, cut) if roles[j] == ROLE_TEXT]
            data = b"".join(self.teacher_spelling[ids[j]] for j in text_tokens)
            start = int(ends[begin - 1]) if begin else 0
            closed = cut < len(ids)
            lo, hi = _utf8_span(data, at_start=begin == 0, at_end=not closed)
            pieces.append((data[lo:hi], start + lo, closed))
            begin = cut + 1
        return pieces

    def student_row(self, ids: np.ndarray, roles: np.ndarray, mask: np.ndarray) -> tuple[StudentRow, np.ndarray]:
        """The student sequence of one teacher sequence, and the teacher's end offsets ``E`` (T,)."""
        lengths = np.where(roles == ROLE_TEXT, self.teacher_lengths[ids],
                           np.where(roles == ROLE_DOCUMENT_END, 1, 0))
        teacher_ends = np.cumsum(lengths)
        token_target = np.concatenate([[False], mask[:-1].astype(bool)])  # token j is a target when mask[j - 1]
        byte_target = np.repeat(token_target, lengths)
        pieces = self._segments(ids, roles, lengths)
        texts = [data.decode("utf-8", errors="replace") for data, _, _ in pieces]
        encoded = self.student(texts, add_special_tokens=False, return_offsets_mapping=True)
        row = StudentRow([], [], [])
        for (data, start, closed), text, piece_ids, offsets in zip(pieces, texts, encoded["input_ids"],
                                                                   encoded["offset_mapping"]):
            ends = (start + byte_ends(text, [self.student_spelling[i] for i in piece_ids], offsets)).tolist()
            firsts = [start, *ends[:-1]]
            row.ids += piece_ids
            row.ends += ends
            row.targets += [bool(byte_target[a]) if b > a else False for a, b in zip(firsts, ends)]
            if closed:
                eos_byte = start + len(data)
                row.ids.append(self.student_eos)
                row.ends.append(eos_byte + 1)
                row.targets.append(bool(byte_target[eos_byte]))
        return row, teacher_ends

    def student_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A cache batch -> the student's: ``input_ids``, ``loss_mask``, ``kd_mask`` (B, L), ``teacher_position``
        (B, L) int64 (the flat index b * T + t of the aligned teacher position, 0 where none) and ``target_bytes``
        (B, L) float32 (bytes of the next token; a document end counts one); the teacher's targets and the
        stream's ``sample_index`` pass through unchanged."""
        ids, roles = batch["input_ids"].numpy(), batch["token_role"].numpy()
        masks = batch["loss_mask"].numpy().astype(bool)
        size, seq_len = ids.shape
        rows = [self.student_row(ids[b], roles[b], masks[b]) for b in range(size)]
        longest = max(1, max(len(r.ids) for r, _ in rows))
        width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
        if self.max_positions:
            width = min(width, self.max_positions)
        out = {"input_ids": np.full((size, width), self.student_pad, np.int64),
               "loss_mask": np.zeros((size, width), bool), "kd_mask": np.zeros((size, width), bool),
               "teacher_position": np.zeros((size, width), np.int64),
               "target_bytes": np.zeros((size, width), np.float32)}
        for b, (row, teacher_ends) in enumerate(rows):
            n = min(len(row.ids), width)
            ends = np.asarray(row.ends[:n], dtype=np.int64)
            next_target = np.asarray(row.targets[1 : n + 1] + [False] * (n + 1 - len(row.targets)), bool)[:n]
            t = np.searchsorted(teacher_ends, ends, side="right") - 1
            aligned = (t >= 0) & (teacher_ends[np.clip(t, 0, None)] == ends)
            t = np.clip(t, 0, seq_len - 1)
            out["input_ids"][b, :n] = row.ids[:n]
            out["loss_mask"][b, :n] = next_target
            out["kd_mask"][b, :n] = next_target & aligned & masks[b][t]
            out["teacher_position"][b, :n] = np.where(aligned, b * seq_len + t, 0)
            out["target_bytes"][b, : n - 1] = np.where(next_target[: n - 1], np.diff(ends), 0)
        student = {k: torch.from_numpy(v) for k, v in out.items()}
        return {**{k: v for k, v in batch.items() if k not in ("input_ids", "loss_mask", "token_role")}, **student}


def next_token_bytes(ids: torch.Tensor, roles: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: the bytes of the token after each position (a document end counts one, padding and the
    last position none), for a same-tokenizer batch; ``lengths`` (V,) is ``byte_lengths`` of its tokenizer."""
    following = torch.where(roles[:, 1:] == ROLE_TEXT, lengths[ids[:, 1:]],
                            (roles[:, 1:] == ROLE_DOCUMENT_END).long())
    return torch.cat([following, torch.zeros_like(following[:, :1])], dim=1).float()
