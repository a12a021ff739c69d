"""How a cache lays its targets out on disk: one ``Layout`` per cache, fixed at plan time, recorded in the
manifest, and the same for every shard (so a folder of shards reads as one table).

``encode`` turns a shard's targets (``storage.codec.targets``) into stored columns, and ``decode`` turns stored
columns back into reader arrays; ``storage.codec.v3`` and ``storage.codec.v2`` document the columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.codec import v2 as layout_v2
from storage.codec import v3 as layout_v3
from storage.codec.targets import check_targets
from storage.errors import ManifestError

FORMAT_VERSIONS = (2, 3)
MAX_UINT16_VOCAB = 65535  # ids 0..65534; 65535 is the padding id
MAX_SAMPLES = 65535  # draws per position: a count must fit in uint16


@dataclass(frozen=True)
class Layout:
    version: int
    """3 (the default) or 2; 1 is read as 2."""
    mode: str
    """``topk``, ``sample`` or ``hybrid``."""
    vocab_size: int
    """The teacher's output vocabulary; it sets the id dtype."""
    head_width: int
    """K: exact top-k slots per position (0 in sample mode)."""
    sample_width: int
    """S: slots for distinct drawn ids per position (0 in top-k mode)."""
    samples: int = 0
    """N: draws per position; a sampled id's weight is count / N."""
    logprob_bits: int = 16
    """16 (float16) or 8 (``storage.codec.logprobs``) for the head's log-probs."""
    token_roles: bool = False
    """Whether shards store the ``token_role`` column (text alignment, ``Manifest.text_alignment``)."""

    @classmethod
    def of(cls, manifest) -> Layout:
        """The layout a manifest records (format 1 and 2 manifests included)."""
        head = manifest.top_k if manifest.mode != "sample" else 0
        if manifest.vocab_size is None or manifest.width is None or head is None:
            raise ManifestError(f"{manifest.location}/manifest.json lacks vocab_size, width or top_k; rebuild the cache")
        return cls(max(2, manifest.format_version), manifest.mode, manifest.vocab_size, head,
                   manifest.width - head, manifest.samples or 0, manifest.logprob_bits or 16,
                   manifest.text_alignment is not None)

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype("uint16" if self.vocab_size <= MAX_UINT16_VOCAB else "uint32")

    @property
    def pad_id(self) -> int:
        """The id that unused slots decode to in plain readers (Distillery's own reader returns -1)."""
        return int(np.iinfo(self.id_dtype).max)

    @property
    def count_dtype(self) -> np.dtype:
        return np.dtype("uint8" if self.samples <= 255 else "uint16")

    @property
    def _codec(self):
        return layout_v3 if self.version == 3 else layout_v2

    def encode(self, targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate one shard's targets and return its stored columns, each (n, T) or (n, T, slots)."""
        check_targets(targets, self.head_width, self.sample_width, self.token_roles)
        columns = self._codec.encode(self, {k: v for k, v in targets.items() if k != "token_role"})
        return columns | ({"token_role": targets["token_role"]} if self.token_roles else {})

    def decode(self, stored: dict[str, np.ndarray], counts: bool = False) -> dict[str, np.ndarray]:
        """Stored columns -> reader arrays (``storage.codec.targets.READER_FIELDS``); with ``counts`` (format 3, a sample
        or hybrid cache), also the stored draw counts (``storage.codec.v3.decode``)."""
        roles = {"token_role": stored["token_role"]} if "token_role" in stored else {}
        if not counts:
            return self._codec.decode(self, stored) | roles
        if self.version != 3 or not self.sample_width:
            raise ValueError(f"draw counts are stored only by format-3 sample and hybrid caches, not by this "
                             f"format-{self.version} {self.mode} cache")
        return layout_v3.decode(self, stored, counts=True) | roles

    def columns(self) -> dict[str, str]:
        """Each stored column's dtype and per-sequence shape, e.g. ``uint8 (T, S)``: what the manifest records."""
        one = {"input_ids": np.zeros((1, 1), np.int32), "loss_mask": np.ones((1, 1), np.uint8)}
        if self.head_width:
            one |= {"head_ids": np.arange(self.head_width, dtype=np.int32)[None, None],
                    "head_logprobs": np.zeros((1, 1, self.head_width), np.float32),
                    "tail_logprob": np.zeros((1, 1), np.float32)}
        if self.sample_width:
            one |= {"sample_ids": np.zeros((1, 1, self.sample_width), np.int32),
                    "sample_counts": np.zeros((1, 1, self.sample_width), np.int32)}
        if self.token_roles:
            one["token_role"] = np.zeros((1, 1), np.uint8)
        return {name: f"{a.dtype} (T, {_slots(name)})" if a.ndim == 3 else f"{a.dtype} (T)"
                for name, a in self.encode(one).items()}


def _slots(column: str) -> str:
    return "K" if column.startswith("head_") else "S" if column.startswith("sample_") else "W"
