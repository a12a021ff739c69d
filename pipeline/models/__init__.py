"""Loading Hugging Face and GGUF models and tokenizers, their identities, device and dtype, and the logit head."""
