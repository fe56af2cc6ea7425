"""Registered options on the command line: every option of every defense and attack is a ``--NAME-FIELD`` flag.

Budgets and step sizes (``unit=PIXEL_UNIT``) are given in 1/255 on the command line and stored in
[0, 1] pixel units; bounds and choices come from the option itself. The options are read through
``manifest``, so building the parser imports no model library.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from .manifest import EntrySpec, OptionSpec, registered
from .options import PIXEL, PIXEL_UNIT, flag


def _shown(bound: float) -> str:
    """A bound as a user types it: an integer whole (9223372036854775807, not 9.22337e+18), a fraction short."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


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
            raise argparse.ArgumentTypeError(f"must be >= {_shown(low)}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {_shown(high)}, got {text}")
        return value

    return parse


PIXELS = number(float, 0, 255)  # a budget or step size in 1/255: at most the whole [0, 1] range
COUNT = number(int, 0)
POSITIVE = number(int, 1)


def entries(kind: str) -> dict[str, EntrySpec]:
    """The registered classes of a kind (``defense``, ``attack`` or ``adaptive``) with their options."""
    return registered()[kind]


def names_of(kind: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, checked against the registry before any model library loads."""

    def parse(text: str) -> list[str]:
        known = entries(kind)
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} in {text!r}; available: {', '.join(known)}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"Unknown {kind}(s) {', '.join(map(repr, unknown))}. "
                                             f"Available: {', '.join(known)}.")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{kind.capitalize()} listed twice: {', '.join(names)}.")
        return names

    return parse


def cli_value(value: Any, unit: str | None) -> Any:
    """An option's value as the command line writes it (budgets in 1/255)."""
    return round(value * 255, 6) if unit == PIXEL_UNIT and isinstance(value, float) else value


def library_value(value: Any, unit: str | None) -> Any:
    """A value as the command line gives it, in the library's units (budgets in [0, 1] pixels)."""
    return value * PIXEL if unit == PIXEL_UNIT and value is not None else value


def option_parser(spec: OptionSpec) -> Callable[[str], Any]:
    """How the command line reads one option: its choices, free text, or a number within its bounds (in 1/255 for
    budgets)."""
    if spec.choices is not None:
        def choice(text: str) -> str:
            if text not in spec.choices:
                raise argparse.ArgumentTypeError(f"must be one of {', '.join(spec.choices)}, got {text!r}")
            return text
        return choice
    if isinstance(spec.default, str):  # free text (DBD's template): the class checks it when it is built
        return str
    high = None if spec.high is None else cli_value(float(spec.high), spec.unit)
    return number(int if spec.integer else float, spec.low, high)


def add_registered_options(command: argparse.ArgumentParser, kind: str) -> None:
    """``--NAME-SETTING`` for every option of every registered class of ``kind``."""
    for name, entry in entries(kind).items():
        if not entry.options:
            continue
        group = command.add_argument_group(
            f"{kind} {name}" if kind != "adaptive" else "adaptive attacks (--threat adaptive)", entry.summary)
        for spec in entry.options:
            unit = f", in {PIXEL_UNIT}" if spec.unit == PIXEL_UNIT else ""
            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else ("N" if spec.integer else "X")
            group.add_argument(flag(name, spec.name), *spec.aliases, dest=f"{kind}:{name}:{spec.name}",
                               type=option_parser(spec), default=None, metavar=metavar,
                               # argparse formats help with %: a literal one is doubled
                               help=f"{spec.help}{unit} (default: {cli_value(spec.default, spec.unit)})"
                               .replace("%", "%%"))


def registered_settings(args: argparse.Namespace, kind: str, name: str) -> dict[str, Any]:
    """The options of ``name`` given on the command line, in the library's units."""
    given = {}
    for spec in entries(kind)[name].options:
        value = getattr(args, f"{kind}:{name}:{spec.name}", None)
        if value is not None:
            given[spec.name] = library_value(value, spec.unit)
    return given


def given_flags(args: argparse.Namespace) -> list[str]:
    """Every registered option's flag given on the command line."""
    return [flag(name, spec.name) for kind, kind_entries in registered().items() for name, entry in kind_entries.items()
            for spec in entry.options if getattr(args, f"{kind}:{name}:{spec.name}", None) is not None]
