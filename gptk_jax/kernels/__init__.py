"""Hand-written kernels XLA calls through its FFI (few_rows.py: few-row float32 products)."""
