"""The Llama 3 trunk: config, RoPE, layers, attention over an explicit KV cache, the Flax model,
and the converted-checkpoint folder (save / load)."""
