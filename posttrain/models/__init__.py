"""Model and tokenizer loading, tiny-model presets, the toy tokenizer."""
