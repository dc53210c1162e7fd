"""`softwatch bench ...`: each benchmark measures its alternatives side by side in one run."""

import sys


def print_progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)
