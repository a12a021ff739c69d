"""Corruptions of a finished cache, of an interrupted one's done records and of a token store: each is named and
none is ever used. Every case runs on a fresh copy of one small cache per format."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import cache, cache_args, train_args

from pipeline import cli
from storage.io.hashing import tree_sha256
from storage.io.seals import with_seal
from storage.manifest import MANIFEST_NAME, MANIFEST_SEAL
from storage.write.cache import CacheDirectory
from storage.write.folder import DONE_SEAL

DAMAGED = "train-00003"  # the 12 steps of train_args never read it: only checking every shard up front finds it


def shard(directory: Path) -> Path:
    """The damaged shard of a copied cache."""
    return next(directory.glob(f"{DAMAGED}.*[!n]"))  # the shard, not its .done.json


def inner_file(path: Path) -> Path:
    """The shard itself (Arrow), or the largest file inside a Zarr shard directory."""
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size) if path.is_dir() else path


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, edit: Callable[[dict], None], reseal: str | None = None) -> None:
    """Change a JSON record as a hand edit would, keeping it valid JSON; ``reseal`` recomputes its self-checksum
    under that key, so that only the check behind the edit can stop it."""
    data = json.loads(path.read_text())
    edit(data)
    if reseal:
        data = with_seal({k: v for k, v in data.items() if k != reseal}, reseal)
    path.write_text(json.dumps(data, indent=2))


# What each damage does to a copied cache, and the name the messages must give.
def flip_shard(directory):
    flip_byte(inner_file(shard(directory)))
    return shard(directory).name


def truncate_shard(directory):
    truncate(inner_file(shard(directory)))
    return shard(directory).name


def delete_shard(directory):
    path = shard(directory)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path.name


def swap_shards(directory):
    path = shard(directory)
    other = path.with_name(path.name.replace(DAMAGED, "train-00004"))
    aside = path.with_name("aside")
    path.rename(aside)
    other.rename(path)
    aside.rename(other)
    return path.name


def edit_manifest(edit, reseal=False):
    def damage(directory):
        edit_json(directory / MANIFEST_NAME, edit, MANIFEST_SEAL if reseal else None)
        return MANIFEST_NAME
    return damage


def set_shard(index: int, key: str, value):
    return lambda manifest: manifest["shards"][index].__setitem__(key, value)


def truncate_manifest(directory):
    truncate(directory / MANIFEST_NAME)
    return MANIFEST_NAME


def symlink_outside(directory):
    path = shard(directory)
    outside = directory.parent / f"outside-{path.name}"
    path.rename(outside)
    path.symlink_to(outside, target_is_directory=outside.is_dir())
    return path.name


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], str]
    formats: tuple[str, ...] = ("arrow",)


BOTH = ("arrow", "zarr")
CASES = [
    Case("bit flip in a shard", flip_shard, BOTH),
    Case("truncated shard", truncate_shard, BOTH),
    Case("deleted shard", delete_shard, BOTH),
    Case("two shards swapped", swap_shards, BOTH),
    Case("shard sha256 changed", edit_manifest(set_shard(3, "sha256", "0" * 64))),
    Case("shard record removed", edit_manifest(lambda m: m["shards"].pop(3))),
    Case("vocab_size changed", edit_manifest(lambda m: m.__setitem__("vocab_size", m["vocab_size"] + 1))),
    Case("seq_len changed", edit_manifest(lambda m: m.__setitem__("seq_len", 16))),
    Case("truncated manifest", truncate_manifest),
    Case("shard path ../x.arrow", edit_manifest(set_shard(3, "path", "../x.arrow"), reseal=True)),
    Case("absolute shard path", edit_manifest(set_shard(3, "path", "/etc/hostname"), reseal=True)),
    Case("shard symlinked outside", symlink_outside, BOTH),
]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, llama_dir, corpus_jsonl) -> dict[str, Path]:
    """One finished cache per format: 20 train shards of 8 sequences of 32 tokens."""
    root = tmp_path_factory.mktemp("caches")
    return {fmt: cache(cache_args(llama_dir, corpus_jsonl, root / fmt,
                                  **{"data.seq_len": 32, "cache.format": fmt})).directory for fmt in BOTH}


def copy_of(source: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "cache"
    shutil.copytree(source, directory, symlinks=True)
    return directory


def assert_nothing_trained(out: Path) -> None:
    metrics = out / "metrics.jsonl"
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "step" in r] if metrics.exists() else []
    assert not (out / "checkpoints").exists() and not (out / "final").exists() and steps == []


@pytest.mark.parametrize("fmt, case", [(f, c) for c in CASES for f in c.formats],
                         ids=[f"{c.name} ({f})" for c in CASES for f in c.formats])
def test_a_damaged_cache_is_named_by_verify_and_never_trained_on(fmt, case, caches, tmp_path, capfd):
    directory = copy_of(caches[fmt], tmp_path)
    named = case.damage(directory)
    capfd.readouterr()
    assert cli.main(["verify", str(directory)]) != 0
    assert named in capfd.readouterr().err

    out = tmp_path / "out"
    assert cli.main(["train", *train_args(directory, out)]) == 2
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err
    assert_nothing_trained(out)


def test_the_self_checksum_is_written_and_a_manifest_without_one_still_reads(caches, tmp_path, capfd):
    directory = copy_of(caches["arrow"], tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert len(manifest[MANIFEST_SEAL]) == 64 and list(manifest)[-1] == MANIFEST_SEAL
    edit_json(directory / MANIFEST_NAME, lambda m: m.pop(MANIFEST_SEAL))  # as an older Distillery wrote it
    assert cli.main(["verify", str(directory)]) == 0
    capfd.readouterr()
    assert cli.main(["inspect", "--json", str(directory)]) == 0
    assert json.loads(capfd.readouterr().out)["shards"] == len(manifest["shards"])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, llama_dir, corpus_jsonl):
    """A cache whose run died after writing 24 of its 26 shards and their done records, and its arguments."""
    directory = tmp_path_factory.mktemp("interrupted") / "cache"
    args = cache_args(llama_dir, corpus_jsonl, directory, **{"data.seq_len": 32})
    original, written = CacheDirectory.write_shard, []

    def die_after_24(self, plan, *rest):
        if len(written) == 24:
            raise RuntimeError("killed")
        original(self, plan, *rest)
        written.append(plan.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CacheDirectory, "write_shard", die_after_24)
        with pytest.raises(RuntimeError, match="killed"):
            cache(args)
    return directory, args


def edit_record(key: str, change: Callable, reseal: bool) -> Callable[[Path], None]:
    return lambda path: edit_json(path, lambda r: r.__setitem__(key, change(r[key])), DONE_SEAL if reseal else None)


DONE_DAMAGE = {
    "invalid JSON": truncate,
    "edited token count": edit_record("tokens", lambda n: n + 1, reseal=False),
    "wrong sha256, resealed": edit_record("sha256", lambda _: "0" * 64, reseal=True),
    "wrong sequence count, resealed": edit_record("sequences", lambda n: n - 1, reseal=True),
}


@pytest.mark.parametrize("damage", sorted(DONE_DAMAGE))
def test_a_damaged_done_record_is_named_and_its_shard_redone(damage, interrupted, caches, tmp_path, capfd,
                                                            monkeypatch):
    source, args = interrupted
    directory = copy_of(source, tmp_path)
    args = [a if not a.startswith("cache.dir=") else f"cache.dir={directory}" for a in args]
    capfd.readouterr()
    assert cli.main(["verify", str(directory)]) == 2
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and "not a complete" in err and "Traceback" not in err

    record = directory / "train-00001.arrow.done.json"
    DONE_DAMAGE[damage](record)
    rewritten = []
    original = CacheDirectory.write_shard
    monkeypatch.setattr(CacheDirectory, "write_shard",
                        lambda self, plan, *rest: rewritten.append(plan.name) or original(self, plan, *rest))
    assert cli.main(["cache", *args]) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and record.name in warnings[0]
    assert "train-00001.arrow" in rewritten and "train-00000.arrow" not in rewritten
    assert json.loads((directory / MANIFEST_NAME).read_text())["shards"] == \
        json.loads((caches["arrow"] / MANIFEST_NAME).read_text())["shards"]  # identical to an undamaged run


def flip_max_id(index: Path) -> None:
    edit_json(index, lambda i: i.__setitem__("max_id", i["max_id"] - 1))  # still valid JSON


STORE_DAMAGE = {
    "bit flip in train.arrow": ("train.arrow", flip_byte),
    "truncated train.arrow": ("train.arrow", truncate),
    "truncated index.json": ("index.json", truncate),
    "edited index.json": ("index.json", flip_max_id),
}


@pytest.mark.parametrize("command", ["prepare", "cache"])
@pytest.mark.parametrize("damage", sorted(STORE_DAMAGE))
def test_a_damaged_token_store_is_named_and_rebuilt(damage, command, caches, llama_dir, corpus_jsonl, tmp_path,
                                                    capfd):
    directory = copy_of(caches["arrow"], tmp_path)
    (store,) = [p for p in (directory / "tokens").iterdir() if p.is_dir()]
    before = {p.name: tree_sha256(p) for p in store.iterdir()}
    name, damage_file = STORE_DAMAGE[damage]
    damage_file(store / name)
    capfd.readouterr()
    assert cli.main([command, *cache_args(llama_dir, corpus_jsonl, directory, **{"data.seq_len": 32})]) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(store / name) in warnings[0] and "rebuilding" in warnings[0]
    assert {p.name: tree_sha256(p) for p in store.iterdir()} == before
    if command == "cache":
        assert "cache hit" in err
