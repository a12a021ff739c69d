"""Loading local files and folders, packing, padding and the held-out split."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.data.config import DataConfig
from pipeline.data.load import load_documents
from pipeline.data.pack import pack, prepare_splits
from pipeline.errors import DataError


def test_pack_pads_and_masks_the_final_block():
    targets = np.ones(10, dtype=np.uint8)
    ids, mask = pack(np.arange(1, 11, dtype=np.int32), targets, seq_len=4, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]  # row j: is the token after j a target?
    targets[[2, 3]] = 0  # e.g. prompt tokens
    _, mask = pack(np.arange(1, 11, dtype=np.int32), targets, seq_len=4, pad_id=0)
    assert mask.tolist()[0] == [1, 0, 0, 1]


def test_folder_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third line\n")
    assert sorted(load_documents(str(tmp_path), "train", {"text_field": "text"})["text"]) == ["first line", "second line", "third line"]


def test_parquet_with_custom_field(tmp_path):
    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet"), "train", {"text_field": "body"})["body"] == ["one", "two"]


def test_mixed_folder_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(DataError, match="mixes file types"):
        load_documents(str(tmp_path), "train", {"text_field": "text"})


def test_documents_are_joined_with_eos_and_held_out_by_document(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = [f"document number {i} says hello" for i in range(20)]
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    cfg = DataConfig(path=str(tmp_path / "d.txt"), seq_len=16, holdout_fraction=0.25, seed=3)
    splits = prepare_splits(cfg, tokenizer)
    assert splits["train"].documents == 15 and splits["eval"].documents == 5
    eos = tokenizer.eos_token_id
    for split in splits.values():
        real = split.input_ids.reshape(-1)[: split.loss_mask.sum() + 1]  # targets plus the first token
        assert (real == eos).sum() == split.documents and real[-1] == eos
    again = prepare_splits(cfg, tokenizer)
    assert np.array_equal(again["eval"].input_ids, splits["eval"].input_ids)


def test_holdout_that_leaves_nothing_is_refused(tokenizer_dir, tmp_path):
    (tmp_path / "d.txt").write_text("only one document\n")
    cfg = DataConfig(path=str(tmp_path / "d.txt"), seq_len=16, holdout_fraction=0.5)
    with pytest.raises(DataError, match="leaves nothing to train on"):
        prepare_splits(cfg, AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def test_prompt_response_trains_on_the_response_only(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    (tmp_path / "qa.jsonl").write_text('{"prompt": "Recite Ge 1:1.\\n", "response": "In the beginning"}\n')
    cfg = DataConfig(path=str(tmp_path / "qa.jsonl"), seq_len=64, format="prompt_response")
    split = prepare_splits(cfg, tokenizer)["train"]
    ids, mask = split.input_ids[0], split.loss_mask[0].astype(bool)
    targets = ids[1:][mask[:-1]]  # the tokens predicted by rows whose mask is set
    assert tokenizer.decode(targets) == "In the beginning" + tokenizer.eos_token
    assert tokenizer.decode(ids[: len(tokenizer("Recite Ge 1:1.\n")["input_ids"])]) == "Recite Ge 1:1.\n"


def test_chat_trains_on_assistant_turns_only(tokenizer_dir, tmp_path):
    import json

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "user", "content": "Recite Ge 1:1."}, {"role": "assistant", "content": "In the beginning"},
                {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "God created"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    cfg = DataConfig(path=str(tmp_path / "chat.jsonl"), seq_len=128, format="chat")
    split = prepare_splits(cfg, tokenizer)["train"]
    ids, mask = split.input_ids[0], split.loss_mask[0].astype(bool)
    targets = tokenizer.decode(ids[1:][mask[:-1]])
    assert targets == f"In the beginning{tokenizer.eos_token}\nGod created{tokenizer.eos_token}\n{tokenizer.eos_token}"


def test_shipped_qa_corpus_loads_in_both_formats(tokenizer_dir):
    from pipeline.demo.tokenizer import QA_CORPUS

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for fmt in ("chat", "prompt_response"):
        split = prepare_splits(DataConfig(path=str(QA_CORPUS), seq_len=256, format=fmt, max_tokens=2048), tokenizer)["train"]
        assert 0.2 < split.loss_mask.mean() < 0.9


def test_chat_needs_a_template(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = None
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="chat_template"):
        prepare_splits(DataConfig(path=str(tmp_path / "chat.jsonl"), seq_len=16, format="chat"), tokenizer)


def test_eval_max_tokens_caps_the_held_out_split_only(tokenizer_dir, tmp_path):
    """The first held-out rows are kept, whole; the training split is what it was."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(f"document {i} " + "word " * 300 for i in range(20)))
    settings = {"path": str(path), "seq_len": 32, "holdout_fraction": 0.5}
    full = prepare_splits(DataConfig(**settings), tokenizer)
    capped = prepare_splits(DataConfig(**settings, eval_max_tokens=100), tokenizer)
    assert len(full["eval"].input_ids) > 3 and len(capped["eval"].input_ids) == 3  # 100 // 32 whole rows
    np.testing.assert_array_equal(capped["eval"].input_ids, full["eval"].input_ids[:3])
    np.testing.assert_array_equal(capped["train"].input_ids, full["train"].input_ids)
