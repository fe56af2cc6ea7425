"""Attacks: functions of (classifier, [0, 1] images, labels, per-image randomness) -> adversarial images.

One file each, registered by name with ``@register_attack``: every module of this package is
imported here, so a new file that registers an attack is all it takes; its options become
``--NAME-OPTION`` flags and ``counterattack attacks`` lists it.
"""

from __future__ import annotations

from .base import ATTACKS, PIXEL, Attack, register_attack


def discover_attacks() -> None:
    """Import every module on this package's path, registering the attacks they define (the paper's first)."""
    ATTACKS.discover(__name__, __path__, first=("pgd", "cw", "autoattack_paper", "autoattack"))


discover_attacks()

from .autoattack import AutoAttack  # noqa: E402
from .autoattack_paper import AutoAttackPaper  # noqa: E402
from .cw import CW  # noqa: E402
from .loop import project, replay_steps, run_steps, sign_gradient_steps, sign_step  # noqa: E402
from .losses import cross_entropy, cw_margin  # noqa: E402
from .pgd import PGD  # noqa: E402

check_attack_names = ATTACKS.check_names
build_attack = ATTACKS.build  # build_attack("cw", eps=4 / 255): budgets in [0, 1] pixel units
build_attacks = ATTACKS.build_many  # build_attacks(names, {name: settings}, eps=...): shared settings


__all__ = [
    "PIXEL", "ATTACKS", "Attack", "AutoAttack", "AutoAttackPaper", "CW", "PGD", "build_attack",
    "build_attacks", "check_attack_names", "cross_entropy", "cw_margin", "project", "register_attack", "replay_steps",
    "run_steps", "sign_gradient_steps", "sign_step",
]
