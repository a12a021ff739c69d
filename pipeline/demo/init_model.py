"""``distillery init-model``: random-initialised Llama, GPT-2 and Gemma 2 models on a local tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

from storage import atomic_write


def build_model(tokenizer_dir: str | Path, out_dir: str | Path, arch: str = "llama", hidden: int = 64,
                layers: int = 2, heads: int = 4, max_positions: int = 1024, vocab_size: int | None = None,
                seed: int = 0, **extra) -> Path:
    """Save a random-init causal LM plus a copy of the tokenizer to ``out_dir``.

    ``vocab_size`` defaults to the tokenizer's length; a larger value gives a
    padded output vocabulary, as many real checkpoints have.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = vocab_size or len(tokenizer)
    special = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 if hidden < 256 else hidden * 8 // 3,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=max_positions, tie_word_embeddings=False, **special, **extra)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                            **special, **extra)
    elif arch == "gemma2":
        from transformers import Gemma2Config

        config = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                              max_position_embeddings=max_positions, **special, **extra)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose llama, gpt2 or gemma2")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    with atomic_write(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out_dir

