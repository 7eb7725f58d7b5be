"""What every command line of the project shares: usage errors are one line on stderr and exit
code 2, like the project's own errors (a traceback means a bug); `--help` prints the whole
usage."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: `PROG: error: MESSAGE (--help for usage)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")
