"""Train a student on a Distillery cache with ``transformers.Trainer``.

    python examples/hf_trainer.py --cache runs/demo/cache --student my-student --out runs/hf-student --steps 100

``--student`` is a ``save_pretrained`` folder (or hub id) of a causal LM with the cache's tokenizer. The batches
and the loss are ``distillery train``'s: ``CacheDataset`` reads the cache in its order and ``kd_loss`` is its
loss (forward KL on the cached top-k, the tail as one bucket; pass another ``LossConfig`` to change it). The
optimizer and schedule are the Trainer's. Under ``torchrun``, the Trainer deals one stream of batches to its
processes, so the dataset is read as that one stream: a single rank whose optimizer step is every process's
batches of every accumulation step, which makes each step's sequences those of ``distillery train``.
"""
from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from pipeline import CacheDataset, LossConfig, collate, kd_loss


class DistillationTrainer(Trainer):
    """A Trainer whose loss is Distillery's KD loss against the cached teacher targets of each batch."""

    loss_is_scaled_for_ga = False  # kd_loss is one batch's mean: the Trainer divides it by the accumulation steps

    def __init__(self, *args, distillation: LossConfig, real_vocab: int, cache_temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation, self.real_vocab, self.cache_temperature = distillation, real_vocab, cache_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], use_cache=False)
        loss = kd_loss(outputs.logits, inputs, self.distillation, real_vocab=self.real_vocab,
                       cache_temperature=self.cache_temperature)
        return (loss, outputs) if return_outputs else loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="cache directory (or URL) written by `distillery cache`")
    parser.add_argument("--student", required=True, help="the student to train: a save_pretrained folder or hub id")
    parser.add_argument("--out", required=True, help="output directory: the trained student and its tokenizer")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch per process")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order (as train.seed)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between logged losses")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Trainer:
    args = parse_args(argv)
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 learning_rate=args.lr, seed=args.seed, logging_steps=args.log_every,
                                 remove_unused_columns=False, save_strategy="no", report_to="none")
    steps_batches = training.world_size * training.gradient_accumulation_steps
    dataset = CacheDataset(args.cache, args.batch_size, seed=args.seed, rank=0, world_size=1, grad_accum=steps_batches)
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(args.student), args=training,
                                  train_dataset=dataset, data_collator=collate, distillation=LossConfig(),
                                  real_vocab=dataset.real_vocab, cache_temperature=dataset.temperature)
    trainer.train()
    trainer.save_model(args.out)
    if trainer.is_world_process_zero():
        dataset.tokenizer.save_pretrained(args.out)
    return trainer


if __name__ == "__main__":
    main()
