"""``distillery inspect`` and ``verify``: summarise a finished cache from its manifest and shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.errors import CacheNotFoundError
from storage.read.reader import read_shard
from storage.remote.fs import is_url
from storage.remote.store import Cache, open_cache


def _shard_stats(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Sums over unmasked positions: top-1 probability, tail mass, entropy and stored ids.

    The entropy runs over the stored ids plus one tail bucket, so it is a
    lower bound for top-k caches.
    """
    lp = arrays["topk_logprobs"].astype(np.float64)
    tail = arrays["tail_logprob"].astype(np.float64)
    probs = np.exp(lp)
    tail_p = np.exp(tail)
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = -np.nansum(np.where(probs > 0, probs * lp, 0.0), axis=-1)
        entropy -= np.where(tail_p > 0, tail_p * tail, 0.0)
    keep = arrays["loss_mask"].astype(bool)
    unique = (arrays["topk_ids"] >= 0).sum(axis=-1)
    return {"top1": float(probs.max(axis=-1)[keep].sum()), "tail": float(tail_p[keep].sum()),
            "entropy": float(entropy[keep].sum()), "ids": float(unique[keep].sum()), "positions": int(keep.sum())}


def read_cache(directory: str | Path) -> Cache:
    """The cache at ``directory`` (or a URL), opened; a missing path or a file is named as such."""
    if not is_url(directory):
        _check_directory(Path(directory))
    return open_cache(directory)


def _check_directory(path: Path) -> None:
    """Name a missing path, or a file, as such (not as a folder without a manifest)."""
    if not path.is_dir():
        why = "it is a file" if path.exists() else "it does not exist"
        raise CacheNotFoundError(f"{path} is not a complete Distillery cache ({why}); give the directory that "
                                 "`distillery cache` printed")


def summarize(cache: Cache) -> dict:
    """Totals from the manifest plus distribution statistics read from every shard."""
    manifest = cache.manifest
    totals = {"top1": 0.0, "tail": 0.0, "entropy": 0.0, "ids": 0.0, "positions": 0}
    for record in manifest.shards:
        stats = _shard_stats(read_shard(cache, record))
        for key in totals:
            totals[key] += stats[key]
    n = max(totals["positions"], 1)
    return {
        "directory": cache.location,
        "fingerprint": manifest.fingerprint,
        "teacher": manifest.teacher.get("name"),
        "mode": manifest.mode,
        # Caches made before cache.sampler existed drew multinomially and do not name it.
        "sampler": manifest.config.get("cache", {}).get("sampler", "multinomial") if manifest.mode != "topk" else None,
        "width": manifest.width,
        "format": manifest.format,
        "format_version": manifest.format_version,
        "logprob_bits": manifest.logprob_bits,
        "text_alignment": manifest.text_alignment,
        "vocab_size": manifest.vocab_size,
        "seq_len": manifest.seq_len,
        "shards": len(manifest.shards),
        "splits": manifest.splits,
        "tokens": manifest.tokens,
        "bytes": manifest.bytes,
        "bytes_per_token": manifest.bytes / max(manifest.tokens, 1),
        "mean_unique_ids": totals["ids"] / n,
        "mean_top1_prob": totals["top1"] / n,
        "mean_tail_mass": totals["tail"] / n,
        "mean_entropy_nats": totals["entropy"] / n,
    }


def _bits(summary: dict) -> str:
    return f", {summary['logprob_bits']}-bit log-probs" if summary.get("logprob_bits") else ""


def _draws(summary: dict) -> str:
    return f" ({summary['sampler']} draws)" if summary.get("sampler") else ""


def _students(summary: dict) -> str:
    if summary.get("text_alignment"):
        return "any tokenizer (text alignment: token_role stored)"
    return "the teacher's tokenizer only (no text alignment)"


def format_summary(summary: dict) -> str:
    splits = ", ".join(f"{name}: {s['sequences']} seqs / {s['tokens']} tokens in {s['shards']} shards"
                       for name, s in summary["splits"].items())
    lines = [
        f"cache        {summary['directory']}",
        f"fingerprint  {summary['fingerprint']}",
        f"teacher      {summary['teacher']} (vocab {summary['vocab_size']})",
        f"targets      {summary['mode']}{_draws(summary)}, width {summary['width']}, {summary['format']} shards "
        f"(format {summary['format_version']}{_bits(summary)}), seq_len {summary['seq_len']}",
        f"students     {_students(summary)}",
        f"splits       {splits}",
        f"size         {summary['bytes'] / 1e6:.2f} MB, {summary['bytes_per_token']:.1f} bytes/token",
        f"unique ids   {summary['mean_unique_ids']:.2f} per position (of {summary['width']} slots; "
        "drives the size of a sample cache)",
        f"top-1 prob   {summary['mean_top1_prob']:.4f} (mean over unmasked positions)",
        f"tail mass    {summary['mean_tail_mass']:.4f}",
        f"entropy      {summary['mean_entropy_nats']:.4f} nats (stored ids + tail bucket)",
    ]
    return "\n".join(lines)
