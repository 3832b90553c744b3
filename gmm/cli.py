"""What every command line of the project shares: errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block, no traceback) and exit status 2."""

    def error(self, message: str):  # argparse's signature
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")
