"""Stage 1, ``distillery cache``: run a teacher once and write its soft targets as checksummed shards."""
