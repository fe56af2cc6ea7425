"""Registered options on the command line: every option of every defense and attack is a ``--NAME-FIELD`` flag.

Budgets and step sizes (``unit=PIXEL_UNIT``) are given in 1/255 on the command line and stored in
[0, 1] pixel units; bounds and choices come from the option itself.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import Field
from typing import Any

from .attacks import ATTACKS, PIXEL
from .defenses import DEFENSES
from .options import PIXEL_UNIT, options_of


def number(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], float | int]:
    """An argparse type: a finite ``kind`` (int or float) within [low, high]."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return parse


def cli_value(value: Any, meta: Mapping[str, Any]) -> Any:
    """An option's value as the command line writes it (budgets in 1/255)."""
    return round(value * 255, 6) if meta.get("unit") == PIXEL_UNIT and isinstance(value, float) else value


def flag(name: str, setting: str) -> str:
    return f"--{name}-{setting.replace('_', '-')}"


def option_parser(setting: Field) -> Callable[[str], Any]:
    """How the command line reads one option: its choices, or a number within its bounds (in 1/255 for budgets)."""
    meta = setting.metadata
    if meta["choices"] is not None:
        def choice(text: str) -> str:
            if text not in meta["choices"]:
                raise argparse.ArgumentTypeError(f"must be one of {', '.join(meta['choices'])}, got {text!r}")
            return text
        return choice
    high = None if meta["high"] is None else cli_value(float(meta["high"]), meta)
    integer = isinstance(setting.default, int) and not isinstance(setting.default, bool)
    return number(int if integer else float, meta["low"], high)


REGISTRIES = {"defense": DEFENSES, "attack": ATTACKS}


def registered_settings(args: argparse.Namespace, kind: str, name: str) -> dict[str, Any]:
    """The options of ``name`` given on the command line, in the library's units."""
    cls = REGISTRIES[kind][name]
    given = {}
    for setting in options_of(cls):
        value = getattr(args, f"{kind}:{name}:{setting.name}", None)
        if value is not None:
            given[setting.name] = value * PIXEL if setting.metadata["unit"] == PIXEL_UNIT else value
    return given
