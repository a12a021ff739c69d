"""Nothing damaged or foreign is loaded: a resume falls back from a damaged checkpoint to the previous complete one,
says so and ends bitwise-equal to an uninterrupted run; pickles that would run code and model folders that
ship code are refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cache, cache_args, train, train_args, train_interrupted_at
from safetensors.torch import load_file

from pipeline import cli
from pipeline.train.checkpoint import STATE_SEAL, checkpoint_dirs
from storage.io.hashing import tree_sha256
from storage.io.seals import with_seal

SETTINGS = {"train.steps": 12, "train.checkpoint_every": 4, "train.keep_checkpoints": 2}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, llama_dir, corpus_jsonl) -> Path:
    return cache(cache_args(llama_dir, corpus_jsonl, tmp_path_factory.mktemp("c") / "c",
                            **{"data.seq_len": 32})).directory


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    return load_file(train(train_args(cache_dir, tmp_path_factory.mktemp("whole"), **SETTINGS)) / "model.safetensors")


def stopped_after_step_8(cache_dir: Path, out: Path, monkeypatch) -> Path:
    """Interrupt a run during step 9, after its checkpoint at step 8; return that checkpoint."""
    train_interrupted_at(9, train_args(cache_dir, out, **SETTINGS), monkeypatch)
    older, newest = checkpoint_dirs(out / "checkpoints")
    assert (older.name, newest.name) == ("step-00000004", "step-00000008")
    state = json.loads((newest / "state.json").read_text())
    assert set(state["files"]) == {p.name for p in newest.iterdir()} - {"state.json"} and list(state)[-1] == STATE_SEAL
    return newest


class Plant:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, as a tampered checkpoint could run anything."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def truncate(file: Path) -> Path:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return file


def plant_pickle(file: Path, marker: Path) -> Path:
    """Add the payload to ``file`` and record its new size and sha256 in ``state.json`` (resealed): only the refusal
    to unpickle anything but plain data stands between the file and the marker."""
    data = torch.load(file, weights_only=True)
    torch.save({**data, "payload": Plant(marker)}, file)
    state_file = file.parent / "state.json"
    state = json.loads(state_file.read_text())
    state["files"][file.name] = {"bytes": file.stat().st_size, "sha256": tree_sha256(file)}
    state_file.write_text(json.dumps(with_seal({k: v for k, v in state.items() if k != STATE_SEAL}, STATE_SEAL)))
    return file


def as_older_distillery(checkpoint: Path) -> Path:
    """Drop what ``state.json`` records of the files, and its seal, as a checkpoint written before them; then
    truncate its safetensors: only loading it can find the damage."""
    state_file = checkpoint / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k not in ("files", STATE_SEAL)}))
    return truncate(next(checkpoint.glob("*.safetensors")))


DAMAGE = {
    "truncated model and optimizer safetensors": lambda ckpt, marker: truncate(next(ckpt.glob("*.safetensors"))),
    "truncated scheduler.pt": lambda ckpt, marker: truncate(ckpt / "scheduler.pt"),
    "truncated state.json": lambda ckpt, marker: truncate(ckpt / "state.json"),
    "malicious scheduler.pt": lambda ckpt, marker: plant_pickle(ckpt / "scheduler.pt", marker),
    "malicious rng.pt": lambda ckpt, marker: plant_pickle(ckpt / "rng.pt", marker),
    "truncated safetensors without file records": lambda ckpt, marker: as_older_distillery(ckpt),
}


def test_the_planted_pickle_runs_when_unpickled_unsafely(tmp_path):
    """The control for the tests below: the payload does create its marker when loaded without weights_only."""
    torch.save({"last_epoch": 0, "payload": Plant(tmp_path / "marker")}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_ends_bitwise_equal(damage, cache_dir, uninterrupted, tmp_path,
                                                                       capfd, monkeypatch):
    out, marker = tmp_path / "out", tmp_path / "marker"
    newest = stopped_after_step_8(cache_dir, out, monkeypatch)
    damaged = DAMAGE[damage](newest, marker)
    capfd.readouterr()
    assert cli.main(["train", *train_args(cache_dir, out, **SETTINGS)]) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    older = newest.with_name("step-00000004")
    assert len(warnings) == 1 and str(damaged) in warnings[0] and f"falling back to the previous complete checkpoint {older}" in warnings[0], err
    assert f"resumed from {older} at step 4" in err and not marker.exists()
    resumed = load_file(out / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # The damaged one was set aside, so pruning kept the new checkpoints and not it.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["step-00000008", "step-00000008.damaged", "step-00000012"]


def test_no_usable_checkpoint_exits_2_naming_every_file(cache_dir, uninterrupted, tmp_path, capfd, monkeypatch):
    out, marker = tmp_path / "out", tmp_path / "marker"
    newest = stopped_after_step_8(cache_dir, out, monkeypatch)
    older = newest.with_name("step-00000004")
    damaged = [truncate(newest / "scheduler.pt"), plant_pickle(older / "rng.pt", marker)]
    capfd.readouterr()
    assert cli.main(["train", *train_args(cache_dir, out, **SETTINGS)]) == 2
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and all(str(f) in err for f in damaged) and "train.resume=never" in err, err
    assert checkpoint_dirs(out / "checkpoints") == [older, newest] and not marker.exists()

    assert cli.main(["train", *train_args(cache_dir, out, **SETTINGS, **{"train.resume": "never"})]) == 0
    restarted = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(restarted[k], uninterrupted[k]) for k in uninterrupted)


@pytest.fixture
def model_with_code(llama_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A teacher folder whose config names its own code (``auto_map``), which creates a marker when imported."""
    import transformers.dynamic_module_utils as dynamic_modules

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    folder, marker = tmp_path / "with_code", tmp_path / "marker"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama_with_code", auto_map={"AutoConfig": "shipped.ShippedConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "shipped.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\n"
        "class ShippedConfig(LlamaConfig):\n    model_type = 'llama_with_code'\n")
    return folder, marker


def test_code_shipped_with_a_model_runs_only_when_trusted(model_with_code, cache_dir, corpus_jsonl, tmp_path, capfd):
    folder, marker = model_with_code
    as_teacher = ["prepare", *cache_args(folder, corpus_jsonl, tmp_path / "cache")]
    as_student = ["train", *train_args(cache_dir, tmp_path / "out", **{"student.model": folder, "student.config": "null"})]
    for command in (as_teacher, as_student):  # a student has no trust_remote_code key: its code never runs
        capfd.readouterr()
        assert cli.main(command) == 2
        err = capfd.readouterr().err
        assert len(err.splitlines()) == 1 and "trust_remote_code" in err and str(folder) in err, err
        assert not marker.exists()
    cli.main([*as_teacher, "teacher.trust_remote_code=true"])  # the control: trusted, the code runs
    assert marker.exists()
