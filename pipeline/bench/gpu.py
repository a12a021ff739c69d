"""GPU benchmark: stage 1 and stage 2 for a ~1.1B-parameter random-init Llama teacher in bf16.

``python -m pipeline.bench.gpu --out DIR`` on a CUDA machine writes
``DIR/gpu.json`` and ``DIR/gpu.md``. Stage 1 is measured as in the CPU
benchmark (a full cache pass, then the interleaved batch-by-batch ratio to a
bare forward) and converted to model FLOP/s and a fraction of the chip's bf16
dense peak. Stage 2 times CE, cached KD and online KD steps interleaved for
a 0.16B student, with the default loss chunk and with the whole micro-batch as
one chunk (fewer, larger kernels). The engines section trains the student with
``train.strategy`` single, ddp and fsdp on the one GPU (model FLOP utilisation
from 6 x parameters per token, the attention and the loss's extra head pass
left out), and caches once more with ``teacher.device_map: auto``. ``--quick``
shrinks every model so the script can be tried on a CPU; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.bench.run import markdown_table
from pipeline.bench.stage1 import measure_one
from pipeline.bench.stage2 import step_ratios
from pipeline.demo.tokenizer import CORPUS, build_tokenizer
from pipeline.log import get_logger
from storage import atomic_write, write_text

# Vendor datasheet figures for dense bf16 matrix math without sparsity, TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000}
STUDENT_160M = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 2048,
                "tie_word_embeddings": False}
FULL = {"teacher": LLAMA_1B, "student": STUDENT_160M, "seq_len": 1024, "batch": 16, "chunk": 4096, "tokens": 600_000,
        "train_batch": 8, "loss_chunk": 1024, "engine_steps": 60}
QUICK = {"teacher": {**LLAMA_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 9000},
         "student": {**STUDENT_160M, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2},
         "seq_len": 64, "batch": 4, "chunk": 128, "tokens": 8192, "train_batch": 2,
         "loss_chunk": 32, "engine_steps": 12}

log = get_logger("bench")


def build_teacher(tokenizer_dir: Path, out_dir: Path, fields: dict, device: torch.device) -> int:
    """Save a random-init bf16 Llama initialised on ``device``; return its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(**fields, max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with atomic_write(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return sum(p.numel() for p in model.parameters())


def forward_flops_per_token(fields: dict, seq_len: int) -> float:
    """Matrix FLOPs of one causal forward per token: 2 x (non-embedding params + lm_head) + attention scores."""
    h, layers, vocab = fields["hidden_size"], fields["num_hidden_layers"], fields["vocab_size"]
    kv = h * fields["num_key_value_heads"] // fields["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * fields["intermediate_size"]
    attention = 2 * seq_len * h  # QK^T and AV over, on average, half of a causal context: 2 * 2 * (T / 2) * h
    return layers * (2 * per_layer + attention) + 2 * h * vocab


def chip_peak_tflops() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name, next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def run(out: Path, quick: bool) -> dict:
    size = QUICK if quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = out / "tokenizer"
    if not tokenizer.exists():
        build_tokenizer(tokenizer, vocab_size=8192)
    teacher = out / "teacher"
    started = time.perf_counter()
    params = build_teacher(tokenizer, teacher, size["teacher"], device)
    chip, peak = chip_peak_tflops()
    results: dict = {"device": chip, "torch": torch.__version__, "teacher_params": params,
                     "teacher_build_s": time.perf_counter() - started, "stage1": [], "stage2": []}
    log.info(json.dumps(results))
    flops = forward_flops_per_token(size["teacher"], size["seq_len"])
    caches = {}
    stage1_args = [f"teacher.model={teacher}", "teacher.dtype=bf16", f"data.path={CORPUS}",
                   f"data.seq_len={size['seq_len']}", f"data.max_tokens={size['tokens']}", "data.holdout_fraction=0.01",
                   f"cache.batch_size={size['batch']}", f"cache.chunk_size={size['chunk']}", "cache.shard_size=64",
                   "cache.format=arrow", "device=auto"]
    for mode in (["cache.mode=topk", "cache.top_k=64"], ["cache.mode=sample", "cache.samples=50"]):
        cache_dir = out / f"cache-{mode[0].split('=')[1]}"
        record = measure_one([*stage1_args, f"cache.dir={cache_dir}", *mode], keep=True)
        for key in ("forward", "batch_cache", "cache"):
            tflops = record[f"{key}_tok_per_s"] * flops / 1e12
            record[f"{key}_tflops"] = tflops
            record[f"{key}_fraction_of_peak"] = tflops / peak if peak else None
        results["stage1"].append(record)
        caches[record["mode"]] = cache_dir
        log.info(json.dumps(record))
    for chunk in (size["loss_chunk"], size["train_batch"] * size["seq_len"]):
        results["stage2"].append(step_ratios(caches["topk"], caches["sample"], teacher, size["student"],
                                             size["train_batch"], rounds=10, device=device, chunk_size=chunk))
    results["engines"] = engine_records(caches["sample"], size, out, peak)
    mapped = measure_one([*stage1_args, f"cache.dir={out / 'cache-device-map'}", "cache.mode=sample",
                          "cache.samples=50", "teacher.device_map=auto"])
    results["stage1"].append({**mapped, "mode": f"{mapped['mode']} (device_map auto)"})
    return results


def engine_records(cache_dir: Path, size: dict, out: Path, peak: float | None) -> list[dict]:
    """Stage-2 tokens/s and MFU of the student under each ``train.strategy`` on one GPU."""
    from pipeline.bench.parallel import ONE_GPU, strategy_records

    common = [f"student.config={json.dumps(size['student'])}", f"train.steps={size['engine_steps']}", f"train.batch_size={size['train_batch']}",
              f"train.chunk_size={size['loss_chunk']}", "train.eval_every=0", "train.checkpoint_every=0",
              "train.warmup_steps=2", "device=auto"]
    records = strategy_records(cache_dir, common, out / "engines", rounds=2, layouts=ONE_GPU)
    params = student_params(size["student"], vocab=size["teacher"]["vocab_size"])  # the cache teacher's vocab
    for record in records:
        record["mfu"] = 6 * params * record["tok_per_s"] / (peak * 1e12) if peak else None
    return records


def student_params(fields: dict, vocab: int) -> int:
    """Parameters of a Llama student with an untied head."""
    h, kv = fields["hidden_size"], fields["hidden_size"] * fields["num_key_value_heads"] // fields["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * fields["intermediate_size"] + 2 * h
    return fields["num_hidden_layers"] * per_layer + 2 * vocab * h + h


def markdown(results: dict) -> str:
    head = (f"# GPU benchmark: {results['device']}, torch {results['torch']}\n\n"
            f"Teacher: random-init Llama, {results['teacher_params'] / 1e9:.2f}B parameters, bf16.\n")
    stage1 = markdown_table(results["stage1"], ["mode", "tokens", "forward_tok_per_s", "batch_cache_tok_per_s",
                                                "cache_over_forward", "cache_over_forward_spread", "cache_tok_per_s",
                                                "end_to_end_over_forward", "end_to_end_spread", "forward_fraction_of_peak",
                                                "batch_cache_fraction_of_peak", "bytes_per_token", "teacher_s",
                                                "writer_wait_s", "final_flush_s", "other_s"])
    stage2 = markdown_table(results["stage2"], ["loss_chunk", "kd_topk_over_ce", "kd_sample_over_ce", "online_over_kd_sample",
                                                "online_over_kd_topk", "ce_step_s"])
    engines = markdown_table(results["engines"], ["strategy", "tok_per_s", "tok_per_s_spread", "over_single", "mfu"])
    return f"{head}\n## Stage 1\n\n{stage1}\n\n## Stage 2\n\n{stage2}\n\n## Stage 2 engines (one GPU)\n\n{engines}\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    figures = run(args.out, args.quick)
    write_text(args.out / "gpu.json", json.dumps(figures, indent=2) + "\n")
    write_text(args.out / "gpu.md", markdown(figures))
    print(markdown(figures))
