"""The evaluation loop of the paper's protocol, streamed batch by batch.

Adversarial images are crafted against the undefended classifier; then every defense is applied to
the same clean and the same adversarial images. Randomness is per image (see ``randomness``), so
a batch's results do not depend on how the images were batched, resumed or sharded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks import Attack
from .classifier import ZeroShotClassifier
from .data import EvalDataset, WithIndex, balanced_subset
from .defenses import Defense, DefenseOutput
from .randomness import ImageRandomness


@dataclass
class RunSettings:
    seed: int = 0
    limit: int | None = None
    batch_size: int = 128
    workers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    rank: int = 0
    world_size: int = 1


class _Stopwatch:
    """Wall time and, on CUDA, peak memory of a block."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "_Stopwatch":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_memory_mb = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.seconds = time.perf_counter() - self.start


def _per_image(output: DefenseOutput) -> dict:
    return {
        "pred": output.logits.argmax(-1).tolist(),
        "tau": None if output.tau is None else output.tau.tolist(),
        "counterattacked": None if output.counterattacked is None else output.counterattacked.tolist(),
    }


def evaluate_dataset(
    classifier: ZeroShotClassifier,
    data: EvalDataset,
    attack: Attack,
    defenses: Sequence[Defense],
    settings: RunSettings,
    skip: Collection[int] = (),
    attack_for_defense: Callable[[Defense], Attack] | None = None,
) -> Iterator[dict]:
    """Yield one result per batch: per-image predictions and taus of every defense, and its cost.

    Under the paper's protocol ``attack`` is crafted once, against the undefended model, for all
    defenses; ``attack_for_defense`` gives each defense its own attack instead (adaptive attacks). Images whose index is in ``skip``
    (already done) are left out; the rest are shared among ``settings.world_size`` processes, this
    one taking every ``world_size``-th from ``rank``.
    """
    attack_for = attack_for_defense or (lambda defense: attack)
    todo = [i for i in balanced_subset(data.targets, settings.limit) if i not in skip]
    mine = todo[settings.rank :: settings.world_size]
    if not mine:
        return
    loader = DataLoader(
        WithIndex(data.dataset, mine),
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        pin_memory=settings.device.type == "cuda",
    )
    show = settings.progress and settings.rank == 0
    with tqdm(total=len(mine), desc=data.name, unit="img", disable=not show, leave=False) as bar:
        for images, labels, ids in loader:
            images, labels = images.to(settings.device), labels.to(settings.device)
            ids = ids.tolist()

            def streams(purpose: str) -> ImageRandomness:
                return ImageRandomness.for_images(settings.seed, data.name, ids, purpose)

            batch = {"dataset": data.name, "ids": ids, "labels": labels.tolist(), "defenses": {}}
            crafted: dict[int, tuple[torch.Tensor, float]] = {}
            for defense in defenses:
                attack_of_defense = attack_for(defense)
                if id(attack_of_defense) not in crafted:  # the paper's protocol crafts once for all defenses
                    with _Stopwatch(settings.device) as attack_time:
                        adv_images = attack_of_defense(classifier, images, labels, streams("attack"))
                    crafted[id(attack_of_defense)] = (adv_images, attack_time.seconds)
                adversarial, attack_seconds = crafted[id(attack_of_defense)]
                with _Stopwatch(settings.device) as cost:
                    # Every defense draws the same noise for an image, so their results pair up.
                    clean = defense(classifier, images, streams("defense-clean"))
                    adv = defense(classifier, adversarial, streams("defense-adv"))
                batch["defenses"][defense.name] = {
                    "clean": _per_image(clean),
                    "adv": _per_image(adv),
                    "forwards": clean.forwards + adv.forwards,
                    "backwards": clean.backwards + adv.backwards,
                    "seconds": cost.seconds,
                    "peak_memory_mb": cost.peak_memory_mb,
                    "attack_seconds": attack_seconds,
                }
            yield batch
            bar.update(len(ids))


def summarize(
    batches: Iterable[dict], datasets: Sequence[str], defenses: Sequence[str], attack: str,
    threat: str = "paper", adaptive: str | None = None,
) -> list[dict]:
    """One record per dataset and defense, in the given orders, from per-batch results."""
    sums: dict[tuple[str, str], dict] = {}
    for batch in batches:
        labels = batch["labels"]
        for name, result in batch["defenses"].items():
            s = sums.setdefault((batch["dataset"], name), {
                "n": 0, "correct_clean": 0, "correct_adv": 0, "tau_clean": 0.0, "tau_adv": 0.0,
                "ca_clean": 0, "ca_adv": 0, "forwards": 0, "backwards": 0, "seconds": 0.0,
                "peak": None, "has_tau": False})
            s["n"] += len(labels)
            s["correct_clean"] += sum(p == y for p, y in zip(result["clean"]["pred"], labels))
            s["correct_adv"] += sum(p == y for p, y in zip(result["adv"]["pred"], labels))
            if result["clean"]["tau"] is not None:
                s["has_tau"] = True
                s["tau_clean"] += sum(result["clean"]["tau"])
                s["tau_adv"] += sum(result["adv"]["tau"])
                s["ca_clean"] += sum(result["clean"]["counterattacked"])
                s["ca_adv"] += sum(result["adv"]["counterattacked"])
            s["forwards"] += result["forwards"]
            s["backwards"] += result["backwards"]
            s["seconds"] += result["seconds"]
            if result["peak_memory_mb"] is not None:
                s["peak"] = max(s["peak"] or 0.0, result["peak_memory_mb"])
    records = []
    for dataset in datasets:
        for name in defenses:
            s = sums.get((dataset, name))
            if s is None:
                continue
            n, images = s["n"], 2 * s["n"]  # each image is defended twice: clean and adversarial

            def mean(total: float) -> float | None:
                return total / n if s["has_tau"] else None

            records.append({
                "dataset": dataset,
                "attack": attack,
                "threat": threat,
                "adaptive": adaptive,
                "defense": name,
                "n": n,
                "clean_acc": 100.0 * s["correct_clean"] / n,
                "robust_acc": 100.0 * s["correct_adv"] / n,
                "mean_tau_clean": mean(s["tau_clean"]),
                "mean_tau_adv": mean(s["tau_adv"]),
                "counterattacked_clean": mean(s["ca_clean"]),
                "counterattacked_adv": mean(s["ca_adv"]),
                "forwards_per_image": s["forwards"] / images,
                "backwards_per_image": s["backwards"] / images,
                "ms_per_image": 1000.0 * s["seconds"] / images,
                "peak_memory_mb": s["peak"],
            })
    return records


def average_records(records: Sequence[dict]) -> list[dict]:
    """Per attack and defense, the mean clean and robust accuracy across datasets (the paper's "Average")."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["attack"], record["defense"]), []).append(record)
    return [
        {"attack": attack, "defense": defense, "datasets": len(rs),
         "clean_acc": sum(r["clean_acc"] for r in rs) / len(rs),
         "robust_acc": sum(r["robust_acc"] for r in rs) / len(rs)}
        for (attack, defense), rs in groups.items()
    ]
