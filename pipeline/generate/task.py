"""How well a model does the task on prompts it never trained on: its greedy answers scored against the
references, and its reverse KL to a teacher on its own samples.

Both measures read the held-out prompts of ``data.*`` (``data.holdout_fraction`` or ``data.eval_path``), the
documents that no stage trains on. The reverse KL is the on-policy measure: the student samples completions at
temperature 1, and at every generated position the full-vocabulary KL(student || teacher) of the next token is
computed exactly, then averaged over the generated tokens. Its expectation is the per-token reverse KL of the
two sequence distributions along the student's own trajectories, which is what on-policy distillation lowers.
"""
from __future__ import annotations

import torch

from pipeline.data.config import DataConfig
from pipeline.data.prompts import Prompt, load_prompts
from pipeline.generate.score import task_score
from pipeline.models.decode import Completion, Sampling, decode, row_seed, stop_and_pad

BATCH = 16
"""Prompts decoded together: the answers do not depend on it (each row draws from its own seed)."""


def held_out_prompts(data: DataConfig, tokenizer, count: int) -> list[Prompt]:
    """The first ``count`` held-out prompts of ``data``, in data order."""
    return load_prompts(data, tokenizer, count, split="eval")


def complete(model, tokenizer, prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
    """Every prompt's completion, decoded ``BATCH`` at a time; the model is put in eval mode and restored."""
    training = model.training
    model.eval()
    eos_ids, pad = stop_and_pad(model, tokenizer)
    completions: list[Completion] = []
    for lo in range(0, len(prompts), BATCH):
        batch = prompts[lo : lo + BATCH]
        completions += decode(model, [p.ids for p in batch], [row_seed(sampling.seed, p.index, 0) for p in batch],
                              sampling, eos_ids, pad)
    model.train(training)
    return completions


def answer_score(model, tokenizer, prompts: list[Prompt], max_new_tokens: int) -> dict | None:
    """Exact match and chrF of the greedy answers (``pipeline.generate.score``); None when no prompt has a
    reference (``data.format: text``)."""
    completions = complete(model, tokenizer, prompts, Sampling(max_new_tokens, 0.0, 1.0, 0))
    answers = tokenizer.batch_decode([c.ids for c in completions], skip_special_tokens=True)
    return task_score(answers, [p.reference for p in prompts])


def _log_softmax(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids).logits[0, :, :vocab].float(), dim=-1)


@torch.no_grad()
def own_sample_reverse_kl(student, teacher, tokenizer, prompts: list[Prompt], max_new_tokens: int,
                          seed: int = 0) -> float:
    """Mean over the student's sampled tokens (temperature 1) of KL(student || teacher) at each generated
    position, over the vocabulary the two models share (their output layers may be padded differently)."""
    completions = complete(student, tokenizer, prompts, Sampling(max_new_tokens, 1.0, 1.0, seed))
    device = student.get_input_embeddings().weight.device
    vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0],
                len(tokenizer))
    total, tokens = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([list(prompt.ids) + completion.ids], device=device)
        # Position t predicts token t + 1: the generated tokens are predicted from len(prompt) - 1 on.
        at = slice(len(prompt.ids) - 1, len(prompt.ids) - 1 + len(completion.ids))
        q, p = _log_softmax(student, ids, vocab)[at], _log_softmax(teacher, ids, vocab)[at]
        total += float((q.exp() * (q - p)).sum())
        tokens += len(completion.ids)
    return total / max(tokens, 1)


@torch.no_grad()
def policy_drift(model, rows: list[dict]) -> float:
    """Mean over the rows' generated tokens of log pi_gen(y_t) - log pi_model(y_t), where pi_gen is the model
    that wrote them (``completion_logprobs``). For completions sampled at temperature 1 without top-p, it is an
    unbiased estimate of the per-token KL(pi_gen || model) along pi_gen's trajectories: how far ``model`` has moved
    from the policy whose samples it trains on (the staleness of a round)."""
    device = model.get_input_embeddings().weight.device
    total, tokens = 0.0, 0
    for row in rows:
        prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
        ids = torch.tensor([prompt + completion], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        now = logprobs.gather(-1, ids[0, len(prompt):, None])[:, 0]
        total += float(sum(row["completion_logprobs"]) - now.sum())
        tokens += len(completion)
    return total / max(tokens, 1)
