"""Demo and test assets: the BPE tokenizer trainer, random-init models and the shipped corpora."""
