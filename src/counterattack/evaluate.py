"""The evaluation loop of the paper's protocol, streamed batch by batch.

Adversarial images are crafted against the undefended classifier; then every defense is applied to
the same clean and the same adversarial images. Randomness is per image (see ``randomness``), so
a batch's results do not depend on how the images were batched, resumed or sharded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks import Attack
from .classifier import ZeroShotClassifier, count_encoder_passes
from .data import PAPER_AVERAGE_DATASETS, EvalDataset, ImageId, WithIndex, balanced_subset, short_name
from .defenses import Defense, DefenseOutput
from .precision import precision_context
from .randomness import ImageRandomness, key_words


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
    attack_precision: str = "fp32"  # see precision.py: the policy of the attacks' and the defenses' passes
    defense_precision: str = "fp32"


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


WORST_CASE = "worst-case"  # the attack name of the per-image worst case over every attack run


def evaluate_dataset(
    classifier: ZeroShotClassifier,
    data: EvalDataset,
    attacks: Sequence[Attack],
    defenses: Sequence[Defense],
    settings: RunSettings,
    skip: Collection[ImageId] = (),
    attack_for_defense: Callable[[Attack, Defense], Attack] | None = None,
    indices: Sequence[int] | None = None,
) -> Iterator[dict]:
    """Yield one result per batch: per-image predictions and taus of every defense under every attack, and costs.

    Under the paper's protocol each attack is crafted once, against the undefended model, for all
    defenses; ``attack_for_defense(attack, defense)`` gives each defense its own attack instead
    (adaptive attacks). ``indices`` (default: the class-balanced subset of ``settings.limit``) are
    the images to evaluate; those whose id is in ``skip`` (already done) are left out, and the rest
    are shared among ``settings.world_size`` processes, this one taking every ``world_size``-th
    from ``rank``.
    """
    attack_for = attack_for_defense or (lambda attack, defense: attack)
    chosen = balanced_subset(data.targets, settings.limit) if indices is None else indices
    todo = [i for i in chosen if data.image_ids[i] not in skip]
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
    # Every image's random keys, once: a batch then indexes them, with no per-image work on the host.
    keys = {purpose: key_words(settings.seed, data.randomness_key, [data.image_ids[i] for i in mine], purpose)
            for purpose in ("attack", "defense-clean", "defense-adv")}
    done_here = 0  # the loader keeps the order of ``mine``: a batch is the next rows of the keys
    with tqdm(total=len(mine), desc=short_name(data.name), unit="img", disable=not show, leave=False) as bar:
        for images, labels, positions in loader:
            images = images.to(settings.device, non_blocking=True)
            labels = labels.to(settings.device, non_blocking=True)
            rows = slice(done_here, done_here + len(positions))
            done_here += len(positions)
            ids = [data.image_ids[i] for i in positions.tolist()]

            def streams(purpose: str) -> ImageRandomness:
                return ImageRandomness(keys[purpose][rows])

            batch = {"dataset": data.name, "ids": ids, "labels": labels.tolist(), "defenses": {}}
            crafted: dict[int, tuple[torch.Tensor, float]] = {}
            for defense in defenses:
                adversarial_sets = {}
                for attack in attacks:
                    attack_of_defense = attack_for(attack, defense)
                    if id(attack_of_defense) not in crafted:  # the paper's protocol crafts once for all defenses
                        with _Stopwatch(settings.device) as attack_time, precision_context(settings.device, settings.attack_precision):
                            adv_images = attack_of_defense(classifier, images, labels, streams("attack")).float()
                        crafted[id(attack_of_defense)] = (adv_images, attack_time.seconds)
                    adversarial_sets[attack.name] = crafted[id(attack_of_defense)]
                with (_Stopwatch(settings.device) as cost, count_encoder_passes() as passes,
                      precision_context(settings.device, settings.defense_precision)):
                    # Every defense draws the same noise for an image, so their results pair up.
                    clean = defense(classifier, images, streams("defense-clean"))
                    adv = {name: defense(classifier, adversarial, streams("defense-adv"))
                           for name, (adversarial, _) in adversarial_sets.items()}
                batch["defenses"][defense.name] = {
                    "clean": _per_image(clean),
                    "adv": {name: _per_image(output) for name, output in adv.items()},
                    "forwards": passes.forwards,
                    "backwards": passes.backwards,
                    "defended_images": len(ids) * (1 + len(adv)),
                    "seconds": cost.seconds,
                    "peak_memory_mb": cost.peak_memory_mb,
                    "attack_seconds": {name: seconds for name, (_, seconds) in adversarial_sets.items()},
                }
            yield batch
            bar.update(len(ids))


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion, in percent (95% by default): unlike the normal
    approximation it stays inside [0, 100] and is sensible at 0 or n successes."""
    if n == 0:
        return (0.0, 100.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def summarize(
    batches: Iterable[dict], datasets: Sequence[str], defenses: Sequence[str], attacks: Sequence[str],
    threat: str = "paper", adaptive: str | None = None,
) -> list[dict]:
    """One record per dataset, attack and defense, in the given orders, from per-batch results.

    With several attacks, a ``worst-case`` record per dataset and defense follows them: an image
    counts as robust only if the defense classifies it correctly under every attack.
    """
    attack_names = list(attacks) + ([WORST_CASE] if len(attacks) > 1 else [])
    sums: dict[tuple[str, str], dict] = {}
    for batch in batches:
        labels = batch["labels"]
        for name, result in batch["defenses"].items():
            s = sums.setdefault((batch["dataset"], name), {
                "n": 0, "correct_clean": 0, "tau_clean": 0.0, "ca_clean": 0, "has_tau": False,
                "correct_adv": dict.fromkeys(attack_names, 0), "tau_adv": dict.fromkeys(attacks, 0.0),
                "ca_adv": dict.fromkeys(attacks, 0), "forwards": 0, "backwards": 0, "defended": 0,
                "seconds": 0.0, "peak": None})
            s["n"] += len(labels)
            s["correct_clean"] += sum(p == y for p, y in zip(result["clean"]["pred"], labels))
            robust_to_all = [True] * len(labels)
            for attack in attacks:
                adv = result["adv"][attack]
                correct = [p == y for p, y in zip(adv["pred"], labels)]
                s["correct_adv"][attack] += sum(correct)
                robust_to_all = [a and b for a, b in zip(robust_to_all, correct)]
                if adv["tau"] is not None:
                    s["tau_adv"][attack] += sum(adv["tau"])
                    s["ca_adv"][attack] += sum(adv["counterattacked"])
            if WORST_CASE in s["correct_adv"]:
                s["correct_adv"][WORST_CASE] += sum(robust_to_all)
            if result["clean"]["tau"] is not None:
                s["has_tau"] = True
                s["tau_clean"] += sum(result["clean"]["tau"])
                s["ca_clean"] += sum(result["clean"]["counterattacked"])
            s["forwards"] += result["forwards"]
            s["backwards"] += result["backwards"]
            s["defended"] += result["defended_images"]
            s["seconds"] += result["seconds"]
            if result["peak_memory_mb"] is not None:
                s["peak"] = max(s["peak"] or 0.0, result["peak_memory_mb"])
    records = []
    for dataset in datasets:
        for attack in attack_names:
            for name in defenses:
                s = sums.get((dataset, name))
                if s is None:
                    continue
                n = s["n"]

                def mean(total: float) -> float | None:
                    return total / n if s["has_tau"] and attack != WORST_CASE else None

                records.append({
                    "dataset": dataset,
                    "attack": attack,
                    "threat": threat,
                    "adaptive": adaptive,
                    "defense": name,
                    "n": n,
                    "clean_acc": 100.0 * s["correct_clean"] / n,
                    "robust_acc": 100.0 * s["correct_adv"][attack] / n,
                    "clean_ci95": wilson_interval(s["correct_clean"], n),
                    "robust_ci95": wilson_interval(s["correct_adv"][attack], n),
                    "mean_tau_clean": mean(s["tau_clean"]),
                    "mean_tau_adv": mean(s["tau_adv"].get(attack, 0.0)),
                    "counterattacked_clean": mean(s["ca_clean"]),
                    "counterattacked_adv": mean(s["ca_adv"].get(attack, 0)),
                    # The cost of the defense itself, over its clean and adversarial inputs.
                    "forwards_per_image": s["forwards"] / s["defended"],
                    "backwards_per_image": s["backwards"] / s["defended"],
                    "ms_per_image": 1000.0 * s["seconds"] / s["defended"],
                    "peak_memory_mb": s["peak"],
                })
    return records


def average_records(records: Sequence[dict]) -> list[dict]:
    """Per attack and defense, the mean clean and robust accuracy across datasets.

    Two scopes: ``paper``, over the datasets run that are among the TTC paper's 16 (its headline
    "Average"; Tiny ImageNet and image folders are outside it), and ``all``, over every dataset run.
    """
    averages = []
    for scope, keep in (("paper", lambda d: d in PAPER_AVERAGE_DATASETS), ("all", lambda d: True)):
        groups: dict[tuple[str, str], list[dict]] = {}
        for record in records:
            if keep(record["dataset"]):
                groups.setdefault((record["attack"], record["defense"]), []).append(record)
        averages += [
            {"scope": scope, "attack": attack, "defense": defense, "datasets": len(rs),
             "clean_acc": sum(r["clean_acc"] for r in rs) / len(rs),
             "robust_acc": sum(r["robust_acc"] for r in rs) / len(rs)}
            for (attack, defense), rs in groups.items()
        ]
    return averages
