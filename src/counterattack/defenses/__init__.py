"""Test-time defenses: one file each, registered by name with ``@register_defense``.

Every module of this package is imported here, so a new file that registers a defense is all it
takes: its options become ``--NAME-OPTION`` flags, and ``counterattack defenses`` lists it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from ..errors import CounterattackError
from .base import (
    ADAPTIVE_METHODS, DEFENSES, PIXEL_UNIT, TTC_EPS, TTC_STEP_SIZE, TTC_STEPS, AttackView, Defense, DefenseOutput, option,
    options_of, register_defense, runtime, weighted_mix,
)


def discover_defenses() -> None:
    """Import every module on this package's path, registering the defenses they define ("none" first)."""
    for name in sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n != "none", n)):
        if not name.startswith("_"):
            importlib.import_module(f"{__name__}.{name}")


discover_defenses()

from .anti_adversary import AntiAdversary  # noqa: E402
from .hd import HedgeDefense  # noqa: E402
from .none import NoDefense  # noqa: E402
from .rn import RandomNoise  # noqa: E402
from .ttc import TTC, TTCResult, relative_shift  # noqa: E402
from .tte import TransformEnsemble  # noqa: E402


def check_defense_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise CounterattackError(
            f"Unknown defense(s) {', '.join(map(repr, unknown))}. Available: {', '.join(DEFENSES)}."
        )
    if len(set(names)) != len(names):
        raise CounterattackError(f"Defense listed twice: {', '.join(names)}.")


def build_defense(name: str, **settings: Any) -> Defense:
    """A registered defense with some settings changed (``tau_thres=0.1``; budgets in [0, 1] pixel units)."""
    check_defense_names([name])
    cls = DEFENSES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise CounterattackError(f"{name} has no setting {', '.join(unknown)}; its settings: "
                                 f"{', '.join(f.name for f in options_of(cls)) or 'none'}.")
    return cls(**settings)


def build_defenses(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None = None,
                   **shared: Any) -> list[Defense]:
    """Defenses by name. ``settings[name]`` changes one defense's settings; ``shared`` settings go to
    every defense that has a setting of that name (``tau_encoder=...``, ``tau_thres=inf``)."""
    check_defense_names(names)
    settings = settings or {}
    built = []
    for name in names:
        own = {f.name for f in fields(DEFENSES[name])}
        built.append(build_defense(name, **{**{k: v for k, v in shared.items() if k in own}, **settings.get(name, {})}))
    return built


__all__ = [
    "ADAPTIVE_METHODS", "AttackView", "DEFENSES", "AntiAdversary", "Defense", "DefenseOutput", "HedgeDefense", "NoDefense",
    "PIXEL_UNIT", "RandomNoise", "TTC", "TTCResult", "TTC_EPS", "TTC_STEPS", "TTC_STEP_SIZE", "TransformEnsemble",
    "build_defense", "build_defenses", "check_defense_names", "discover_defenses", "option", "options_of",
    "register_defense", "relative_shift", "runtime", "weighted_mix",
]
