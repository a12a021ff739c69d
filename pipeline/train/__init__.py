"""Stage 2, ``distillery train`` and ``pretrain``: stream soft targets (or text) into a student."""
