"""Test-time defenses, one per file, registered by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import CounterattackError
from .anti_adversary import AntiAdversary
from .base import ADAPTIVE_METHODS, AttackView, Defense, DefenseOptions, DefenseOutput
from .hedge import HedgeDefense
from .none import NoDefense
from .rn import RandomNoise
from .tte import TransformEnsemble
from .ttc import TTC, TTCResult, relative_shift

DEFENSES: dict[str, Callable[[DefenseOptions], Defense]] = {
    "none": NoDefense.from_options,
    "rn": RandomNoise.from_options,
    "anti-adversary": AntiAdversary.from_options,
    "hd": HedgeDefense.from_options,
    "tte": TransformEnsemble.from_options,
    "ttc": TTC.from_options,
}


def check_defense_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise CounterattackError(
            f"Unknown defense(s) {', '.join(map(repr, unknown))}. Available: {', '.join(DEFENSES)}."
        )
    if len(set(names)) != len(names):
        raise CounterattackError(f"Defense listed twice: {', '.join(names)}.")


def build_defenses(names: Sequence[str], options: DefenseOptions = DefenseOptions()) -> list[Defense]:
    """Defenses by registry name, sharing one set of options."""
    check_defense_names(names)
    return [DEFENSES[name](options) for name in names]


__all__ = [
    "ADAPTIVE_METHODS", "AttackView", "DEFENSES", "AntiAdversary", "Defense", "DefenseOptions", "DefenseOutput", "HedgeDefense", "NoDefense",
    "RandomNoise", "TTC", "TTCResult", "TransformEnsemble", "build_defenses", "check_defense_names", "relative_shift",
]
