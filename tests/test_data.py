"""Loading local files and folders, packing, padding and the held-out split."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.config import DataConfig
from pipeline.data import load_documents, pack, prepare_splits
from pipeline.errors import DataError


def test_pack_pads_and_masks_the_final_block():
    ids, mask = pack(np.arange(1, 11, dtype=np.int32), seq_len=4, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    ids, mask = pack(np.arange(8, dtype=np.int32), seq_len=4, pad_id=0)
    assert ids.shape == (2, 4) and mask.all()


def test_folder_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third line\n")
    assert sorted(load_documents(str(tmp_path), "train", "text")["text"]) == ["first line", "second line", "third line"]


def test_parquet_with_custom_field(tmp_path):
    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet"), "train", "body")["body"] == ["one", "two"]


def test_mixed_folder_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(DataError, match="mixes file types"):
        load_documents(str(tmp_path), "train", "text")


def test_documents_are_joined_with_eos_and_held_out_by_document(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = [f"document number {i} says hello" for i in range(20)]
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    cfg = DataConfig(path=str(tmp_path / "d.txt"), seq_len=16, holdout_fraction=0.25, seed=3)
    splits = prepare_splits(cfg, tokenizer)
    assert splits["train"].documents == 15 and splits["eval"].documents == 5
    eos = tokenizer.eos_token_id
    for split in splits.values():
        stream = split.input_ids[split.loss_mask.astype(bool)]
        assert (stream == eos).sum() == split.documents and stream[-1] == eos
    again = prepare_splits(cfg, tokenizer)
    assert np.array_equal(again["eval"].input_ids, splits["eval"].input_ids)


def test_holdout_that_leaves_nothing_is_refused(tokenizer_dir, tmp_path):
    (tmp_path / "d.txt").write_text("only one document\n")
    cfg = DataConfig(path=str(tmp_path / "d.txt"), seq_len=16, holdout_fraction=0.5)
    with pytest.raises(DataError, match="leaves nothing to train on"):
        prepare_splits(cfg, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
