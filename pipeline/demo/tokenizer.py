"""``distillery tokenizer``: the byte-level BPE trained on the shipped corpus, for tests, demo and benchmarks."""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from storage import atomic_write

CORPUS = Path(__file__).parent / "assets" / "kjv.jsonl.gz"
QA_CORPUS = Path(__file__).parent / "assets" / "kjv_qa.jsonl.gz"  # the same verses as prompt/response and chat
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Each turn ends with EOS, so a model trained on assistant turns learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_texts(path: Path = CORPUS, limit_bytes: int | None = None) -> Iterator[str]:
    """Yield the ``text`` of each JSON line of a (gzipped) corpus, up to ``limit_bytes`` of text."""
    opener = gzip.open if path.suffix == ".gz" else open
    used = 0
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            used += len(text)
            yield text
            if limit_bytes is not None and used >= limit_bytes:
                return


def build_tokenizer(out_dir: str | Path, vocab_size: int = 8192, corpus: Path = CORPUS,
                    limit_bytes: int | None = None) -> Path:
    """Train a byte-level BPE on ``corpus`` and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (need >= 300)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_texts(corpus, limit_bytes), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    with atomic_write(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return out_dir
