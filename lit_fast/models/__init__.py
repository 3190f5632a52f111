"""Where a model comes from and how it is held: loading, GGUF, quantization, LoRA/QLoRA, sharding, precision checks."""
