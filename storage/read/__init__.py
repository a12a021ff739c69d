"""Reading a cache: the epoch order as a pure function of (seed, epoch), the resumable stream, prefetch, subsampling."""
