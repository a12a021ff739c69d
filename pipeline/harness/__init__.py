"""``distillery eval``: students scored with EleutherAI's lm-evaluation-harness (the ``eval`` extra), and the tasks
shipped for it (``tasks/``). Only the CLI imports this package."""
