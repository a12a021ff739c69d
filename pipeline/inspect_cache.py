"""``distillery inspect`` and ``distillery verify``: summarise and re-check a finished cache."""
from __future__ import annotations

import numpy as np

from storage.formats import get_format
from storage.manifest import Manifest


def _softmax_stats(logprobs: np.ndarray, tail: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Top-1 probability, tail mass and entropy over the stored ids plus one tail bucket."""
    lp = logprobs.astype(np.float64)
    probs = np.exp(lp)
    tail_p = np.exp(tail.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = -np.nansum(np.where(probs > 0, probs * lp, 0.0), axis=-1)
        entropy -= np.where(tail_p > 0, tail_p * tail, 0.0)
    keep = mask.astype(bool)
    return {"top1": float(probs[..., 0][keep].sum()), "tail": float(tail_p[keep].sum()),
            "entropy": float(entropy[keep].sum()), "positions": int(keep.sum())}


def summarize(manifest: Manifest) -> dict:
    """Totals from the manifest plus distribution statistics read from every shard."""
    data = manifest.data
    fmt = get_format(data["format"])
    totals = {"top1": 0.0, "tail": 0.0, "entropy": 0.0, "positions": 0}
    for record in manifest.shards:
        arrays = fmt.read(manifest.shard_path(record))
        stats = _softmax_stats(arrays["topk_logprobs"], arrays["tail_logprob"], arrays["loss_mask"])
        for key in totals:
            totals[key] += stats[key]
    tokens = sum(s["tokens"] for s in manifest.shards)
    size = sum(s["bytes"] for s in manifest.shards)
    n = max(totals["positions"], 1)
    return {
        "directory": str(manifest.directory),
        "fingerprint": data["fingerprint"],
        "teacher": data["teacher"]["name"],
        "mode": data["mode"],
        "width": data["width"],
        "format": data["format"],
        "vocab_size": data["vocab_size"],
        "seq_len": data["seq_len"],
        "shards": len(manifest.shards),
        "splits": data["splits"],
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": size / max(tokens, 1),
        "mean_top1_prob": totals["top1"] / n,
        "mean_tail_mass": totals["tail"] / n,
        "mean_entropy_nats": totals["entropy"] / n,
    }


def format_summary(summary: dict) -> str:
    splits = ", ".join(f"{name}: {s['sequences']} seqs / {s['tokens']} tokens in {s['shards']} shards"
                       for name, s in summary["splits"].items())
    lines = [
        f"cache        {summary['directory']}",
        f"fingerprint  {summary['fingerprint']}",
        f"teacher      {summary['teacher']} (vocab {summary['vocab_size']})",
        f"targets      {summary['mode']}, width {summary['width']}, {summary['format']} shards, seq_len {summary['seq_len']}",
        f"splits       {splits}",
        f"size         {summary['bytes'] / 1e6:.2f} MB, {summary['bytes_per_token']:.1f} bytes/token",
        f"top-1 prob   {summary['mean_top1_prob']:.4f} (mean over unmasked positions)",
        f"tail mass    {summary['mean_tail_mass']:.4f}",
        f"entropy      {summary['mean_entropy_nats']:.4f} nats (stored ids + tail bucket)",
    ]
    return "\n".join(lines)
