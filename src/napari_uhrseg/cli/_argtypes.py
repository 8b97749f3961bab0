"""argparse types shared by the ``uhrseg`` sub-commands: out-of-range numbers are refused with the reason
(exit 2, nothing read or written) instead of falling through to a default or failing deep inside a run."""
from __future__ import annotations

import argparse


def count(minimum: int):
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"count>={minimum}"
    return parse


def _number(text: str, ok, rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive(text: str) -> float:
    """A number > 0."""
    return _number(text, lambda v: v > 0, "above 0")


def non_negative(text: str) -> float:
    """A number >= 0."""
    return _number(text, lambda v: v >= 0, "0 or more")
