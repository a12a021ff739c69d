"""Hugging Face models for both stages: device choice, loading, content hashes, and the chunked logit head.

A model may also be one GGUF file in such a folder (``gguf_file``, see ``pipeline.gguf``).

A model may also be a folder at a URL (``s3://.../round-1/train/final``, a previous round's student): transformers
loads only local folders and hub ids, so it is loaded from a local copy under ``local_dir``, downloaded once per
process, from which its config, tokenizer, weights and weights hash are all read.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import TeacherError
from pipeline.gguf import file_sha256, gguf_arguments, gguf_error
from pipeline.log import get_logger
from storage.errors import CacheNotFoundError
from storage.mirror import local_folder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
NATIVE_BF16_ENV = "DISTILLERY_NATIVE_BF16"
"""``0`` or ``1`` overrides the bf16 capability check (the test suite sets 0, so it computes alike on every CPU)."""
log = get_logger("hf")


def load_failure(exc: Exception) -> str:
    """A transformers loading error on one line (some, such as the refusal of shipped code, span several)."""
    return " ".join(str(exc).split())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks the local rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"device {name!r} was requested but CUDA is not available; use device=cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware: a CUDA GPU with bf16 (Ampere or newer), or a CPU with
    AVX-512-BF16 or AMX. Elsewhere bf16 is emulated: on an AVX2-only EPYC a teacher pass ran 4x slower than fp32."""
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def compute_dtype(requested: str, device: torch.device, allow_fp16: bool = True) -> str:
    """The dtype name to compute in: ``requested`` itself unless it is ``auto``, which picks bf16 where
    ``device`` runs it natively, else fp16 on a GPU (when ``allow_fp16``) and fp32 on a CPU."""
    if requested != "auto":
        return requested
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" and allow_fp16 else "fp32"


def dtype_choice(requested: str, chosen: str, device: torch.device) -> str:
    """``chosen`` with why, for the log: ``fp32 (auto: no native bf16 on CPU (AVX2))``. Callers log it once the
    model is ready, so that a job refused earlier prints its one error line and nothing else."""
    if requested != "auto":
        return f"{chosen} (as set)"
    why = {"bf16": "native bf16", "fp16": "this GPU has no bf16"}.get(chosen, "no native bf16")
    return f"{chosen} (auto: {why} on {device_description(device)})"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's torch capability level (AVX2, AVX512, ...)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.backends.cpu.get_cpu_capability()})"


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``owner/name``): it exists, starts like a path, or has more than one ``/``."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


_COPIES: dict[tuple[str, str], str] = {}
"""Local copies of the models at URLs made by this process, by (URL, local_dir): one download serves every read."""


def local_model(name: str, local_dir: str | os.PathLike | None = None, key: str = "teacher.model") -> str:
    """What transformers can load for ``name``: ``name`` itself (a path or a hub id), or the path of a local
    copy of the folder at a URL, downloaded under ``local_dir`` unless this process has one already."""
    copy = _COPIES.get((name, str(local_dir)))
    if copy is not None and Path(copy).is_dir():
        return copy
    try:
        folder = local_folder(name, local_dir)
    except CacheNotFoundError:
        raise TeacherError(f"{key} {name!r}: no such model directory") from None
    if folder == Path(name):
        return name  # a path or hub id, as given (Path would normalise it)
    _COPIES[(name, str(local_dir))] = str(folder)
    return str(folder)


def _check_local(name: str, key: str, local_dir: str | os.PathLike | None = None) -> str:
    """The loadable form of ``name`` (see ``local_model``); a path that is not a folder gets this one line, not
    the hub's message about repo ids."""
    source = local_model(name, local_dir, key)
    if looks_local(source) and not Path(source).expanduser().is_dir():
        raise TeacherError(f"{key} {name!r}: no such model directory")
    return source


def _gguf(source: str, gguf_file: str | None) -> dict:
    """``from_pretrained`` arguments that pick ``gguf_file`` in ``source`` (none without one)."""
    return gguf_arguments(source, gguf_file) if gguf_file else {}


def load_config_and_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False,
                              key: str = "teacher.model", local_dir: str | os.PathLike | None = None,
                              gguf_file: str | None = None):
    """Load a model's HF config and tokenizer without its weights (from its file ``gguf_file`` when given);
    ``key`` names the setting in errors."""
    from transformers import AutoConfig, AutoTokenizer

    source = _check_local(name, key, local_dir)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, **_gguf(source, gguf_file)}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if gguf_file:
            raise gguf_error(gguf_file, load_failure(exc)) from exc
        raise TeacherError(f"{key} {name!r} could not be loaded: {load_failure(exc)}") from exc
    return config, tokenizer


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_model(name: str, device: torch.device, dtype: str = "auto", revision: str | None = None,
               trust_remote_code: bool = False, key: str = "teacher.model", placement: dict | None = None,
               local_dir: str | os.PathLike | None = None, gguf_file: str | None = None):
    """Load a causal LM's weights (dequantised from its file ``gguf_file`` when given) in ``dtype`` (``auto``:
    chosen for ``device`` by ``compute_dtype``) onto ``device``, in eval mode.

    ``placement`` holds extra ``from_pretrained`` arguments that place the
    weights themselves (``device_map`` and ``max_memory``, or a tensor-parallel
    ``distributed_config``); the model is then not moved to ``device``.
    """
    from transformers import AutoModelForCausalLM

    source = _check_local(name, key, local_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, dtype=DTYPES[compute_dtype(dtype, device)],
            **_gguf(source, gguf_file), **(placement or {}))
    except (OSError, ValueError) as exc:
        if gguf_file:
            raise gguf_error(gguf_file, load_failure(exc)) from exc
        raise TeacherError(f"{key} {name!r}: weights could not be loaded: {load_failure(exc)}") from exc
    return (model if placement else model.to(device)).eval()


def input_device(model) -> torch.device:
    """Where a model's input ids must go: the device of its input embeddings (the first of a ``device_map``)."""
    return model.get_input_embeddings().weight.device


@dataclass
class LogitHead:
    """The teacher's output layer applied to a chunk of hidden states.

    Reproduces what the model's own forward does after the decoder: the
    lm_head, then final-logit soft-capping where the config asks for it.
    """

    lm_head: torch.nn.Module
    softcap: float | None

    @classmethod
    def of(cls, model) -> LogitHead:
        return cls(model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None))

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) model dtype -> (n, V) float32 logits."""
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 -> (B, T, H) final hidden states, without computing logits."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def check_logit_head(model, head: LogitHead, input_ids: torch.Tensor, positions: int = 32) -> None:
    """Compare the chunked head with the model's own forward on a few positions.

    Catches architectures that transform logits in ways ``LogitHead`` does
    not reproduce, which would otherwise silently cache wrong targets.
    """
    ids = input_ids[:1, :positions]
    reference = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    ours = torch.log_softmax(head(hidden_states(model, ids)[0]), dim=-1)
    tolerance = 1e-3 if head.lm_head.weight.dtype == torch.float32 else 5e-2
    error = (reference - ours).abs().max().item()
    if not error <= tolerance:
        raise TeacherError(
            f"the teacher's logits ({type(model).__name__}) differ from Distillery's chunked lm_head by {error:.3g}; "
            "this architecture post-processes logits in a way Distillery does not reproduce"
        )


def weights_sha256(model_dir: Path) -> str | None:
    """sha256 over ``config.json`` and the weight files of a local model folder, in sorted order."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in [model_dir / "config.json", *files]:
        if not path.is_file():
            continue
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def teacher_identity(name: str, revision: str | None, config, local_dir: str | os.PathLike | None = None,
                     gguf_file: str | None = None) -> dict:
    """Teacher name, resolved revision and, for folders (local, or the local copy of one at a URL), the
    weight-file hash: with ``gguf_file``, that file's sha256 (as ``sha256sum`` prints it), which it names."""
    local = Path(local_model(name, local_dir)).expanduser()
    if gguf_file:
        digest = file_sha256(local / gguf_file) if local.is_dir() else None
        revision = None if local.is_dir() else getattr(config, "_commit_hash", None) or revision
        return {"name": name, "gguf_file": gguf_file, "revision": revision, "weights_sha256": digest}
    if local.is_dir():
        return {"name": name, "revision": None, "weights_sha256": weights_sha256(local)}
    return {"name": name, "revision": getattr(config, "_commit_hash", None) or revision, "weights_sha256": None}


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the token-to-id mapping and special tokens: what decides the ids a model sees."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token}
    text = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
