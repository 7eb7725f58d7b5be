"""Training configs: `get_config()` per experiment; variants override `configs/base.py`."""
