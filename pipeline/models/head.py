"""The chunked logit head: a model's output layer applied to chunks of hidden states, checked against its forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import TeacherError


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
