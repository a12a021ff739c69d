"""``kill -9`` of the whole process tree at random times, for every stage; each kill is followed by a rerun.

The outcome must be bitwise that of a run that was never interrupted.
"""
from __future__ import annotations

import signal

import pytest
from harness import Sweep
from jobs import (
    cache_command,
    cache_overrides,
    check_cache,
    check_run,
    check_training,
    distillery,
    lora_train_command,
    never_complete_by_mistake,
    on_policy_command,
    run_command,
    run_state_is_json,
    shard_hashes,
    timed,
    train_command,
)

KILL = signal.SIGKILL


# The Zarr sweep builds its own reference cache and is the slowest of all: ``make chaos`` only.
@pytest.mark.parametrize("backend", ["arrow", pytest.param("zarr", marks=pytest.mark.full_scale)])
def test_stage1_survives_random_kills(backend, tmp_path, reference_cache, chaos_teacher, chaos_corpus, scale, seed,
                                      chaos_results):
    reference, wall = reference_cache
    if backend != "arrow":
        reference = tmp_path / "reference"
        wall = timed(distillery("cache", *cache_overrides(chaos_teacher, chaos_corpus, reference, backend)))
    expected = shard_hashes(reference)
    sweep = Sweep(f"cache-{backend}", cache_command(chaos_teacher, chaos_corpus, backend, torchrun_every=2),
                  wall, f"{seed}-cache-{backend}", KILL)
    result = sweep.run(lambda trial: tmp_path / f"trial-{trial}", lambda out, _: check_cache(out, expected),
                       scale["cache"], tmp_path / "log.txt", lambda out, _: never_complete_by_mistake(out))
    chaos_results.add_sweep("1 cache", result.summary(), "every shard bitwise, verify passes, no partial files")


def test_stage2_survives_random_kills(tmp_path, reference_cache, reference_training, scale, seed, chaos_results):
    reference, wall = reference_training
    sweep = Sweep("train", train_command(reference_cache[0]), wall, f"{seed}-train", KILL)
    result = sweep.run(lambda trial: tmp_path / f"trial-{trial}", lambda out, _: check_training(out, reference),
                       scale["train"], tmp_path / "log.txt")
    chaos_results.add_sweep("2 train", result.summary(),
                            "final weights bitwise, every step logged once with the same loss")


@pytest.mark.full_scale  # LoRA students use stage 2's checkpoints, whose kill sweep make test keeps
def test_lora_students_under_ddp_survive_random_kills(tmp_path, reference_cache, chaos_teacher, scale, seed,
                                                      chaos_results):
    command = lora_train_command(reference_cache[0], chaos_teacher)
    reference = tmp_path / "reference"
    wall = timed(command(reference, None))
    sweep = Sweep("train, LoRA, 2 DDP ranks", command, wall, f"{seed}-train-lora", KILL)
    result = sweep.run(lambda trial: tmp_path / f"trial-{trial}", lambda out, _: check_training(out, reference),
                       scale["train"], tmp_path / "log.txt")
    chaos_results.add_sweep("2 train, LoRA", result.summary(),
                            "merged final weights bitwise, every step logged once with the same loss")


@pytest.mark.full_scale  # stage 3 runs stages 1 and 2, whose kill sweeps make test keeps
def test_stage3_survives_random_kills(tmp_path, llama_dir, corpus_jsonl, reference_run, scale, seed, chaos_results):
    reference, wall = reference_run
    sweep = Sweep("run", run_command(llama_dir, corpus_jsonl), wall, f"{seed}-run", KILL)
    result = sweep.run(lambda trial: tmp_path / f"trial-{trial}", lambda out, _: check_run(out, reference),
                       scale["run"], tmp_path / "log.txt", lambda run_dir, _: run_state_is_json(run_dir))
    chaos_results.add_sweep("3 run", result.summary(), "round 2's student bitwise, state.json always valid JSON")


@pytest.mark.full_scale
def test_on_policy_rounds_survive_random_kills(tmp_path, llama_dir, on_policy_inputs, reference_on_policy_run, scale,
                                               seed, chaos_results):
    """Kills land in every stage of both rounds: generate, cache and train."""
    reference, wall = reference_on_policy_run
    sweep = Sweep("on-policy run", on_policy_command(llama_dir, *on_policy_inputs), wall, f"{seed}-on-policy", KILL)
    result = sweep.run(lambda trial: tmp_path / f"trial-{trial}", lambda out, _: check_run(out, reference),
                       scale["run"], tmp_path / "log.txt", lambda run_dir, _: run_state_is_json(run_dir))
    chaos_results.add_sweep("3 on-policy run", result.summary(),
                            "round 2's student bitwise (it generated round 2's data), state.json always valid JSON")
