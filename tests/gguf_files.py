"""Tiny GGUF files for the tests, written with gguf's own writer the way llama.cpp's ``convert_hf_to_gguf.py``
writes a Llama: llama.cpp tensor names, q/k rows permuted for its rotary layout, F32 tensors, and the tokenizer
as ``tokenizer.ggml.*`` metadata (a byte-level BPE: ``gpt2``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONTROL, NORMAL = 3, 1
"""``tokenizer.ggml.token_type`` values (llama.cpp's ``TokenType``)."""


def permute(weights: np.ndarray, heads: int, kv_heads: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of q/k projection rows (HF's rotate-half layout -> interleaved pairs)."""
    if kv_heads is not None and heads != kv_heads:
        heads = kv_heads
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tokenizer_metadata(writer, model_dir: Path) -> None:
    """The vocabulary, merges, special ids and chat template of the model folder's ``tokenizer.json``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([CONTROL if token in special else NORMAL for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model_dir: Path, path: Path, architecture: str = "llama") -> Path:
    """Write the Llama of ``model_dir`` (a ``save_pretrained`` folder) as an F32 GGUF at ``path``; another
    ``architecture`` name is written into the metadata as given (to make a file transformers refuses)."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    state = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("distillery test llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer_metadata(writer, model_dir)
    for hf_name, tensor in state.items():
        weights = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            weights = permute(weights, heads, heads)
        elif hf_name.endswith("k_proj.weight"):
            weights = permute(weights, heads, kv_heads)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_teacher(inputs, name: str = "teacher.gguf", architecture: str = "llama") -> Path:
    """A GGUF of a bad-input case's shared teacher (``inputs.teacher``), in the case's own folder ``g/``."""
    folder = inputs.tmp / "g"
    folder.mkdir(exist_ok=True)
    return write_gguf(inputs.teacher, folder / name, architecture)


def junk_gguf(inputs) -> Path:
    """A file named like a GGUF that is not one."""
    (inputs.tmp / "g").mkdir(exist_ok=True)
    path = inputs.tmp / "g" / "junk.gguf"
    path.write_bytes(b"not a GGUF file at all\n" * 8)
    return path


def bad_gguf_cases(case, cache_cmd, outputs: tuple[str, ...]) -> list:
    """The GGUF rows of ``bad_input_cases.CASES``, built with its ``Case`` and ``cache_cmd`` (``outputs``: the
    cache folder that must stay incomplete)."""
    def teacher(path_of):
        """A cache command whose teacher is the GGUF ``path_of(inputs)``, given as a path alone."""
        return lambda i: cache_cmd(i, **{"teacher.model": "", "teacher.gguf_file": path_of(i)})

    def convert(*args):
        return lambda i: ["convert-gguf", *[a(i) if callable(a) else a for a in args]]

    def full_out(i):
        (i.tmp / "o").mkdir()
        (i.tmp / "o" / "mine.txt").write_text("mine")
        return i.tmp / "o"

    return [
        case("gguf-file-missing", lambda i: cache_cmd(i, **{"teacher.gguf_file": "no-such.gguf"}),
             ("teacher.gguf_file 'no-such.gguf': no such file in", "it holds no .gguf file"), outputs),
        case("gguf-file-outside-teacher-model", lambda i: cache_cmd(i, **{"teacher.gguf_file": i.tmp / "x.gguf"}),
             ("teacher.gguf_file:", "x.gguf", "is not in teacher.model"), outputs),
        case("gguf-architecture-unsupported", teacher(lambda i: gguf_teacher(i, "odd.gguf", "nosucharch")),
             ("teacher.gguf_file 'odd.gguf'", "GGUF architecture 'nosucharch'", "Hugging Face checkpoint"), outputs),
        case("gguf-file-not-gguf", teacher(junk_gguf), ("teacher.gguf_file 'junk.gguf'", "GGUF magic"), outputs),
        case("convert-gguf-out-not-empty", convert("--model", gguf_teacher, "--out", full_out),
             ("--out", "is a directory that is not empty", "--overwrite"), untouched=("o",)),
        case("convert-gguf-folder-without-gguf", convert("--model", lambda i: i.teacher, "--out", lambda i: i.tmp / "o"),
             ("--model", "holds no .gguf file", "give a .gguf file"), untouched=("o",)),
    ]
