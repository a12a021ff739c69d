"""Entry points of ``distillery train`` (a student from a cache) and ``distillery pretrain`` (CE on raw text)."""
from __future__ import annotations

from pathlib import Path

from pipeline.config_loading import to_yaml
from pipeline.data.pack import prepare_splits
from pipeline.data.prompts import check_lengths, load_prompts
from pipeline.dist import world
from pipeline.errors import ConfigError
from pipeline.models.decode import Sampling
from pipeline.train.config import LossConfig, Phase, PretrainJob, TrainConfig, TrainJob, resolve_phases
from pipeline.train.online import OnlineBatches
from pipeline.train.recipe import TrainingRecipe
from pipeline.train.sources import BatchSource, cache_source, text_source
from pipeline.train.student import student_positions
from pipeline.train.trackers import RoundGroup
from storage import StreamOrder


def _check_retempering(source: BatchSource, phases: list[Phase], cache_dir: str) -> None:
    """Sampled counts carry no logits, so a sample or hybrid cache trains only at its own temperature."""
    for index, phase in enumerate(phases):
        retempered = phase.loss.temperature not in (None, source.temperature)
        kd = phase.loss.kind != "ce" and not phase.loss.teacher_live
        if source.mode in ("sample", "hybrid") and retempered and kd:
            raise ConfigError(
                f"loss.temperature {phase.loss.temperature} (phase {index}) differs from the temperature of "
                f"{source.mode}-mode cache {cache_dir} ({source.temperature}); sampled counts cannot be re-tempered, "
                f"so cache again with cache.temperature={phase.loss.temperature}")


def _student_tokenizer(job: TrainJob):
    """The tokenizer that ``student.tokenizer`` names, or None (the cache's)."""
    from transformers import AutoTokenizer

    if not job.student.tokenizer:
        return None
    try:
        return AutoTokenizer.from_pretrained(job.student.tokenizer)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"student.tokenizer {job.student.tokenizer!r} does not load as a tokenizer "
                          f"({' '.join(str(exc).split())[:200]}); name a folder written by save_pretrained") from None


def _check_cross_tokenizer(source: BatchSource, job: TrainJob, phases: list[Phase]) -> None:
    """A student with another tokenizer needs a cross-tokenizer KD loss, and no live teacher or online mode."""
    if source.alignment is None:
        return
    where = f"student.tokenizer {job.student.tokenizer!r} differs from the tokenizer of cache {job.cache.dir}"
    for index, phase in enumerate(phases):
        if phase.loss.kind != "ce" and phase.loss.alpha < 1.0 and not phase.loss.cross_tokenizer:
            raise ConfigError(f"{where}: set loss.cross_tokenizer=uld or gold (phase {index}), or loss.kind=ce")
    if job.online:
        raise ConfigError(f"{where}: online mode needs the teacher's tokenizer; drop the online section")


def _stream_order(train: TrainConfig, shuffle_buffer: int) -> StreamOrder:
    """This process's place in the job's global sample order."""
    here = world()
    return StreamOrder(train.batch_size, train.seed, shuffle_buffer, here.rank, here.size, train.grad_accum)


def _run(recipe: TrainingRecipe) -> Path | str:
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.close()


def train_from_cache(job: TrainJob, group: RoundGroup | None = None) -> Path | str:
    """Distil a student from the cached soft targets in ``job.cache.dir``; return where its ``final/`` is (a URL
    when ``train.out_dir`` is one, whose working copy goes under ``cache.local_dir``). ``group``: the
    ``distillery run`` round it trains, whose tracker runs join the run's."""
    order = _stream_order(job.train, job.cache.shuffle_buffer)
    student_tokenizer = _student_tokenizer(job)
    source = cache_source(job.cache, order, job.train.num_workers, student_tokenizer,
                          student_positions(job.student, job.cache.local_dir) if student_tokenizer else None)
    phases = resolve_phases(job.train, job.loss)
    _check_retempering(source, phases, job.cache.dir)
    _check_cross_tokenizer(source, job, phases)
    online = None
    if job.online:  # the prompts are read and checked before any weights load
        o = job.online
        prompts = load_prompts(o.prompts, source.tokenizer, None, section="online.prompts")
        check_lengths(prompts, o.max_new_tokens, student_positions(job.student, job.cache.local_dir),
                      ("online.prompts.path", "online.max_new_tokens"))
        online = OnlineBatches(prompts, order, source.tokenizer,
                               Sampling(o.max_new_tokens, o.temperature, o.top_p, job.train.seed))
    recipe = TrainingRecipe(source, order, job.student, job.train, phases, job.device, to_yaml(job),
                            job.live_teacher, job.cache.local_dir, online, group)
    return _run(recipe)


def pretrain(job: PretrainJob) -> Path | str:
    """Train a model with cross-entropy on raw text (the demo teacher, or a CE-only baseline)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer)
    splits = prepare_splits(job.data, tokenizer)
    order = _stream_order(job.train, shuffle_buffer=1)  # text_source shuffles the whole split as one block
    source = text_source(splits, tokenizer, order)
    phases = [Phase(job.train.steps, job.train.lr, LossConfig(kind="ce"))]
    recipe = TrainingRecipe(source, order, job.student, job.train, phases, job.device, to_yaml(job))
    return _run(recipe)
