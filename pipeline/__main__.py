"""``python -m pipeline`` and the ``distillery`` script.

The preemption handlers go in before the CLI and its dependencies are
imported, so a SIGTERM or SIGUSR1 that arrives while the process starts
still ends in exit 75 (requeue) instead of the default termination.
"""
import sys

from pipeline import preempt


def main() -> int:
    preempt.install()
    from pipeline.cli import main as run_cli

    return run_cli()


if __name__ == "__main__":
    sys.exit(main())
