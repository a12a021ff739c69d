"""``auto`` dtypes per device: bf16 only where the hardware runs it natively, in the cache fingerprint and in
the student's autocast."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cache_args, train, train_args

from pipeline.cache.config import CacheJob
from pipeline.cache.plan import make_plan
from pipeline.config_loading import load_config
from pipeline.models import device

CPU, GPU = torch.device("cpu"), torch.device("cuda:0")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set whether the CPU reports AVX-512-BF16 (AMX stays off); the suite's override is lifted."""
    monkeypatch.delenv(device.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    def set_native(value: bool):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: value)

    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_is_bf16_only_with_native_support(cpu_bf16, native, expected):
    cpu_bf16(native)
    assert device.compute_dtype("auto", CPU) == expected
    # the log line names the choice and why
    assert device.dtype_choice("auto", expected, CPU).startswith(f"{expected} (auto: {'native' if native else 'no native'} bf16")
    assert device.dtype_choice("fp32", "fp32", CPU) == "fp32 (as set)"


def test_amx_counts_as_native_bf16(cpu_bf16, monkeypatch):
    cpu_bf16(False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert device.compute_dtype("auto", CPU) == "bf16"


@pytest.mark.parametrize("bf16_gpu, allow_fp16, expected", [(True, True, "bf16"), (False, True, "fp16"),
                                                              (False, False, "fp32")])
def test_auto_on_gpu_takes_fp16_without_bf16(monkeypatch, bf16_gpu, allow_fp16, expected):
    monkeypatch.delenv(device.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    assert device.compute_dtype("auto", GPU, allow_fp16=allow_fp16) == expected


@pytest.mark.parametrize("requested", ["bf16", "fp16", "fp32"])
def test_an_explicit_dtype_is_kept_on_any_hardware(cpu_bf16, requested):
    cpu_bf16(False)
    assert device.compute_dtype(requested, CPU) == requested


def test_the_environment_overrides_the_check(cpu_bf16, monkeypatch):
    cpu_bf16(False)
    monkeypatch.setenv(device.NATIVE_BF16_ENV, "1")
    assert device.compute_dtype("auto", CPU) == "bf16"


def test_the_fingerprint_holds_the_resolved_teacher_dtype(cpu_bf16, llama_dir, corpus_jsonl, tmp_path):
    """An ``auto`` cache made on a bf16 CPU is the bf16 cache, and one made without bf16 the fp32 cache; the two differ."""
    def plan(dtype: str):
        args = cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"teacher.dtype": dtype})
        return make_plan(load_config(CacheJob, None, args))

    cpu_bf16(True)
    native = plan("auto")
    assert native.teacher_dtype == "bf16" and native.header.teacher["dtype"] == "bf16"
    assert native.fingerprint == plan("bf16").fingerprint
    cpu_bf16(False)
    emulated = plan("auto")
    assert emulated.teacher_dtype == "fp32" and emulated.header.teacher["dtype"] == "fp32"
    assert emulated.fingerprint == plan("fp32").fingerprint != native.fingerprint


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_the_student_computes_in_bf16_only_with_native_support(cpu_bf16, monkeypatch, native, expected,
                                                                 llama_dir, corpus_jsonl, tmp_path, capfd):
    """The training step runs under bf16 autocast exactly when ``auto`` picks bf16; the checkpoint records it."""
    from helpers import cache

    cpu_bf16(False)
    directory = cache(cache_args(llama_dir, corpus_jsonl, tmp_path / "c", **{"data.seq_len": 32})).directory
    cpu_bf16(native)
    seen = []
    original = torch.autocast.__init__

    def spy(self, device_type, dtype=None, enabled=True, *args, **kwargs):
        if enabled:  # transformers' rotary embeddings open disabled ones
            seen.append((device_type, dtype))
        original(self, device_type, dtype, enabled, *args, **kwargs)

    monkeypatch.setattr(torch.autocast, "__init__", spy)
    out = tmp_path / "run"
    train(train_args(directory, out, **{"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 0}))
    assert (("cpu", torch.bfloat16) in seen) == native
    assert f"student computes in {expected} (auto:" in capfd.readouterr().err
    state = json.loads(next((out / "checkpoints").glob("*/state.json")).read_text())
    assert state["precision"] == expected
