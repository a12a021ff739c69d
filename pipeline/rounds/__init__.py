"""Stage 3, ``distillery run``: rounds of (cache, train), state and locks, reports and Slurm scripts."""
