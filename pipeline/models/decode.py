"""Batched decoding with transformers: left padding, the model's KV cache, and a stop at EOS per row.

Every row draws from its own ``torch.Generator``, seeded from (seed, prompt, sample), so a completion does not
depend on which rows share its batch, nor on parts and restarts. Greedy decoding (temperature 0) takes the
argmax, as ``model.generate(do_sample=False)`` does. Each generated token's log-prob is also kept under the raw
model (temperature 1, no top-p), as vLLM reports it by default: what an importance weight needs later.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    """0 is greedy."""
    top_p: float
    seed: int


@dataclass(frozen=True)
class Completion:
    ids: list[int]
    """The generated tokens, ending with the EOS when the row stopped there."""
    logprobs: list[float]
    """The raw model's log-prob of each generated token (fp32)."""
    finish_reason: str
    """``eos`` or ``length``."""


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """A 63-bit seed for one row's draws, a function of the three numbers alone."""
    digest = hashlib.sha256(f"distillery-generate:{seed}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _choose(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) next tokens: argmax at temperature 0, else a draw from each row's own generator
    out of the temperature-scaled distribution cut to its top-p nucleus."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # the mass before a token already reaches p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cpu = probs.cpu()
    return torch.stack([torch.multinomial(cpu[i], 1, generator=g)[0] for i, g in enumerate(generators)]).to(logits.device)


def _forward_names(model) -> tuple[str, dict]:
    """The forward's name for the KV cache (``cache`` in transformers 5, ``past_key_values`` before), and the
    argument that computes the last position's logits only, where it has one."""
    names = inspect.signature(model.forward).parameters
    last = {"logits_to_keep": 1} if "logits_to_keep" in names else {}
    return ("cache" if "cache" in names else "past_key_values"), last


def stop_and_pad(model, tokenizer) -> tuple[set[int], int]:
    """The ids that end a completion (the generation config's EOS, else the tokenizer's) and the padding id."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    return eos_ids, pad


@torch.no_grad()
def decode(model, prompts: list[tuple[int, ...]], seeds: list[int], sampling: Sampling, eos_ids: set[int],
           pad_id: int) -> list[Completion]:
    """Complete each prompt (token ids) at once, in one left-padded batch; ``seeds`` are the rows' seeds."""
    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    cache_name, last_only = _forward_names(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(sampling.max_new_tokens):
        logits = out.logits[:, -1].float()
        chosen = _choose(logits, sampling, generators)
        raw = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None])[:, 0]
        for row, (token, logprob) in enumerate(zip(chosen.tolist(), raw.tolist())):
            if not done[row]:
                tokens[row].append(token)
                logprobs[row].append(logprob)
                done[row] = token in eos_ids
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        cache = out[cache_name if cache_name in out else "past_key_values"]
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_name: cache}, **last_only)
    return [Completion(t, lp, "eos" if d else "length") for t, lp, d in zip(tokens, logprobs, done)]
