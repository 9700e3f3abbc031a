"""What the CLI subcommands share: exit codes and argument parsing."""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_CONVERSION, EXIT_USAGE = 0, 1, 2


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` or ``"224x320"`` -> ``(H, W)``."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}")
    return (values[0], values[1])


def positive_int(text: str) -> int:
    """An integer >= 1, for sizes and counts (argparse turns the error into exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
