"""Benchmarks behind ``distillery bench``; imported by the CLI and nothing else."""
