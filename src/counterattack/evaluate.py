"""The evaluation loop of the paper's protocol, streamed batch by batch.

Adversarial images are crafted against the undefended classifier; then every defense is applied to
the same clean and the same adversarial images. Randomness is per image (see ``randomness``), so
a batch's results do not depend on how the images were batched, resumed or sharded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adversarial import AdversarialSet
from .attacks import Attack
from .attacks.base import distance, takes_start
from .classifier import ZeroShotClassifier, count_encoder_passes
from .config import ATTACK_LABELS, QUANTIZE_MODES
from .data import EvalDataset, ImageId, WithIndex, balanced_subset, short_name
from .defenses import Defense, DefenseOutput
from .errors import CounterattackError
from .gallery import Item, add_views
from .inputs import check_pixels, checked_inputs
from .precision import defense_precision, precision_context
from .randomness import ImageRandomness, key_words
from .records import BatchRecord, DefenseBatch, ImageResults


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
    quantize_adversarial: str | None = None  # "round" or "floor": adversarial images to 8 bits before any defense
    probe: int = 0  # images in this process's first batch: a long run's estimate comes within seconds
    attack_labels: str = "true"  # what the attacks are crafted against: the true labels, or the clean predictions

    def __post_init__(self) -> None:
        # A misspelt mode must not quietly run the other one: both are strings an API caller types.
        if self.attack_labels not in ATTACK_LABELS:
            raise CounterattackError(f"attack_labels must be one of {', '.join(ATTACK_LABELS)}, not "
                                     f"{self.attack_labels!r}.")
        if self.quantize_adversarial not in (None, *QUANTIZE_MODES):
            raise CounterattackError(f"quantize_adversarial must be None or one of {', '.join(QUANTIZE_MODES)}, "
                                     f"not {self.quantize_adversarial!r}.")


PROBE_IMAGES = 2


def to_8_bits(images: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """Images on the 8-bit grid k/255, as an image file holds them: ``round`` as PIL rounds (CSR's and R-TPT's
    published robust numbers defended images saved so), ``floor`` as torchvision's ``ToPILImage`` truncates
    ``x * 255`` before a PNG is written (DBD's and AGC's code). Where the clean image's pixels lie on the grid and the
    budget is a multiple of 1/255, rounding stays within the budget and may pass it by half a level elsewhere;
    truncation may pass it by up to one level."""
    if mode not in QUANTIZE_MODES:
        raise CounterattackError(f"8-bit mode must be one of {', '.join(QUANTIZE_MODES)}, not {mode!r}.")
    scaled = images * 255
    return (torch.round(scaled) if mode == "round" else torch.floor(scaled)) / 255


QUANTIZATION_SLACK = {"round": 0.5 / 255, "floor": 1 / 255}  # how far 8 bits may move an image past its budget


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


def _check_finite(what: str, values: torch.Tensor | None) -> None:
    if values is not None and not torch.isfinite(values).all():
        raise CounterattackError(f"non-finite {what} (NaN or infinity): the model's weights or the images are "
                                 "broken; the run stops before writing them (finished batches are kept)")


def _per_image(output: DefenseOutput) -> ImageResults:
    for what, values in (("logits", output.logits), ("gate scores", output.score)):
        _check_finite(what, values)
    return ImageResults(
        output.logits.argmax(-1).tolist(),
        None if output.score is None else output.score.tolist(),
        None if output.counterattacked is None else output.counterattacked.tolist(),
    )




class _Batch:
    """One batch on the device: images, labels, image ids, and each purpose's per-image random streams."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: list, keys: dict[str, torch.Tensor]):
        self.images, self.labels, self.ids, self._keys = images, labels, ids, keys

    def streams(self, purpose: str) -> ImageRandomness:
        return ImageRandomness(self._keys[purpose])


PURPOSES = ("attack", "adaptive", "defense-clean", "defense-adv")


def image_batches(data: EvalDataset, settings: RunSettings, skip: Collection[ImageId], indices: Sequence[int] | None,
             desc: str | None = None) -> Iterator[_Batch]:
    """This process's share of the chosen images not in ``skip``, batch by batch, with a progress bar.

    ``indices`` (default: the class-balanced subset of ``settings.limit``) are shared among
    ``settings.world_size`` processes, this one taking every ``world_size``-th from ``rank``.
    """
    chosen = balanced_subset(data.targets, settings.limit) if indices is None else indices
    todo = [i for i in chosen if data.image_ids[i] not in skip]
    mine = todo[settings.rank :: settings.world_size]
    if not mine:
        return
    # A probe first (a few images), then full batches: which images share a batch changes no result.
    first = settings.probe if 0 < settings.probe < min(len(mine), settings.batch_size) else settings.batch_size
    positions = range(len(mine))
    loader = DataLoader(
        WithIndex(data.dataset, mine),
        batch_sampler=[list(positions[:first])] + [list(positions[i:i + settings.batch_size])
                                                   for i in range(first, len(mine), settings.batch_size)],
        num_workers=settings.workers,
        pin_memory=settings.device.type == "cuda",
    )
    show = settings.progress and settings.rank == 0
    # Every image's random keys, once: a batch then takes its rows, with no per-image work on the host.
    keys = {purpose: key_words(settings.seed, data.randomness_key, [data.image_ids[i] for i in mine], purpose)
            for purpose in PURPOSES}
    done_here = 0  # the loader keeps the order of ``mine``: a batch is the next rows of the keys
    with tqdm(total=len(mine), desc=desc or short_name(data.name), unit="img", disable=not show, leave=False) as bar:
        for images, labels, positions in loader:
            rows = slice(done_here, done_here + len(positions))
            done_here += len(positions)
            yield _Batch(images.to(settings.device, non_blocking=True), labels.to(settings.device, non_blocking=True),
                         [data.image_ids[i] for i in positions.tolist()], {p: k[rows] for p, k in keys.items()})
            bar.update(len(positions))


def attack_targets(classifier: ZeroShotClassifier, batch: _Batch, settings: RunSettings) -> torch.Tensor:
    """The labels the attacks are crafted against: the true ones, or (pseudo-label attacks, DBD's ``--disable_gt``)
    the undefended model's clean predictions, so a defense cannot read the answer off the perturbation."""
    if settings.attack_labels == "true":
        return batch.labels
    with torch.no_grad(), precision_context(settings.device, settings.attack_precision), checked_inputs():
        return classifier.logits(batch.images).argmax(-1)


def craft_dataset(
    classifier: ZeroShotClassifier,
    data: EvalDataset,
    attacks: Sequence[Attack],
    settings: RunSettings,
    skip: Collection[ImageId] = (),
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[list, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(ids, labels, attack targets, {attack: adversarial images})`` per batch: the paper protocol's attacks,
    crafted against the undefended classifier with the same random streams ``evaluate_dataset`` uses,
    so an evaluation of the stored images equals a direct one."""
    batches = image_batches(data, settings, skip, indices, desc=f"attack {short_name(data.name)}")
    for batch in batches:
        targets = attack_targets(classifier, batch, settings)
        with precision_context(settings.device, settings.attack_precision), checked_inputs():
            crafted = {attack.name: _as_defenses_see(attack(classifier, batch.images, targets, batch.streams("attack")),
                                                     settings)
                       for attack in attacks}
        for name, images in crafted.items():
            _check_finite(f"{name} images", images)
        yield batch.ids, batch.labels, targets, crafted


def _as_defenses_see(adversarial: torch.Tensor, settings: RunSettings) -> torch.Tensor:
    mode = settings.quantize_adversarial
    return adversarial.float() if mode is None else to_8_bits(adversarial.float(), mode)


def evaluate_dataset(
    classifier: ZeroShotClassifier,
    data: EvalDataset,
    attacks: Sequence[Attack],
    defenses: Sequence[Defense] | Mapping[str, Defense],
    settings: RunSettings,
    skip: Collection[ImageId] = (),
    adaptive_attacks: Callable[[Attack, Defense], Mapping[str, Attack]] | None = None,
    indices: Sequence[int] | None = None,
    adversarial: AdversarialSet | None = None,
    gallery: Collection[ImageId] = (),
    keep: Callable[[str, list[Item]], None] | None = None,
) -> Iterator[BatchRecord]:
    """Yield one result per batch: per-image predictions and gate scores of every defense under every attack, and
    costs.

    Under the paper's protocol each attack is crafted once, against the undefended model, for all
    defenses; ``adaptive_attacks(attack, defense)`` gives each defense its own attacks besides (adaptive attacks,
    by component name: exact, bpda). Then the defense is judged on every component's images, with the same draws,
    and an image counts as robust only if it survives them all: an adaptive attack starts from the transfer attack's
    images, and keeping its own best iterate under its own draws must never make it look weaker than
    the transfer attack (the record keeps every component). The attacks are crafted against
    ``settings.attack_labels``; accuracy is always the true labels'. With ``adversarial``, the attacks'
    images are read from that stored set instead of crafted. ``defenses`` may be a mapping from the
    name results are recorded under to the defense (a sweep's settings of one defense). ``indices``
    and ``skip`` choose the images as in ``image_batches``. The images of ``gallery`` (ids) are handed to
    ``keep(dataset, items)`` with every defense's views, before their batch is yielded.
    """
    components = adaptive_attacks or (lambda attack, defense: {})
    named = defenses if isinstance(defenses, Mapping) else {d.name: d for d in defenses}

    def timed(attack: Attack, batch: _Batch, images: torch.Tensor, targets: torch.Tensor, purpose: str,
              **start: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``attack``'s images of ``batch`` and the seconds it took (``images``: the batch's, already checked)."""
        with (_Stopwatch(settings.device) as watch, precision_context(settings.device, settings.attack_precision),
              checked_inputs()):
            adversarial_images = attack(classifier, images, targets, batch.streams(purpose), **start)
        return _as_defenses_see(adversarial_images, settings), watch.seconds

    for batch in image_batches(data, settings, skip, indices):
        images, ids = check_pixels(batch.images), batch.ids
        transfer: dict[str, tuple[torch.Tensor, float]] = {}  # each attack's images against the undefended model
        if adversarial is None:
            targets = attack_targets(classifier, batch, settings)
        else:
            if adversarial.labels(data.name, ids) != batch.labels.tolist():
                raise CounterattackError(f"{adversarial.folder} stores other labels for images of {data.name} than the "
                                         "dataset has now: the set was made from other files.")
            targets = adversarial.targets(data.name, ids, images.device)
            transfer = {attack.name: (_as_defenses_see(_stored(adversarial, data.name, ids, attack, images), settings),
                                      0.0)
                        for attack in attacks}
        record = BatchRecord(data.name, ids, batch.labels.tolist(), {},
                             None if settings.attack_labels == "true" else targets.tolist())
        kept = {row: Item(data.name, image_id, int(batch.labels[row]), images[row])
                for row, image_id in enumerate(ids) if image_id in gallery}
        # Many defenses (a sweep's settings) take long per batch: a bar over them says where the batch is.
        shown = settings.progress and settings.rank == 0 and len(named) > 8
        for name, defense in tqdm(named.items(), desc="settings", unit="setting", leave=False, disable=not shown):
            inputs: dict[str, dict[str, tuple[torch.Tensor, float]]] = {}  # attack -> component -> (images, seconds)
            for attack in attacks:
                if attack.name not in transfer:  # the paper's protocol crafts once for all defenses
                    transfer[attack.name] = timed(attack, batch, images, targets, "attack")
                inputs[attack.name] = {"transfer": transfer[attack.name]}
                for part, through in components(attack, defense).items():
                    start = {"start": transfer[attack.name][0]} if takes_start(through) else {}
                    inputs[attack.name][part] = timed(through, batch, images, targets, "adaptive", **start)
            with (_Stopwatch(settings.device) as cost, count_encoder_passes() as passes, checked_inputs(),
                  precision_context(settings.device, defense_precision(settings.defense_precision, defense))):
                # Every defense draws the same noise for an image, so their results (and an attack's components)
                # pair up.
                clean = defense(classifier, images, batch.streams("defense-clean"))
                raw = {attack: {part: defense(classifier, adversarial_images, batch.streams("defense-adv"))
                                for part, (adversarial_images, _) in parts.items()}
                       for attack, parts in inputs.items()}
            outputs = {attack: {part: _per_image(output) for part, output in parts.items()}
                       for attack, parts in raw.items()}
            if kept:
                with torch.no_grad(), checked_inputs():
                    add_views(kept, name, defense.gate is not None, batch.labels, images, clean, raw,
                              {a: {p: adv for p, (adv, _) in parts.items()} for a, parts in inputs.items()},
                              classifier.logits)
            record.defenses[name] = DefenseBatch(
                gate_score=None if defense.gate is None else defense.gate.score,
                clean=_per_image(clean),
                adv={attack: parts["transfer"] if len(parts) == 1 else worst_of(parts, record.labels)
                     for attack, parts in outputs.items()},
                forwards=passes.forwards,
                backwards=passes.backwards,
                defended_images=len(ids) * (1 + sum(len(parts) for parts in outputs.values())),
                seconds=cost.seconds,
                peak_memory_mb=cost.peak_memory_mb,
                attack_seconds={attack: sum(seconds for _, seconds in parts.values())
                                for attack, parts in inputs.items()},
            )
        if kept and keep is not None:
            keep(data.name, list(kept.values()))
        yield record


def _stored(adversarial: AdversarialSet, dataset: str, ids: list, attack: Attack, clean: torch.Tensor) -> torch.Tensor:
    """A stored set's images of ``attack``, refused (naming the shard) unless each lies in the box and within the
    attack's recorded budget of its clean image: a damaged or foreign shard must not pass for that attack."""
    stored = adversarial.images(dataset, ids, attack.name, clean.device)
    slack = 1e-6 + QUANTIZATION_SLACK.get(adversarial.config.quantize_adversarial, 0.0)
    eps = getattr(attack, "eps", None)  # an attack without a budget: the box alone is checked
    beyond = distance(attack.norm, stored - clean) - (eps if eps is not None else float("inf"))
    outside = ~torch.isfinite(stored).flatten(1).all(dim=1) | (stored.flatten(1).amin(dim=1) < -1e-6) \
        | (stored.flatten(1).amax(dim=1) > 1 + 1e-6) | (beyond > slack)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise CounterattackError(
            f"{adversarial.shard_of(dataset, ids[i])}: image {ids[i]!r} of {dataset} is not a {attack.name} image"
            + (f" of budget {eps * 255:g}/255 of its clean image (it lies {float(beyond[i]) * 255:.3g}/255 beyond it, "
               "or outside [0, 1])" if eps is not None else " (it is not finite, or outside [0, 1])")
            + ": the shard is damaged or was made from other images. Move it out of the folder and run the same "
            "`counterattack attack` again to craft its images anew.")
    return stored


def worst_of(components: Mapping[str, ImageResults], labels: Sequence[int]) -> ImageResults:
    """Per image, the results under the first component (attack) the defense fails, else under the last: an image
    is robust only if it survives all of them. The components' own results are kept under ``components``."""
    names = list(components)
    chosen = [components[next((c for c in names if components[c].pred[i] != label), names[-1])]
              for i, label in enumerate(labels)]

    def merged(key: str) -> list | None:
        if getattr(components[names[0]], key) is None:
            return None
        return [getattr(part, key)[i] for i, part in enumerate(chosen)]

    return ImageResults(merged("pred"), merged("score"), merged("counterattacked"), dict(components))
