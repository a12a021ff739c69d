"""Format 3's layout against the targets it encodes, format 2 beside it, and 8-bit log-probs."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from helpers import make_targets

from storage.codec.layout import Layout
from storage.codec.logprobs import dequantize_logprobs, quantize_logprobs


def expected(layout: Layout, targets: dict) -> dict:
    """Reader arrays computed straight from the targets: each section by ascending id, unused slots last."""
    ids, logprobs = [], []
    tail = np.full(targets["input_ids"].shape, -np.inf, np.float32)
    if layout.head_width:
        order = np.argsort(targets["head_ids"], axis=-1)
        ids.append(np.take_along_axis(targets["head_ids"], order, -1))
        logprobs.append(np.take_along_axis(targets["head_logprobs"], order, -1).astype(np.float16).astype(np.float32))
        tail = targets["tail_logprob"]
    if layout.sample_width:
        counts = targets["sample_counts"]
        ids.append(targets["sample_ids"])
        with np.errstate(divide="ignore"):
            weight = np.log(counts.astype(np.float32) / np.float32(layout.samples))
        if layout.head_width:
            weight = tail[..., None] + weight
        logprobs.append(weight.astype(np.float16).astype(np.float32))
        tail = np.full_like(tail, -np.inf)
    return {"topk_ids": np.concatenate(ids, -1), "topk_logprobs": np.concatenate(logprobs, -1), "tail_logprob": tail}


LAYOUTS = [Layout(v, mode, vocab, head, width, samples=n)
           for v in (2, 3) for vocab in (512, 65_535, 70_000)
           for mode, head, width, n in (("topk", 4, 0, 0), ("sample", 0, 5, 9), ("hybrid", 3, 4, 300))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"v{lay.version}-{lay.mode}-{lay.vocab_size}")
def test_decode_returns_the_targets_by_ascending_id(layout):
    targets = make_targets(layout)
    got = layout.decode(layout.encode(targets))
    want = expected(layout, targets)
    np.testing.assert_array_equal(got["input_ids"], targets["input_ids"])
    np.testing.assert_array_equal(got["loss_mask"], targets["loss_mask"])
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("mode,head,width,samples", [("topk", 4, 0, 0), ("sample", 0, 6, 50), ("hybrid", 3, 5, 8)])
def test_formats_2_and_3_decode_to_the_same_bits(mode, head, width, samples):
    v2, v3 = (Layout(v, mode, 70_000, head, width, samples=samples) for v in (2, 3))
    targets = make_targets(v3, n=4, seq_len=9, seed=3)
    a, b = v2.decode(v2.encode(targets)), v3.decode(v3.encode(targets))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def test_format3_columns_follow_the_vocabulary_and_the_draws():
    small, large = Layout(3, "sample", 65_535, 0, 4, samples=255), Layout(3, "sample", 65_536, 0, 4, samples=256)
    assert small.columns() == {"input_ids": "uint16 (T)", "loss_mask": "uint8 (T)", "sample_id_delta_b0": "uint8 (T, S)",
                               "sample_id_delta_b1": "uint8 (T, S)", "sample_count": "uint8 (T, S)"}
    assert small.pad_id == 65535 and large.pad_id == 2**32 - 1
    assert large.columns()["input_ids"] == "uint32 (T)" and "sample_id_delta_b3" in large.columns()
    assert "sample_count_b1" in large.columns()
    eight = Layout(3, "topk", 512, 4, 0, logprob_bits=8).columns()
    assert {"head_logprob_code", "head_logprob_offset", "head_logprob_scale", "tail_logprob"} <= set(eight)


def test_shards_of_one_cache_share_one_arrow_schema():
    """Only low ids in one shard, the highest id in the other: the same schema (format 2 differed)."""
    layout = Layout(3, "hybrid", 70_000, 2, 3, samples=10)
    low, high = (layout.encode(make_targets(layout, seed=s, high_ids=h)) for s, h in ((0, False), (1, True)))
    schema = [pa.table({k: pa.array(list(v.reshape(len(v), -1))) for k, v in cols.items()}).schema for cols in (low, high)]
    assert schema[0] == schema[1]
    v2 = Layout(2, "hybrid", 70_000, 2, 3, samples=10)
    old = [v2.encode(make_targets(v2, seed=s, high_ids=h))["topk_ids"].dtype for s, h in ((0, False), (1, True))]
    assert old == [np.uint16, np.int32]


def test_eight_bit_logprobs_are_within_half_a_step_and_keep_infinities():
    rng = np.random.default_rng(0)
    logprobs = -np.sort(rng.exponential(2.0, (200, 64)), axis=-1).astype(np.float32)
    logprobs[0, -3:] = -np.inf
    logprobs[1] = -0.25  # one value everywhere: scale 0
    codes, offset, scale = quantize_logprobs(logprobs)
    back = dequantize_logprobs(codes, offset, scale)
    assert codes.dtype == np.uint8 and offset.dtype == np.float16 and scale.dtype == np.float16
    assert np.array_equal(np.isneginf(back), np.isneginf(logprobs))
    finite = np.isfinite(logprobs)
    half_step = scale.astype(np.float32)[:, None] / 2 + np.abs(logprobs) * 2e-3  # + the fp16 offset's rounding
    assert np.all(np.abs(back[finite] - logprobs[finite]) <= np.broadcast_to(half_step, logprobs.shape)[finite])
    assert np.abs(back[1] - logprobs[1]).max() < 1e-3 and codes[:, :1].max() <= 1


def test_eight_bit_head_keeps_the_tail_exact():
    layout = Layout(3, "topk", 512, 6, 0, logprob_bits=8)
    targets = make_targets(layout)
    got = layout.decode(layout.encode(targets))
    assert got["tail_logprob"].tobytes() == targets["tail_logprob"].tobytes()
    want = expected(layout, targets)["topk_logprobs"]
    finite = np.isfinite(want)
    assert np.abs(got["topk_logprobs"][finite] - want[finite]).max() < 0.1
