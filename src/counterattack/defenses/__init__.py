"""Test-time defenses: one file each, registered by name with ``@register_defense``.

Every module of this package is imported here, so a new file that registers a defense is all it
takes: its options become ``--NAME-OPTION`` flags, and ``counterattack defenses`` lists it.
"""

from __future__ import annotations

from .base import (
    ADAPTIVE_METHODS, DEFENSES, PIXEL_UNIT, TTC_EPS, TTC_STEP_SIZE, TTC_STEPS, AttackView, Defense, DefenseOutput, Gate,
    option, options_of, register_defense, runtime, weighted_mix,
)


def discover_defenses() -> None:
    """Import every module on this package's path, registering the defenses they define ("none" first)."""
    DEFENSES.discover(__name__, __path__, first=("none",))


discover_defenses()

from .agc import AGC  # noqa: E402
from .anti_adversary import AntiAdversary  # noqa: E402
from .clipure import CLIPure  # noqa: E402
from .cola import COLA  # noqa: E402
from .csr import CSR  # noqa: E402
from .dbd import DBD  # noqa: E402
from .doc import DOC  # noqa: E402
from .et3 import ET3  # noqa: E402
from .hd import HedgeDefense  # noqa: E402
from .mac import MAC  # noqa: E402
from .none import NoDefense  # noqa: E402
from .rn import RandomNoise  # noqa: E402
from .rtpt import RTPT  # noqa: E402
from .ttc import TTC, TTCResult, relative_shift  # noqa: E402
from .tte import TransformEnsemble  # noqa: E402


check_defense_names = DEFENSES.check_names
build_defense = DEFENSES.build  # build_defense("ttc", tau_thres=0.1): budgets in [0, 1] pixel units
build_defenses = DEFENSES.build_many  # build_defenses(names, {name: settings}, tau_encoder=...): shared settings


__all__ = [
    "ADAPTIVE_METHODS", "AGC", "AttackView", "CLIPure", "COLA", "CSR", "DBD", "DEFENSES", "DOC", "ET3", "AntiAdversary",
    "Defense", "DefenseOutput", "Gate",
    "HedgeDefense", "MAC", "NoDefense", "PIXEL_UNIT", "RTPT", "RandomNoise", "TTC", "TTCResult", "TTC_EPS", "TTC_STEPS",
    "TTC_STEP_SIZE", "TransformEnsemble",
    "build_defense", "build_defenses", "check_defense_names", "discover_defenses", "option", "options_of",
    "register_defense", "relative_shift", "runtime", "weighted_mix",
]
