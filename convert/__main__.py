"""`python -m convert --format {meta,hf,gguf} --input PATH --output DIR` (see convert/cli.py)."""

import sys

from convert.cli import main

sys.exit(main())
