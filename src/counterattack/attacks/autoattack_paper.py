"""The TTC paper's AutoAttack: APGD-CE and APGD-DLR with the standard version's settings."""

from __future__ import annotations

from dataclasses import dataclass

from .autoattack import AutoAttack
from .base import register_attack


@register_attack
@dataclass(frozen=True)
class AutoAttackPaper(AutoAttack):
    """APGD-CE + APGD-DLR (the TTC paper's subset of AutoAttack)."""

    def attacks_for(self, num_classes: int) -> list[str]:
        """DLR needs three classes: APGD-CE alone below that."""
        return ["apgd-ce", "apgd-dlr"] if num_classes >= 3 else ["apgd-ce"]

    def describe(self) -> dict:
        return {**super().describe(), "attacks": "apgd-ce, apgd-dlr (apgd-ce alone below 3 classes)"}
