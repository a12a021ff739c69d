"""The background shard writer: stage 1's teacher hands it shards and goes on while threads encode and write them."""
from __future__ import annotations

import queue
import threading

import numpy as np

from storage.codec.layout import Layout
from storage.errors import CacheError
from storage.write.cache import CacheDirectory
from storage.write.folder import ShardPlan


class BackgroundShardWriter:
    """Writes submitted shards on ``threads`` worker threads; at most ``depth`` more wait in memory.

    Shards are independent files with their own done records, so they may
    finish in any order. Compression and hashing release the GIL, which lets
    several threads keep up with a fast GPU teacher.
    """

    def __init__(self, cache: CacheDirectory, backend, layout: Layout, level: int, depth: int = 2,
                 threads: int = 1):
        self.cache, self.backend, self.layout, self.level = cache, backend, layout, level
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name=f"shard-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, plan: ShardPlan, arrays: dict[str, np.ndarray]) -> None:
        """Queue one shard's targets (``storage.codec.targets``); they are encoded by ``layout`` on a writer thread."""
        self._raise_if_failed()
        self._queue.put((plan, arrays))

    def close(self) -> None:
        """Wait for every submitted shard to be on disk; re-raise a writer error."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if isinstance(self._error, CacheError):  # a full disk, say: the user's problem, told in one line
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"writing a shard to {self.cache.path} failed: {self._error}") from self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    plan, arrays = item
                    self.cache.write_shard(plan, self.backend, self.layout.encode(arrays), self.level)
                except BaseException as exc:  # surfaced to the producer by submit/close
                    self._error = exc
