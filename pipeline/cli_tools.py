"""The ``distillery`` subcommands that are not stages: reading a finished cache, and making models and tokenizers."""
from __future__ import annotations

import json
import sys


def _inspect(args) -> int:
    from storage import format_summary, read_cache, summarize

    summary = summarize(read_cache(args.directory))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _verify(args) -> int:
    from storage import read_cache

    cache = read_cache(args.directory)
    manifest, problems = cache.manifest, cache.verify()
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(manifest.shards) - len(problems)}/{len(manifest.shards)} shards verified in {args.directory}")
    return 1 if problems else 0


def _export(args) -> int:
    from pipeline.log import progress_bars
    from storage import export_cache

    s = export_cache(args.cache, args.out, args.format, split=args.split, max_sequences=args.max_sequences,
                     start=args.start, overwrite=args.overwrite, progress=progress_bars())
    print(f"exported {s['rows']} sequences ({s['split']} {s['start']}..{s['start'] + s['rows'] - 1}) of {s['cache']} "
          f"to {s['out']}: {s['files']} {s['format']} files, {s['bytes'] / 1e6:.2f} MB")
    return 0


def _tokenizer(args) -> int:
    from pipeline.demo.tokenizer import build_tokenizer, build_unigram_tokenizer

    build = build_unigram_tokenizer if args.kind == "unigram" else build_tokenizer
    print(build(args.out, vocab_size=args.vocab_size))
    return 0


def _init_model(args) -> int:
    from pipeline.demo.init_model import build_model

    print(build_model(args.tokenizer, args.out, arch=args.arch, hidden=args.hidden, layers=args.layers,
                      heads=args.heads, max_positions=args.max_positions, seed=args.seed))
    return 0


def _convert_gguf(args) -> int:
    from pipeline.models.gguf import convert_gguf

    print(convert_gguf(args.model, args.gguf_file, args.out, overwrite=args.overwrite))
    return 0


def add_cache_tools(commands) -> None:
    """The subcommands that read a finished cache: ``inspect``, ``verify`` and ``export``."""
    inspect = commands.add_parser("inspect", help="summarise a cache")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)
    verify = commands.add_parser("verify", help="re-hash every shard of a cache")
    verify.add_argument("directory")
    verify.set_defaults(run=_verify)
    export = commands.add_parser("export", help="write a cache (or a slice) as a datasets folder or Parquet files",
                                 description="Write a finished cache, or a slice of one split, as a Hugging Face "
                                 "datasets folder (datasets.load_from_disk) or zstd Parquet files, with Axolotl's KD "
                                 "columns (input_ids, labels, target_token_ids, target_logprobs, target_mask ...).")
    export.add_argument("cache", help="the cache directory or URL")
    export.add_argument("--out", required=True, help="a new or empty directory to write")
    export.add_argument("--format", choices=["hf", "parquet"], default="hf",
                        help="hf: a datasets.save_to_disk folder (default); parquet: data-*.parquet files")
    export.add_argument("--split", default="train", help="the split to export (default: train)")
    export.add_argument("--start", type=int, default=0, help="the first sequence, in manifest order (default: 0)")
    export.add_argument("--max-sequences", type=int, help="at most this many sequences (default: all)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(run=_export)


def add_model_tools(commands) -> None:
    """The subcommands that make models and tokenizers: ``tokenizer``, ``init-model`` and ``convert-gguf``."""
    tokenizer = commands.add_parser("tokenizer", help="train a tokenizer (byte-level BPE by default) on the shipped "
                                                      "corpus")
    tokenizer.add_argument("--out", required=True)
    tokenizer.add_argument("--vocab-size", type=int, default=8192)
    tokenizer.add_argument("--kind", choices=("bpe", "unigram"), default="bpe",
                           help="bpe: GPT-2 style byte-level BPE (default); unigram: SentencePiece-style Unigram "
                                "with '▁' word starts and <0xNN> byte fallback for unseen characters")
    tokenizer.set_defaults(run=_tokenizer)

    init = commands.add_parser("init-model", help="save a random-initialised model on a local tokenizer")
    init.add_argument("--tokenizer", required=True)
    init.add_argument("--out", required=True)
    init.add_argument("--arch", default="llama", choices=["llama", "gpt2", "gemma2"])
    init.add_argument("--hidden", type=int, default=384)
    init.add_argument("--layers", type=int, default=6)
    init.add_argument("--heads", type=int, default=6)
    init.add_argument("--max-positions", type=int, default=1024)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init_model)
    gguf = commands.add_parser("convert-gguf", help="write a GGUF model (dequantised to fp32) and its tokenizer "
                               "as an ordinary save_pretrained folder")
    gguf.add_argument("--model", required=True, help="a .gguf file, or the folder holding it")
    gguf.add_argument("--gguf-file", help="the file's name in the --model folder (needed when it holds several)")
    gguf.add_argument("--out", required=True, help="a new or empty directory to write")
    gguf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    gguf.set_defaults(run=_convert_gguf)


def _eval(args) -> int:
    from pipeline.harness.run import EvalSettings, evaluate_model, evaluate_run

    settings = EvalSettings(tasks=[name.strip() for name in args.tasks.split(",")], limit=args.limit,
                            num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                            chat_template=args.apply_chat_template)
    written = evaluate_run(args.run_dir, settings) if args.run_dir else [evaluate_model(args.model, settings)]
    print("\n".join(map(str, written)))
    return 0


def add_eval_tool(commands) -> None:
    """``eval``: lm-evaluation-harness on a model folder, or on every round's student of a run."""
    evaluate = commands.add_parser("eval", help="score a model, or every round of a run, with lm-evaluation-harness",
                                   description="Score a save_pretrained folder (--model), or the final/ student of "
                                   "every trained round of a run (--run), with lm-evaluation-harness (the eval extra: "
                                   "pip install 'distillery[eval]'), and write the scores as lm_eval.json beside each "
                                   "final/ (inside any other model folder).")
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a save_pretrained folder, e.g. runs/x/round-1/train/final")
    which.add_argument("--run", dest="run_dir",
                       help="a run directory: every trained round's final/; the run report is rewritten")
    evaluate.add_argument("--tasks", default="kjv_recitation",
                          help="comma-separated lm-eval tasks (default: the shipped kjv_recitation; hub tasks such "
                               "as mmlu,hellaswag need network)")
    evaluate.add_argument("--limit", type=int, help="score only the first N documents of each task")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="requests scored together (default: 8)")
    evaluate.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    evaluate.add_argument("--apply-chat-template", action="store_true",
                          help="ask each question as a user turn of the model's chat template (chat-trained models)")
    evaluate.set_defaults(run=_eval)
