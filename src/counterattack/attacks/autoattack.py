"""AutoAttack (Croce and Hein, ICML 2020) through fra31's reference code (PyPI ``pyautoattack``).

``autoattack-paper`` is the TTC paper's subset: APGD-CE and APGD-DLR with the standard version's
settings (1 restart, ``steps`` iterations, 100 by default), APGD-CE alone where there are fewer than
3 classes (DLR needs three). ``autoattack`` is the full standard version: APGD-CE, APGD-T, FAB-T and
Square. AutoAttack draws its randomness from its own seed; we give it one drawn from the first
image's stream, so a batch is reproducible, but unlike the other attacks its result can depend on
which images share the batch. Its warnings (randomised or gradient-masking defenses) are kept in
``warnings`` for ``counterattack sanity``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..classifier import ZeroShotClassifier
from ..errors import CounterattackError
from ..randomness import ImageRandomness


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextlib.contextmanager
def collecting_warnings(logger: logging.Logger, into: list[str]) -> Iterator[None]:
    """Append the warnings ``logger`` (AutoAttack's) emits inside the block to ``into``."""
    handler = _Collect(into)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@dataclass(frozen=True)
class AutoAttack:
    eps: float = 1 / 255
    steps: int = 100
    version: str = "paper"  # "paper" (APGD-CE + APGD-DLR) or "standard"
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "autoattack-paper" if self.version == "paper" else "autoattack"

    def attacks_for(self, num_classes: int) -> list[str]:
        if self.version == "standard":
            return ["apgd-ce", "apgd-t", "fab-t", "square"]
        return ["apgd-ce", "apgd-dlr"] if num_classes >= 3 else ["apgd-ce"]

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor:
        try:
            from pyautoattack import AutoAttack as Reference
        except ImportError as exc:  # pragma: no cover - a dependency
            raise CounterattackError("AutoAttack needs pyautoattack: pip install pyautoattack") from exc
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng.generators[0]))
        adversary = Reference(classifier, eps=self.eps, norm="Linf", version="standard", seed=seed, device=images.device)
        adversary.apgd.n_iter = self.steps
        adversary.apgd_targeted.n_iter = self.steps
        adversary.apgd_targeted.n_target_classes = min(9, classifier.num_classes - 1)
        adversary.fab.n_target_classes = min(9, classifier.num_classes - 1)
        adversary.attacks_to_run = self.attacks_for(classifier.num_classes)
        with collecting_warnings(adversary.logger, self.warnings):
            adversarial, _ = adversary.run_standard_evaluation(images.detach().float(), labels, batch_size=len(images))
        return adversarial.detach()

    def describe(self) -> dict:
        return {"attack": self.name, "eps": self.eps, "steps": self.steps,
                "attacks": "apgd-ce, apgd-t, fab-t, square" if self.version == "standard" else "apgd-ce, apgd-dlr (apgd-ce below 3 classes)"}
