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

from .adaptive import AdaptiveAttack
from .attacks import ATTACKS
from .defenses import DEFENSES
from .errors import CounterattackError
from .options import PIXEL, PIXEL_UNIT, flag, options_of

# The registered classes whose options become flags: defenses, attacks, and the adaptive attack's own settings.
REGISTRIES: dict[str, Mapping[str, type]] = {"defense": DEFENSES, "attack": ATTACKS, "adaptive": {"adaptive": AdaptiveAttack}}


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


PIXELS = number(float, 0, 255)  # a budget or step size in 1/255: at most the whole [0, 1] range
COUNT = number(int, 0)
POSITIVE = number(int, 1)


def names_of(kind: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names; attack names are checked here, defense names when the run starts
    (a typo in either is one line)."""
    registry = REGISTRIES[kind]

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} in {text!r}; available: {', '.join(registry)}")
        if kind == "attack":
            try:
                ATTACKS.check_names(names)
            except CounterattackError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return names

    return parse


def cli_value(value: Any, meta: Mapping[str, Any]) -> Any:
    """An option's value as the command line writes it (budgets in 1/255)."""
    return round(value * 255, 6) if meta.get("unit") == PIXEL_UNIT and isinstance(value, float) else value


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


def add_registered_options(command: argparse.ArgumentParser, kind: str) -> None:
    """``--NAME-SETTING`` for every option of every registered class of ``kind``, from its dataclass."""
    for name, cls in REGISTRIES[kind].items():
        settings = options_of(cls)
        if not settings:
            continue
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        group = command.add_argument_group(f"{kind} {name}" if kind != "adaptive" else "adaptive attacks (--threat adaptive)",
                                           summary)
        for setting in settings:
            meta = setting.metadata
            unit = f", in {PIXEL_UNIT}" if meta["unit"] == PIXEL_UNIT else ""
            integer = isinstance(setting.default, int) and not isinstance(setting.default, bool)
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else ("N" if integer else "X")
            group.add_argument(flag(name, setting.name), *meta["aliases"], dest=f"{kind}:{name}:{setting.name}",
                               type=option_parser(setting), default=None, metavar=metavar,
                               help=f"{meta['help']}{unit} (default: {cli_value(setting.default, meta)})")


def registered_settings(args: argparse.Namespace, kind: str, name: str) -> dict[str, Any]:
    """The options of ``name`` given on the command line, in the library's units."""
    given = {}
    for setting in options_of(REGISTRIES[kind][name]):
        value = getattr(args, f"{kind}:{name}:{setting.name}", None)
        if value is not None:
            given[setting.name] = value * PIXEL if setting.metadata["unit"] == PIXEL_UNIT else value
    return given
