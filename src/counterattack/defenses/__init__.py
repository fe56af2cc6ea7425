"""Test-time defenses, one per file, registered by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import CounterattackError
from .base import Defense, DefenseOptions, DefenseOutput
from .none import NoDefense
from .ttc import TTC, TTCResult, relative_shift

DEFENSES: dict[str, Callable[[DefenseOptions], Defense]] = {
    "none": NoDefense.from_options,
    "ttc": TTC.from_options,
}


def build_defenses(names: Sequence[str], options: DefenseOptions = DefenseOptions()) -> list[Defense]:
    """Defenses by registry name, sharing one set of options."""
    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise CounterattackError(
            f"Unknown defense(s) {', '.join(map(repr, unknown))}. Available: {', '.join(DEFENSES)}."
        )
    if len(set(names)) != len(names):
        raise CounterattackError(f"Defense listed twice: {', '.join(names)}.")
    return [DEFENSES[name](options) for name in names]


__all__ = [
    "DEFENSES", "Defense", "DefenseOptions", "DefenseOutput", "NoDefense", "TTC", "TTCResult",
    "build_defenses", "relative_shift",
]
