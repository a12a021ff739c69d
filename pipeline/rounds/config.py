"""Typed config of stage 3, ``distillery run``: a pipeline of rounds, each a cache stage and a train stage.

Top-level ``teacher``, ``data``, ``cache``, ``train`` and ``loss`` are the
defaults; each entry of ``rounds`` may override any of them and must give a
``student``. Round 1's teacher is ``teacher.model``; round n's is the final
student of round n-1 unless the round names ``teacher.model`` itself. ``teacher.gguf_file`` goes with the
configured ``teacher.model`` only: a round whose teacher is another model (a previous student, a
``save_pretrained`` folder) does not inherit it.

``run.dir`` may be a URL: the run then works in a local copy under ``cache.local_dir`` (``run_mirror``), and
each round trains into ``<run.dir>/round-N/train``, a URL too, which training mirrors itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.cache.config import CacheConfig, CacheJob, TeacherConfig
from pipeline.config_loading import build_config, merge, need, raise_problems
from pipeline.data.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.generate.config import GenerateJob
from pipeline.models.gguf import same_folder, split_gguf_path
from pipeline.train.config import TrainJob
from storage import Mirror, join

STAGES = ("generate", "cache", "train")
ROUND_KEYS = {"teacher", "data", "cache", "student", "train", "loss", "generate"}
ON_POLICY_KEYS = {"rounds", "prompts_per_round", "student", "generate", "data", "cache", "train", "loss"}


@dataclass
class RunSettings:
    dir: str = ""
    """Run directory: ``round-N/`` folders, ``state.json``, ``report.md`` and its plots. May be a URL
    (``s3://bucket/prefix``): then run one scheduler job per stage at a time, as the locks stay local."""

    def __post_init__(self):
        raise_problems(need(bool(self.dir), "dir", "is required (the run directory)"))


@dataclass
class RunJob:
    """Everything ``distillery run`` needs."""

    run: RunSettings = field(default_factory=RunSettings)
    """Where the run lives."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Round 1's teacher, and the defaults of later rounds' explicit teachers."""
    data: DataConfig = field(default_factory=DataConfig)
    """Default data of every round."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Default cache settings; ``cache.root`` is shared so experiments reuse caches."""
    train: dict = field(default_factory=dict)
    """Default ``train.*`` settings of every round (``out_dir`` is set per round)."""
    loss: dict = field(default_factory=dict)
    """Default ``loss.*`` settings of every round."""
    rounds: list = field(default_factory=list)
    """The rounds: each a mapping with ``student`` and optional teacher/data/cache/train/loss overrides, and an
    optional ``generate`` section (``by: teacher`` or ``student``, plus ``generate.*`` settings): the round then
    first generates completions of its data's prompts, and its cache is built on them."""
    on_policy: dict = field(default_factory=dict)
    """Shorthand for on-policy rounds after ``rounds``: ``{rounds: K, prompts_per_round: M}``, with optional
    ``student`` (the first round's starting model; default: the previous round's final), ``generate``, ``data``,
    ``cache``, ``train`` and ``loss``. Each of the K rounds shares ``teacher.model``; its student generates
    from a fresh, disjoint slice of M prompts, the teacher caches soft targets on those completions, and the
    student trains on them, continuing from the previous round's ``final/``."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    def __post_init__(self):
        shorthand = _on_policy_problems(self.on_policy, bool(self.rounds))
        problems = [need(bool(self.rounds or self.on_policy), "rounds", "needs at least one round"),
                    need(not self.cache.dir, "cache.dir", "is set per round; give cache.root instead"), *shorthand]
        if not any(shorthand):  # a malformed shorthand cannot be expanded into rounds to check
            for index in range(1, self.round_count() + 1):
                problems.extend(_round_problems(self, index))
        raise_problems(*problems)

    def round_count(self) -> int:
        return len(all_rounds(self))


def _on_policy_problems(shorthand: dict, after_rounds: bool) -> list:
    if not shorthand:
        return []
    unknown = sorted(set(shorthand) - ON_POLICY_KEYS)
    return [need(not unknown, "on_policy", f"unknown keys {unknown}; it takes {sorted(ON_POLICY_KEYS)}"),
            need(after_rounds or "student" in shorthand, "on_policy.student",
                 "is required when no round precedes the on-policy rounds: the model the student starts from, "
                 "e.g. {model: path}"),
            need(isinstance(shorthand.get("rounds"), int) and shorthand["rounds"] >= 1, "on_policy.rounds",
                 f"must be an integer >= 1, got {shorthand.get('rounds')!r}"),
            need(isinstance(shorthand.get("prompts_per_round"), int) and shorthand["prompts_per_round"] >= 1,
                 "on_policy.prompts_per_round", f"must be an integer >= 1, got {shorthand.get('prompts_per_round')!r}")]


def all_rounds(job: RunJob) -> list:
    """``rounds``, then the rounds that ``on_policy`` stands for."""
    shorthand = job.on_policy
    if not shorthand:
        return list(job.rounds)
    rounds, per_round = list(job.rounds), shorthand["prompts_per_round"]
    overrides = {key: shorthand[key] for key in ("data", "cache", "train", "loss") if key in shorthand}
    for k in range(shorthand["rounds"]):
        index = len(rounds) + 1
        student = shorthand["student"] if k == 0 and "student" in shorthand else {"model": previous_final(job, index)}
        generate = {**shorthand.get("generate", {}), "by": "student", "first_prompt": k * per_round,
                    "max_prompts": per_round}
        rounds.append({"teacher": {"model": job.teacher.model}, "student": student, "generate": generate,
                       **overrides})
    return rounds


def stages_of(job: RunJob, index: int) -> tuple[str, ...]:
    """The stages of round ``index``: generate first only where the round has a ``generate`` section."""
    return STAGES if "generate" in job_round(job, index) else STAGES[1:]


def job_round(job: RunJob, index: int) -> dict:
    """Round ``index`` (1-based) as configured, with the ``on_policy`` rounds expanded."""
    entry = all_rounds(job)[index - 1]
    return entry if isinstance(entry, dict) else {}


def run_mirror(job: RunJob) -> Mirror:
    """The run directory, worked on in place, or for a URL in a local copy under ``cache.local_dir``."""
    return Mirror(job.run.dir, job.cache.local_dir)


def round_name(index: int) -> str:
    return f"round-{index}"


def generation_dir(job: RunJob, index: int) -> str:
    """Round ``index``'s generation folder: its ``generate.out_dir``, or ``round-N/generations``. A named folder
    may be shared by several runs: its fingerprint makes a second run with the same model, prompts and sampling
    a hit."""
    named = job_round(job, index).get("generate", {}).get("out_dir")
    return str(join(named)) if named else str(join(job.run.dir, round_name(index), "generations"))


def train_dir(job: RunJob, index: int) -> str:
    """Round ``index``'s ``train.out_dir``: inside the run directory, a URL when ``run.dir`` is one."""
    return str(join(job.run.dir, round_name(index), "train"))


def previous_final(job: RunJob, index: int) -> str:
    """Where round ``index - 1`` saves its student."""
    return str(join(train_dir(job, index - 1), "final"))


def teacher_of(job: RunJob, index: int) -> str:
    """Round ``index``'s teacher: explicit, round 1's configured teacher, or the previous final student."""
    own = job_round(job, index).get("teacher", {})
    explicit = own.get("model") or split_gguf_path(own.get("gguf_file") or "")[0]  # a GGUF path names its folder
    if explicit:
        return explicit
    return job.teacher.model if index == 1 else previous_final(job, index)


def round_teacher(job: RunJob, index: int) -> dict:
    """Round ``index``'s ``teacher`` settings: the defaults with the round's own on top, its model from
    ``teacher_of``, and the default ``gguf_file`` only where that model is the configured ``teacher.model``."""
    own = job_round(job, index).get("teacher", {})
    model = teacher_of(job, index)
    teacher = merge(asdict(job.teacher), {**own, "model": model})
    if "gguf_file" not in own and not same_folder(model, job.teacher.model):
        teacher["gguf_file"] = None
    return teacher


def round_data(job: RunJob, index: int) -> dict:
    """Round ``index``'s ``data`` settings: the defaults with the round's own on top."""
    return merge(asdict(job.data), job_round(job, index).get("data", {}))


def cache_job(job: RunJob, index: int) -> CacheJob:
    """Round ``index``'s cache job; a round that generates caches its generation folder."""
    entry = job_round(job, index)
    teacher = round_teacher(job, index)
    data = round_data(job, index)
    if "generate" in entry:
        data["path"] = generation_dir(job, index)
    return build_config(CacheJob, {"teacher": teacher, "data": data,
                                   "cache": merge(asdict(job.cache), entry.get("cache", {})), "device": job.device})


def generate_job(job: RunJob, index: int) -> GenerateJob:
    """Round ``index``'s generation: by its teacher (sequence-level KD) or by its student's starting model
    (on-policy), over the prompts of the round's data, into the round's ``generations/``."""
    settings = dict(job_round(job, index).get("generate", {}))
    by = settings.pop("by", None)
    if by not in ("teacher", "student"):
        raise ConfigError(f"invalid config:\n  - generate.by: must be teacher or student, got {by!r}")
    if by == "teacher":
        teacher = round_teacher(job, index)
        model = {"model": teacher["model"], "gguf_file": teacher["gguf_file"]}
    else:
        model = {"model": job_round(job, index).get("student", {}).get("model")}
        if not model["model"]:
            raise ConfigError("invalid config:\n  - generate.by: student needs student.model, a model that can "
                              "write (a random-init student.config cannot)")
    generate = {**settings, **model, "out_dir": generation_dir(job, index), "local_dir": job.cache.local_dir}
    return build_config(GenerateJob, {"generate": generate, "data": round_data(job, index), "device": job.device})


def train_job(job: RunJob, index: int, cache_dir: str) -> TrainJob:
    """Round ``index``'s training job; it keeps its local copies where the round's cache settings say."""
    entry = job_round(job, index)
    cache = merge(asdict(job.cache), entry.get("cache", {}))
    source = {"dir": cache_dir, "local_dir": cache["local_dir"], "local_bytes": cache["local_bytes"]}
    train = merge(merge(job.train, entry.get("train", {})), {"out_dir": train_dir(job, index)})
    return build_config(TrainJob, {"cache": source, "student": entry.get("student", {}), "train": train,
                                   "loss": merge(job.loss, entry.get("loss", {})), "device": job.device})


def _round_problems(job: RunJob, index: int) -> list:
    entry = all_rounds(job)[index - 1]
    where = f"rounds[{index - 1}]" if index <= len(job.rounds) else f"on_policy (round {index})"
    if not isinstance(entry, dict):
        return [(where, f"must be a mapping, got {entry!r}")]
    unknown = sorted(set(entry) - ROUND_KEYS)
    if unknown:
        return [(where, f"unknown keys {unknown}; a round takes {sorted(ROUND_KEYS)}")]
    problems = []
    builds = [lambda: cache_job(job, index), lambda: train_job(job, index, "<cache of this round>")]
    for build in builds + ([lambda: generate_job(job, index)] if "generate" in entry else []):
        try:
            build()
        except ConfigError as exc:
            details = str(exc).removeprefix("invalid config:\n  - ").replace("\n  - ", "; ")
            problems.append((where, details))
    return problems
