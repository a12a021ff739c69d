"""The generation stage, ``distillery generate``: a model writes completions of prompts into a folder of Parquet rows."""
