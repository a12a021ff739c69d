"""Data shared by stages 1 and 2: load documents, encode text / chat / prompt-response, pack with a loss mask."""
