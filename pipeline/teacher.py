"""Load a Hugging Face causal LM teacher and turn hidden states into logits chunk by chunk."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import TeacherConfig
from pipeline.errors import TeacherError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks the local rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"device {name!r} was requested but CUDA is not available; use device=cpu or auto")
    return torch.device(name)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def load_config_and_tokenizer(cfg: TeacherConfig):
    """Load the teacher's HF config and tokenizer without its weights."""
    from transformers import AutoConfig, AutoTokenizer

    if _looks_local(cfg.model) and not Path(cfg.model).expanduser().is_dir():
        raise TeacherError(f"teacher.model {cfg.model!r}: no such model directory")
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(cfg.model, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as exc:
        raise TeacherError(f"teacher.model {cfg.model!r} could not be loaded: {exc}") from exc
    return config, tokenizer


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_model(cfg: TeacherConfig, device: torch.device):
    """Load the teacher's weights in ``cfg.dtype`` onto ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES.get(cfg.dtype, "auto")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise TeacherError(f"teacher.model {cfg.model!r}: weights could not be loaded: {exc}") from exc
    return model.to(device).eval()


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
