"""AutoAttack (Croce and Hein, ICML 2020) through fra31's reference code (PyPI ``pyautoattack``).

``autoattack`` is the full standard version: APGD-CE, APGD-T, FAB-T and Square, with 1 restart and
``steps`` APGD iterations (100 by default, as in pyautoattack). ``autoattack-paper`` (its own file)
is the TTC paper's subset. AutoAttack draws its randomness from one global seed per call;
we give it one drawn from the batch's first image's stream, so a batch is reproducible, but unlike
the other attacks its result depends on which images share the batch: a run with AutoAttack puts
its batch size and number of processes into the configuration hash that guards resumption. Its
warnings (randomised or gradient-masking defenses) are kept in ``warnings`` for ``counterattack sanity``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from ..classifier import ZeroShotClassifier
from ..inputs import check_pixels
from ..errors import CounterattackError
from ..options import PIXEL_UNIT, describe_options, option, runtime
from ..randomness import ImageRandomness
from .base import register_attack

DEFAULT_APGD_ITERATIONS = 100  # pyautoattack's default, which the TTC paper's AutoAttack runs


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


def import_pyautoattack() -> ModuleType:
    """pyautoattack, or a one-line error saying what to install."""
    try:
        import pyautoattack
        import pyautoattack.autopgd_base
        import pyautoattack.checks
    except ImportError as exc:
        raise CounterattackError(
            f"AutoAttack needs the pyautoattack package ({exc}): pip install pyautoattack "
            "(a dependency of clip-counterattack: pip install -e . installs it)"
        ) from exc
    return pyautoattack


@register_attack
@dataclass(frozen=True)
class AutoAttack:
    """AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square."""

    norm: ClassVar[str] = "linf"
    seeded_per_batch: ClassVar[bool] = True  # one seed per batch: results depend on which images share one
    eps: float = option(1 / 255, "L-inf budget", unit=PIXEL_UNIT)
    steps: int = option(DEFAULT_APGD_ITERATIONS, "APGD iterations (APGD adapts its own step size)", low=1)
    warnings: list[str] = runtime(None)  # AutoAttack's warnings, for `counterattack sanity`

    def __post_init__(self) -> None:
        import_pyautoattack()  # a missing dependency fails when the attack is chosen, not hours into a run
        if self.warnings is None:
            object.__setattr__(self, "warnings", [])

    def attacks_for(self, num_classes: int) -> list[str]:
        """The attacks run on a dataset with ``num_classes`` classes."""
        return ["apgd-ce", "apgd-t", "fab-t", "square"]

    def adversary(self, model: torch.nn.Module, num_classes: int, seed: int, device: torch.device):
        """pyautoattack's ``AutoAttack`` in its ``custom`` version, with the standard version's settings.

        The APGD attacks are built with ``n_iter=steps``: APGD derives its step-size schedule
        (checkpoints, minimum interval, decrease) from ``n_iter`` in its constructor, so setting the
        iterations afterwards would keep the schedule of 100.
        """
        pyautoattack = import_pyautoattack()
        APGDAttack = pyautoattack.autopgd_base.APGDAttack
        APGDAttack_targeted = pyautoattack.autopgd_base.APGDAttack_targeted
        adversary = pyautoattack.AutoAttack(model, attacks=self.attacks_for(num_classes), eps=self.eps, norm="Linf",
                                            seed=seed, device=device, version="custom")
        shared = dict(n_iter=self.steps, n_restarts=1, eps=self.eps, norm="Linf", eot_iter=1, rho=0.75, seed=seed,
                      device=device, logger=adversary.logger, verbose=False)
        adversary.apgd = APGDAttack(model, **shared)
        adversary.apgd_targeted = APGDAttack_targeted(model, **shared)
        targets = min(9, num_classes - 1)
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_restarts = 1
        adversary.fab.n_target_classes = targets
        return adversary

    def __call__(
        self, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, rng: ImageRandomness
    ) -> torch.Tensor:
        images = check_pixels(images).detach().float()
        seed = rng.batch_seed()
        adversary = self.adversary(classifier, classifier.num_classes, seed, images.device)
        with collecting_warnings(adversary.logger, self.warnings):
            adversarial, _ = adversary.run_standard_evaluation(images, labels, batch_size=len(images))
        return adversarial.detach()

    def describe(self) -> dict:
        return {**describe_options(self), "restarts": 1, "attacks": ", ".join(self.attacks_for(3)),
                "seeded_by": "the batch's first image: depends on batch composition"}
