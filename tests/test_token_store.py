"""The token store: built once, reused, rebuilt when broken; max_tokens stops early; a part's memory stays flat."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

import pipeline.data.store as store_module
from pipeline.data.config import DataConfig
from pipeline.data.pack import prepare_splits
from pipeline.data.store import INDEX_NAME, token_store


@pytest.fixture
def counted(monkeypatch):
    """How many times the store tokenized and packed the data."""
    calls = []
    original = store_module.pack_documents

    def pack_documents(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(store_module, "pack_documents", pack_documents)
    return calls


def _equal(store, splits) -> bool:
    return all(np.array_equal(store.splits[n].input_ids, splits[n].input_ids)
               and np.array_equal(store.splits[n].loss_mask, splits[n].loss_mask) for n in splits)


def test_store_is_reused_and_a_broken_one_rebuilt(tmp_path, tokenizer_dir, corpus_jsonl, counted):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = DataConfig(path=str(corpus_jsonl), seq_len=32, holdout_fraction=0.1)
    expected = prepare_splits(cfg, tokenizer)
    first = token_store(tmp_path, cfg, tokenizer, "tok")
    assert len(counted) == 1 and _equal(first, expected) and first.splits["train"].input_ids.dtype == np.int32
    assert not first.splits["train"].input_ids.flags.writeable  # a view of the memory map, not a copy
    again = token_store(tmp_path, cfg, tokenizer, "tok")
    assert len(counted) == 1 and again.sha256 == first.sha256 and _equal(again, expected)

    train = first.directory / "train.arrow"
    data = bytearray(train.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong sha256
    train.write_bytes(bytes(data))
    assert _equal(token_store(tmp_path, cfg, tokenizer, "tok"), expected) and len(counted) == 2
    train.write_bytes(train.read_bytes()[:1000])  # truncated
    assert _equal(token_store(tmp_path, cfg, tokenizer, "tok"), expected) and len(counted) == 3
    (first.directory / INDEX_NAME).unlink()  # killed before the index was written
    assert _equal(token_store(tmp_path, cfg, tokenizer, "tok"), expected) and len(counted) == 4
    token_store(tmp_path, cfg, tokenizer, "another tokenizer")
    assert len(counted) == 5 and len(list((tmp_path / "tokens").iterdir())) == 4  # two stores and their locks


def test_max_tokens_stops_reading_documents(tmp_path, tokenizer_dir, corpus_jsonl, counted):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    full = prepare_splits(DataConfig(path=str(corpus_jsonl), seq_len=16), tokenizer)["train"]
    (tmp_path / "many.jsonl").write_text(corpus_jsonl.read_text() * 40)  # 1,200 documents: several batches
    cfg = DataConfig(path=str(tmp_path / "many.jsonl"), seq_len=16, max_tokens=16 * 100)
    store = token_store(tmp_path, cfg, tokenizer, "tok")
    train = store.splits["train"]
    assert len(train.input_ids) == 100 and np.array_equal(train.input_ids, full.input_ids[:100])
    assert train.documents < 1200


@pytest.mark.bench_smoke  # a memory figure: the bench's stage1_memory section measures it at full size
def test_peak_rss_of_a_part_stays_flat_when_data_grows_10x(tmp_path, llama_dir):
    from pipeline.bench.scaling import memory_records

    small, large = memory_records(llama_dir, tmp_path, documents=1500, seq_len=64, shard_size=64, parts=4)
    assert large["tokens"] > 9 * small["tokens"] and large["part_rows"] > 9 * small["part_rows"]
    assert large["rss_over_1x"] < 1.10, (small, large)
