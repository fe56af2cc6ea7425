"""The evaluation loop of the paper's protocol.

Adversarial images are crafted against the undefended classifier; then every defense is applied to
the same clean and the same adversarial images. Randomness is per image (see ``randomness``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks import Attack
from .classifier import ZeroShotClassifier
from .data import EvalDataset, WithIndex, balanced_subset
from .defenses import Defense
from .randomness import ImageRandomness


@dataclass
class _Tally:
    """Running sums for one defense on one dataset."""

    n: int = 0
    correct_clean: int = 0
    correct_adv: int = 0
    tau_clean: float = 0.0
    tau_adv: float = 0.0
    counterattacked_clean: int = 0
    counterattacked_adv: int = 0
    forwards: int = 0
    backwards: int = 0
    has_tau: bool = False

    def add(self, clean, adv, labels: torch.Tensor) -> None:
        self.n += len(labels)
        self.correct_clean += int((clean.logits.argmax(-1) == labels).sum())
        self.correct_adv += int((adv.logits.argmax(-1) == labels).sum())
        self.forwards += clean.forwards + adv.forwards
        self.backwards += clean.backwards + adv.backwards
        if clean.tau is not None:
            self.has_tau = True
            self.tau_clean += float(clean.tau.double().sum())
            self.tau_adv += float(adv.tau.double().sum())
            self.counterattacked_clean += int(clean.counterattacked.sum())
            self.counterattacked_adv += int(adv.counterattacked.sum())

    def record(self, dataset: str, attack: str, defense: str) -> dict:
        def mean(total: float) -> float | None:
            return total / self.n if self.has_tau else None

        return {
            "dataset": dataset,
            "attack": attack,
            "defense": defense,
            "n": self.n,
            "clean_acc": 100.0 * self.correct_clean / self.n,
            "robust_acc": 100.0 * self.correct_adv / self.n,
            "mean_tau_clean": mean(self.tau_clean),
            "mean_tau_adv": mean(self.tau_adv),
            "counterattacked_clean": mean(self.counterattacked_clean),
            "counterattacked_adv": mean(self.counterattacked_adv),
            # Per image, counting the clean and the adversarial pass of each image.
            "forwards_per_image": self.forwards / (2 * self.n),
            "backwards_per_image": self.backwards / (2 * self.n),
        }


@dataclass
class RunSettings:
    seed: int = 0
    limit: int | None = None
    batch_size: int = 128
    workers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True


def evaluate_dataset(
    classifier: ZeroShotClassifier,
    data: EvalDataset,
    attack: Attack,
    defenses: Sequence[Defense],
    settings: RunSettings,
) -> list[dict]:
    """One record per defense: clean and robust accuracy, tau statistics and cost."""
    indices = balanced_subset(data.targets, settings.limit)
    loader = DataLoader(
        WithIndex(data.dataset, indices),
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        pin_memory=settings.device.type == "cuda",
    )
    tallies = {defense.name: _Tally() for defense in defenses}
    bar = tqdm(total=len(indices), desc=data.name, unit="img", disable=not settings.progress, leave=False)
    for images, labels, ids in loader:
        images, labels = images.to(settings.device), labels.to(settings.device)
        ids = ids.tolist()
        adversarial = attack(classifier, images, labels, ImageRandomness.for_images(settings.seed, data.name, ids, "attack"))
        for defense in defenses:
            # Every defense draws the same noise for an image, so their results pair up.
            clean = defense(classifier, images, ImageRandomness.for_images(settings.seed, data.name, ids, "defense-clean"))
            adv = defense(classifier, adversarial, ImageRandomness.for_images(settings.seed, data.name, ids, "defense-adv"))
            tallies[defense.name].add(clean, adv, labels)
        bar.update(len(ids))
    bar.close()
    return [tally.record(data.name, attack.name, name) for name, tally in tallies.items()]
