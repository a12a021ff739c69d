"""The generation section: batched decoding against one prompt at a time, and ``distillery generate`` end to end
against a bare ``model.generate`` loop over the same batches, greedy, on the same model in one run (medians)."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from pipeline.config_loading import load_config
from pipeline.demo.tokenizer import QA_CORPUS
from pipeline.generate.config import GenerateJob
from pipeline.generate.plan import make_plan
from pipeline.generate.run import run_generate
from pipeline.models.decode import Sampling, decode


def _job(model: Path, out: Path, rows: int, batch: int, new_tokens: int) -> GenerateJob:
    return load_config(GenerateJob, None, [
        f"generate.model={model}", f"generate.out_dir={out}", f"data.path={QA_CORPUS}", "data.format=chat",
        f"generate.max_prompts={rows}", f"generate.batch_size={batch}", f"generate.max_new_tokens={new_tokens}",
        "generate.temperature=0", f"generate.shard_size={rows}", "generate.dtype=fp32", "device=cpu"])


def _decode_s(model, prompts: list[tuple[int, ...]], batch: int, new_tokens: int, eos: set[int]) -> tuple[float, int]:
    """Seconds and tokens of the product's decoder over ``prompts`` in batches of ``batch``."""
    start, tokens = time.perf_counter(), 0
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        done = decode(model, chunk, [0] * len(chunk), Sampling(new_tokens, 0.0, 1.0, 0), eos, 0)
        tokens += sum(len(c.ids) for c in done)
    return time.perf_counter() - start, tokens


def _bare_s(model_dir: Path, prompts: list[tuple[int, ...]], batch: int, new_tokens: int) -> float:
    """Seconds of loading the model and a plain left-padded ``model.generate`` loop over the same batches."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    return time.perf_counter() - start


def generation_records(model_dir: Path, out: Path, rows: int, batch: int, new_tokens: int,
                       repeats: int) -> list[dict]:
    """Decoder tokens/s batched and one prompt at a time; the product's wall time over the bare loop's."""
    from transformers import AutoModelForCausalLM

    plan = make_plan(_job(model_dir, out / "scratch-generate", rows, batch, new_tokens))
    prompts = [p.ids for p in plan.prompts]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = {model.generation_config.eos_token_id}
    batched, single, product, bare = [], [], [], []
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every arm alike
        seconds, tokens = _decode_s(model, prompts, batch, new_tokens, eos)
        batched.append(tokens / seconds)
        seconds, tokens = _decode_s(model, prompts, 1, new_tokens, eos)
        single.append(tokens / seconds)
        shutil.rmtree(out / "scratch-generate", ignore_errors=True)
        start = time.perf_counter()
        run_generate(_job(model_dir, out / "scratch-generate", rows, batch, new_tokens))
        product.append(time.perf_counter() - start)
        bare.append(_bare_s(model_dir, prompts, batch, new_tokens))
    ratios = [p / b for p, b in zip(product, bare)]
    return [{"rows": rows, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
             "batched_tok_per_s": statistics.median(batched), "single_tok_per_s": statistics.median(single),
             "batched_over_single": statistics.median([b / s for b, s in zip(batched, single)]),
             "product_s": statistics.median(product), "bare_generate_s": statistics.median(bare),
             "product_over_bare": statistics.median(ratios), "product_over_bare_spread": [min(ratios), max(ratios)]}]
