"""Typed configs of ``distillery train`` and ``distillery pretrain``; each field's docstring documents it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from pipeline.config_loading import build_config, device_problem, merge, need, raise_problems
from pipeline.data.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.train.lora import LoraConfig, lora_problems
from pipeline.train.online import OnlineConfig
from storage import DEFAULT_LOCAL_BYTES

TRACKERS = ("tensorboard", "wandb", "mlflow")  # what train.report_to may name (pipeline.train.trackers)


@dataclass
class SourceConfig:
    dir: str = ""
    """The finished cache (from ``distillery cache``) to train on."""
    eval_dir: str | None = None
    """Cache whose ``eval`` shards score the student; defaults to ``dir``. A top-k cache of the same teacher
    and data gives exact KL figures when training on a sample cache."""
    verify: bool = True
    """Verify every shard's sha256 once, before the first step (each rank hashes its share)."""
    shuffle_buffer: int = 1024
    """Sequences shuffled together; the reader holds only the shards one buffer touches."""
    local_dir: str | None = None
    """Where local copies of the shards of a cache at a URL go, downloaded on first use and shared by every
    rank and job of a node; and the working copy of a ``train.out_dir`` URL. Default:
    ``<system temp dir>/distillery-<user>``."""
    local_bytes: int = DEFAULT_LOCAL_BYTES
    """Byte budget of those shard copies; least recently used shards are deleted to stay within it."""
    draws_per_epoch: int | None = None
    """Use a fresh random subset of this many of each position's stored draws every epoch (drawn without
    replacement from the N stored, so each epoch sees an unbiased N'-draw sample and different epochs see
    different ones); the subset is a function of (seed, epoch, sequence), so resumes see the same ones. Needs a
    format-3 sample or hybrid cache with ``cache.samples`` greater than it. ``null``: every stored draw, every
    epoch."""

    def __post_init__(self):
        raise_problems(need(bool(self.dir), "dir", "is required: the cache directory to train on"),
                       need(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1"),
                       need(self.local_bytes >= 1, "local_bytes", "must be >= 1 (bytes)"),
                       need(self.draws_per_epoch is None or self.draws_per_epoch >= 1, "draws_per_epoch",
                            f"must be >= 1 or null (every stored draw), got {self.draws_per_epoch}"))


@dataclass
class StudentConfig:
    model: str | None = None
    """Path or hub id of a pretrained student, loaded with ``from_pretrained``."""
    config: dict | None = None
    """Hugging Face config fields for a random init, e.g. ``{model_type: llama, hidden_size: 128}``;
    ``vocab_size`` defaults to the cache's."""
    from_teacher: str | None = None
    """Path of a checkpoint whose embeddings, head and ``layers`` are copied (DistilBERT style)."""
    layers: list | None = None
    """Layer indices kept by ``from_teacher``; default every other layer."""
    seed: int = 0
    """Seed of the random initialisation: a ``config`` student's weights, or the adapters of ``lora``."""
    tokenizer: str | None = None
    """Folder (or hub id) of the student's own tokenizer; default the cache's. Another tokenizer than the cache's
    makes a cross-tokenizer student: the cache (with text alignment) is spelled as text, tokenized by this one and
    aligned by bytes, and ``loss.cross_tokenizer`` chooses the loss. ``final/`` holds this tokenizer."""
    lora: LoraConfig | None = None
    """Train peft LoRA adapters, not a pretrained student's weights: ``{r, alpha, dropout, target_modules, merge}``."""

    def __post_init__(self):
        given = [k for k in ("model", "config", "from_teacher") if getattr(self, k)]
        raise_problems(need(len(given) == 1, "model", f"set exactly one of student.model, student.config, "
                                                       f"student.from_teacher (got {given or 'none'})"),
                       need(self.config is None or "model_type" in self.config, "config",
                             "needs model_type (e.g. llama or gpt2)"),
                       *lora_problems(self.lora, random_init=bool(self.config), from_teacher=bool(self.from_teacher)))


@dataclass
class LossConfig:
    """``loss``: the objective, ``alpha * CE + (1 - alpha) * KD`` on the cached soft targets."""

    kind: Literal["forward_kl", "reverse_kl", "jsd", "ce"] = "forward_kl"
    """KD divergence on the soft targets, or ``ce`` for hard labels only."""
    tail: Literal["bucket", "ground_truth", "renormalize"] = "bucket"
    """Top-k tail handling: one extra bucket, mass to the true token, or dropped and renormalised."""
    alpha: float = 0.0
    """Weight of hard-label CE: ``alpha * CE + (1 - alpha) * KD``."""
    beta: float = 0.5
    """JSD mixture weight (GKD): 0 gives forward KL, 1 reverse KL."""
    temperature: float | None = None
    """KD temperature; re-tempers the cached log-probs when it differs from the cache's. Default: the cache's."""
    teacher_live: str | None = None
    """Path of a teacher run at every step: the loss is then ``kind`` over the full vocabulary, on the cache's
    sequences (online KD, the cache's yardstick) or on the student's own samples (``online``)."""
    cross_tokenizer: Literal["uld", "gold"] | None = None
    """The KD loss of a student whose tokenizer differs from the cache's (``student.tokenizer``), at the positions
    aligned by bytes: ``uld`` (Universal Logit Distillation: L1 between the sorted probability vectors, needing no
    shared vocabulary) or ``gold`` (KL on the tokens both vocabularies spell alike, ULD on the rest). Mix it with
    CE through ``alpha``: only aligned positions get KD, the others learn from CE alone."""

    def __post_init__(self):
        raise_problems(need(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}"),
                       need(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}"),
                       need(self.temperature is None or self.temperature > 0, "temperature", "must be > 0"),
                       need(not (self.cross_tokenizer and self.teacher_live), "cross_tokenizer",
                            "a live teacher shares the student's tokenizer; drop loss.teacher_live or this key"))


@dataclass
class LiveTeacherConfig:
    """How the teacher named by ``loss.teacher_live`` is loaded."""

    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype of the live teacher; ``auto`` chooses for the device as ``teacher.dtype`` does."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the live teacher."""
    trust_remote_code: bool = False
    """Allow model code shipped with the live teacher's checkpoint to run. Only enable for repos you trust."""


@dataclass
class PhaseConfig:
    steps: int = 0
    """Optimizer steps in this phase."""
    lr: float | None = None
    """Peak learning rate of this phase; default ``train.lr``."""
    loss: dict = field(default_factory=dict)
    """Loss fields overriding the top-level ``loss`` in this phase, e.g. ``{kind: ce}``."""

    def __post_init__(self):
        raise_problems(need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}"),
                       need(self.lr is None or self.lr > 0, "lr", f"must be > 0 (or unset: train.lr), got {self.lr}"))


@dataclass
class TrainConfig:
    out_dir: str = ""
    """Output directory: ``checkpoints/``, ``metrics.jsonl``, ``config.yaml``, ``final/``. A URL is worked on
    in a local copy under ``cache.local_dir`` and uploaded: each checkpoint once complete, ``final/`` at the end."""
    steps: int = 100
    """Optimizer steps (ignored when ``phases`` is set: their steps add up)."""
    batch_size: int = 8
    """Sequences per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at ``lr * min_lr_ratio``."""
    warmup_steps: int = 10
    """Linear warmup steps at the start of each phase."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    seed: int = 0
    """Seed of data order and initialisation."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: only the final model)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    eval_every: int = 100
    """Steps between held-out evaluations (0: only at the end)."""
    eval_batches: int | None = None
    """Cap on held-out batches per evaluation; ``null`` uses all."""
    log_every: int = 10
    """Steps between training-loss records in ``metrics.jsonl``."""
    resume: Literal["auto", "never"] = "auto"
    """``auto`` continues from the latest checkpoint in ``out_dir``."""
    phases: list = field(default_factory=list)
    """Optional schedule: a list of ``{steps, lr, loss}`` phases, e.g. CE first, then KD."""
    chunk_size: int = 1024
    """Positions per student-logit chunk in the loss (bounds the fp32 (positions x vocab) memory)."""
    num_workers: int = 0
    """DataLoader worker processes for the cache reader (a prefetch thread always runs)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Student compute dtype under autocast (weights and AdamW state stay fp32). ``auto``: bf16 where the device
    runs it natively (a GPU with bf16, a CPU with AVX-512-BF16 or AMX), else fp32. FSDP2 casts with its own
    bf16 policy instead."""
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    """``single``: one process; ``ddp``: DistributedDataParallel replicas; ``fsdp``: FSDP2 shards (one unit per
    decoder layer, bf16 compute on GPU), for students whose weights and AdamW state do not fit one GPU.
    ``auto``: ``single`` for one process, ``ddp`` under torchrun."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every ``metrics.jsonl`` record (rank 0), resumed with the job: any of
    ``tensorboard``, ``wandb``, ``mlflow``, each an extra (``pip install 'distillery[wandb]'``); see docs/trackers.md."""

    def __post_init__(self):
        raise_problems(
            need(bool(self.out_dir), "out_dir", "is required"),
            need(all(name in TRACKERS for name in self.report_to), "report_to", f"unknown trackers "
                 f"{[name for name in self.report_to if name not in TRACKERS]}; choose from {', '.join(TRACKERS)}"),
            need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}"),
            need(self.batch_size >= 1, "batch_size", "must be >= 1"),
            need(self.grad_accum >= 1, "grad_accum", "must be >= 1"),
            need(self.lr > 0, "lr", f"must be > 0, got {self.lr}"),
            need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            need(self.chunk_size >= 1, "chunk_size", "must be >= 1"),
            need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1"),
            need(self.num_workers >= 0, "num_workers", "must be >= 0"),
            need(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}"),
            need(self.eval_every >= 0, "eval_every", f"must be >= 0 (0: only at the end), got {self.eval_every}"),
            need(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0 (0: none), got {self.checkpoint_every}"),
            need(self.eval_batches is None or self.eval_batches >= 1, "eval_batches", "must be >= 1 or null (all)"),
            need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}"),
            need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}"),
        )


@dataclass
class Phase:
    """One resolved phase of the schedule."""

    steps: int
    lr: float
    loss: LossConfig


def resolve_phases(train: TrainConfig, loss: LossConfig) -> list[Phase]:
    """The schedule as a list of phases; a single phase when ``train.phases`` is empty."""
    if not train.phases:
        return [Phase(train.steps, train.lr, loss)]
    phases, problems = [], []
    for i, raw in enumerate(train.phases):
        try:
            phase = build_config(PhaseConfig, raw if isinstance(raw, dict) else {"steps": raw})
            phases.append(Phase(phase.steps, phase.lr or train.lr, build_config(LossConfig, merge(asdict(loss), phase.loss))))
        except ConfigError as exc:
            details = str(exc).removeprefix("invalid config:\n  - ").replace("\n  - ", "; ")
            problems.append((f"train.phases[{i}]", details))
    raise_problems(*problems)
    return phases


@dataclass
class TrainJob:
    """Everything ``distillery train`` needs."""

    cache: SourceConfig = field(default_factory=SourceConfig)
    """The cached soft targets."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The model being trained."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, schedule, checkpoints and evaluation."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The distillation objective."""
    live_teacher: LiveTeacherConfig = field(default_factory=LiveTeacherConfig)
    """Loading options of ``loss.teacher_live``."""
    online: OnlineConfig | None = None
    """Online on-policy distillation: the student's own samples, scored by ``loss.teacher_live`` every step."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    def __post_init__(self):
        phases = resolve_phases(self.train, self.loss)
        online = self.online is not None
        raise_problems(device_problem(self.device),
                       need(not online or all(p.loss.teacher_live and p.loss.kind != "ce" for p in phases),
                            "online", "needs loss.teacher_live (the teacher that scores the student's samples) and "
                                      "a KD loss.kind in every phase"),
                       need(not online or self.train.strategy != "fsdp", "online",
                            "samples with the whole student, so it does not run under train.strategy=fsdp; use ddp"))


@dataclass
class PretrainJob:
    """``distillery pretrain``: the same loop with CE on raw text and no cache."""

    data: DataConfig = field(default_factory=DataConfig)
    """Text to train on; ``holdout_fraction`` gives the held-out split."""
    tokenizer: str = ""
    """Tokenizer folder (or hub id) used to tokenize ``data`` and saved with the model."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The model being trained."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, checkpoints and evaluation."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    def __post_init__(self):
        raise_problems(need(bool(self.tokenizer), "tokenizer", "is required (a tokenizer folder)"),
                       device_problem(self.device))
