"""Rules for config values: each takes a value and returns None when it is fine, else the problem in
words ("must be a positive integer"), which ``ConfigError`` prints after the key.

``lora_lab.config.validate`` applies them to the keys of a run's config; a method declares the rules of
its own settings (``Method.config_rules``) with the same constructors.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from omegaconf import ListConfig

Rule = Callable[[object], "str | None"]  # a value -> None when fine, else the problem


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int | None = None, high: int | None = None, null: bool = False, say_null: bool = True) -> Rule:
    if low == 1 and high is None:
        wanted = "a positive integer"
    elif high is not None:
        wanted = f"an integer in [{low}, {high}]"
    else:
        wanted = "an integer" if low is None else f"an integer >= {low}"
    wanted = f"null or {wanted}" if null and say_null else wanted

    def rule(value):
        if value is None and null:
            return None
        if not is_integer(value) or (low is not None and value < low) or (high is not None and value > high):
            return f"must be {wanted}"
        return None

    return rule


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False,
           null: bool = False) -> Rule:
    if high is None:
        wanted = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    wanted = f"null or {wanted}" if null else wanted

    def rule(value):
        if value is None and null:
            return None
        if (not is_number(value) or value < low or (low_open and value == low)
                or (high is not None and (value > high or (high_open and value == high)))):
            return f"must be {wanted}"
        return None

    return rule


def boolean(null: bool = False) -> Rule:
    def rule(value):
        if (value is None and null) or isinstance(value, bool):
            return None
        return "must be true or false" + (" (or null)" if null else "")

    return rule


def choice(*options, null: bool = False) -> Rule:
    shown = [str(o).lower() if isinstance(o, bool) else o for o in options]
    wanted = f"one of {shown}" if all(isinstance(o, str) for o in options) else ", ".join(map(str, shown))

    def rule(value):
        if value is None and null:
            return None
        if any(value is o if isinstance(o, bool) else value == o for o in options):
            return None
        return f"must be {wanted}"

    return rule


def text(null: bool = False) -> Rule:
    def rule(value):
        if (value is None and null) or (isinstance(value, str) and value.strip()):
            return None
        return "must be a non-empty string" + (" or null" if null else "")

    return rule


def names(null: bool = False, empty: bool = False) -> Rule:
    """A list of non-empty strings (e.g. target aliases)."""
    def rule(value):
        if value is None and null:
            return None
        if not isinstance(value, (list, tuple, ListConfig)) or not all(isinstance(v, str) and v for v in value):
            return "must be a list of names" + (" or null" if null else "")
        if not value and not empty:
            return "must not be empty"
        return None

    return rule
