"""``counterattack reproduce NAME``: one published table, run as a preset of ``eval`` and compared with the table.

A preset (``presets.PRESETS``) fixes the table's datasets, defenses, attacks and budget; the run goes
through ``eval``'s own code path (the same resume, the same torchrun), once per backbone, and ends
with ``comparison.md/.csv/.json/.png`` beside the results. ``--list`` shows every preset with what it
costs: its images, the encoder passes an image takes and an estimated time on this machine and
device, composed from each attack step's and defense's cost measured once on random images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tqdm.auto import tqdm

from ..attacks import PGD, Attack, build_attacks
from ..backbones import load_clip
from ..classifier import ImageEncoder, ZeroShotClassifier, count_encoder_passes
from ..compare import compare_results
from ..compare_files import write_comparison
from ..config import AttackConfig, DefenseConfig, RunConfig
from ..data import DATASETS, class_prompts, is_present
from ..defenses import Defense, build_defenses
from ..descriptions import for_run
from ..distributed import ProcessGroup
from ..errors import CounterattackError
from ..inputs import checked_inputs
from ..loading import LoadedCLIP
from ..precision import defense_precision, precision_context
from ..randomness import ImageRandomness
from ..presets import PRESETS, Preset
from ..published import load_published
from ..stats import duration
from . import eval as eval_command
from .context import open_run

log = logging.getLogger(__name__)
WARM_UP_IMAGES = 1  # per timed batch on a CPU (a GPU times a whole batch): enough to time, cheap to run
TIMING_CLASSES = 2  # a defense's text side is set-up (timed per prompt), not a cost per image: keep it small
WARM_UP_SIDE = 224  # the registry datasets' images: the paper's Resize 256 + CenterCrop 224


def preset_of(name: str) -> Preset:
    if name not in PRESETS:
        raise CounterattackError(f"Unknown preset {name!r}. Presets: {', '.join(PRESETS)} "
                                 "(see `counterattack reproduce --list`).")
    return PRESETS[name]


def _checkpoints(preset: Preset, config: RunConfig) -> dict[str, Path | None]:
    """Each backbone's vision weights (None: the model's own), refusing a fine-tuned one that was not given."""
    given = dict(config.study.checkpoints)
    for unused in sorted(set(given) - set(preset.backbones)):
        log.warning("--%s-checkpoint is not used: %s runs the %s backbone(s)", unused, preset.name,
                    ", ".join(preset.backbones))
    for backbone, flag in preset.checkpoint_flags.items():
        if backbone not in given:
            raise CounterattackError(f"{preset.name} runs TTC on the {backbone} vision tower: give its weights with "
                                     f"{flag} FILE (the authors' ViT-B/32 checkpoint, safetensors or a plain state "
                                     "dict).")
        if not Path(given[backbone]).expanduser().is_file():  # before the first backbone's hours, not after
            raise CounterattackError(f"{flag} {given[backbone]}: no such file.")
    return {backbone: given.get(backbone) for backbone in preset.backbones}


def _datasets(preset: Preset, config: RunConfig, is_main: bool) -> tuple[str, ...]:
    """The preset's datasets that will run: all of them, downloading what torchvision can fetch, unless a dataset
    must be fetched by hand; with ``--skip-missing``, only those already under ``--data-root``."""
    root = config.data.root
    missing = [DATASETS[name] for name in preset.datasets if not is_present(DATASETS[name], root)]
    if config.study.skip_missing:
        if missing and is_main:
            print(f"skipping {len(missing)} dataset(s) not under {root}: "
                  + " ".join(f"{info.name} ({info.how_to_get})." for info in missing))
        running = tuple(name for name in preset.datasets if name not in {info.name for info in missing})
        if not running:
            raise CounterattackError(f"none of {preset.name}'s datasets is under {root}: "
                                     + " ".join(f"{info.name}: {info.how_to_get}." for info in missing))
        return running
    manual = [info for info in missing if not info.downloadable]
    if manual:
        raise CounterattackError(
            f"{preset.name} needs {', '.join(info.name for info in manual)}, not under {root} and not downloadable "
            f"automatically. " + " ".join(f"{info.name}: {info.how_to_get}." for info in manual)
            + " Or pass --skip-missing to run the datasets that are there.")
    fetched = [info.name for info in missing]
    if fetched and is_main:
        print(f"will download {len(fetched)} dataset(s) into {root} first: {', '.join(fetched)}")
    return preset.datasets


def preset_config(config: RunConfig, preset: Preset, backbone: str, checkpoint: Path | None,
                  datasets: tuple[str, ...]) -> RunConfig:
    """The evaluation a preset runs for one backbone: the table's datasets, defenses and attacks; the rest as given."""
    fine_tuned = backbone != "openai"
    return replace(
        config,
        model=replace(config.model, vision_checkpoint=checkpoint, backbone=backbone if fine_tuned else None),
        data=replace(config.data, datasets=datasets),
        attack=AttackConfig(names=preset.attacks, given=True, settings=preset.attack_settings,
                            precision=config.attack.precision, quantize=preset.quantize),
        defense=DefenseConfig(names=preset.defenses, precision=config.defense.precision),
        out=config.out / backbone if len(preset.backbones) > 1 else config.out,
    )


def _summarize_comparison(results: dict, folder: Path) -> str:
    comparison = compare_results(results, load_published())
    inside = sum(1 for row in comparison.rows if row.robust_inside)
    return (f"{len(comparison.rows)} robust accuracies compared with published ones ({inside} inside our 95% "
            f"interval), {len(comparison.unmatched)} record(s) without a published twin: {folder / 'comparison.md'}")


def reproduce(config: RunConfig, group: ProcessGroup, device: torch.device) -> list[dict]:
    preset = preset_of(config.study.preset)
    checkpoints = _checkpoints(preset, config)
    if config.model.descriptions is None:  # a defense that needs them is refused before any dataset is looked at
        for_run(None, (), build_defenses(preset.defenses))
    load_published()  # a damaged package is found before the run, not after it
    datasets = _datasets(preset, config, group.is_main)
    results = []
    for backbone, checkpoint in checkpoints.items():
        run_config = preset_config(config, preset, backbone, checkpoint, datasets)
        if group.is_main:
            print(f"\n{preset.title} ({backbone}): {len(datasets)} dataset(s) into {run_config.out}")
        outcome = eval_command.evaluate(open_run(run_config, group, device))
        if outcome is not None:
            results.append(outcome)
            write_comparison(run_config.out)
            print(_summarize_comparison(outcome, run_config.out))
    return results


# --- --list: what each preset costs -----------------------------------------------------------------


class _RandomImages(Dataset):
    """Seeded random images of the registry datasets' size, for timing the pipeline without data."""

    def __init__(self, count: int, classes: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(count, 3, WARM_UP_SIDE, WARM_UP_SIDE, generator=generator)
        self.labels = [i % classes for i in range(count)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


def _timing_model(config: RunConfig, device: torch.device) -> LoadedCLIP:
    """The model to time: a built-in architecture with random weights (its cost is the architecture's; nothing is
    downloaded), or the model folder itself."""
    name = config.model.name
    if ":" in name:
        return load_clip(name, config.model.pretrained, device=device)
    import open_clip

    quiet = logging.getLogger()  # open_clip warns on the root logger that no weights were loaded: that is the point
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=None)
    finally:
        quiet.setLevel(level)
    return LoadedCLIP.from_model(model.to(device), open_clip.get_tokenizer(name),
                                 f"{name} (random weights, for timing)")


@dataclass
class Estimate:
    images: int  # every image of every dataset (and backbone) the preset runs
    passes_per_image: float  # image-encoder forwards and backwards: the attacks' and every defense's
    seconds_per_image: float
    setup_seconds: float  # loading the model, and the text embeddings of every dataset's prompts

    @property
    def seconds(self) -> float:
        return self.setup_seconds + self.images * self.seconds_per_image


class _Timer:
    """Seconds and encoder passes per image of each piece of the presets' pipeline, each measured once on the timing
    model (a batch of ``WARM_UP_IMAGES`` random images on a CPU, labelled as the model classifies them, so every image
    is attacked in full), each after a warm-up pass of its own (caches, lazy set-up and a defense's text side, such as
    COLA's prompts, are not costs per image): an attack step (forward and backward), and each defense. A preset's
    cost is then composed of its pieces, so listing every preset takes about a minute, not one full pipeline each."""

    def __init__(self, clip: LoadedCLIP, config: RunConfig, device: torch.device):
        batch = config.run.batch_size if device.type == "cuda" else min(config.run.batch_size, WARM_UP_IMAGES)
        classes = [f"class {i}" for i in range(TIMING_CLASSES)]
        start = time.perf_counter()
        self.classifier = ZeroShotClassifier.from_clip(clip, classes)
        self.per_prompt = (time.perf_counter() - start) / len(classes)
        self.images = _RandomImages(batch, len(classes)).images.to(device)
        self.clip, self.config, self.device = clip, config, device
        with torch.no_grad():
            self.labels = self.classifier.logits(self.images).argmax(-1)
        self.rng = ImageRandomness.from_seed(config.run.seed, batch, "timing")
        self._defenses: dict[tuple, tuple[float, float]] = {}
        self._timed(lambda: PGD(steps=1)(self.classifier, self.images, self.labels, self.rng),
                    config.precisions["attack"])  # the warm-up: lazy initialisation and caches
        self.step = self._timed(lambda: PGD(steps=1)(self.classifier, self.images, self.labels, self.rng),
                                config.precisions["attack"])

    def _timed(self, work, precision: str) -> tuple[float, float]:
        """``(seconds, encoder passes)`` per image of ``work()`` on the batch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with count_encoder_passes() as passes, precision_context(self.device, precision), checked_inputs():
            work()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        n = len(self.images)
        return (time.perf_counter() - start) / n, (passes.forwards + passes.backwards) / n

    def attack(self, attack: Attack) -> tuple[float, float]:
        """An attack's steps at the measured cost of one PGD step: an APGD iteration is one forward and one backward
        too, and AutoAttack runs one APGD per sub-attack (its early stops make this an upper bound)."""
        runs = len(attack.attacks_for(10)) if hasattr(attack, "attacks_for") else 1
        return tuple(runs * attack.steps * value for value in self.step)

    def defense(self, defense: Defense) -> tuple[float, float]:
        key = (defense.name, repr(defense.describe()))
        if key not in self._defenses:
            if defense.reads_descriptions != "no":  # as many sentences as it reads, of a class description's size
                self.classifier.descriptions = {c: [f"{c}, seen in photograph number {i}." for i in
                                                    range(defense.descriptions_needed)]
                                                for c in self.classifier.class_names}
            precision = defense_precision(self.config.precisions["defense"], defense)
            defenses_log = logging.getLogger("counterattack.defenses")  # warnings about the timing's 2 classes
            level = defenses_log.level
            defenses_log.setLevel(logging.ERROR)
            try:
                self._timed(lambda: defense(self.classifier, self.images, self.rng), precision)  # the warm-up
            finally:
                defenses_log.setLevel(level)
            self._defenses[key] = self._timed(lambda: defense(self.classifier, self.images, self.rng), precision)
        return self._defenses[key]


def estimate(preset: Preset, config: RunConfig, timer: _Timer, load_seconds: float) -> Estimate:
    """A preset's cost from its pieces' measured costs: per image, each attack's, and each defense's on the clean and
    on every attack's images; scaled to the preset's images, plus loading the model and each dataset's text
    embeddings at the measured time per prompt."""
    defenses = build_defenses(preset.defenses)
    if preset.checkpoint_flags:  # a fine-tuned backbone's TTC measures tau on the original encoder
        defenses = [d.with_score_encoder(ImageEncoder.from_clip(timer.clip)) for d in defenses]
    attacks = build_attacks(preset.attacks, preset.attack_settings)
    pieces = [timer.attack(a) for a in attacks] + [timer.defense(d) for d in defenses for _ in range(1 + len(attacks))]
    seconds, passes = (sum(piece[i] for piece in pieces) for i in (0, 1))
    limit = config.data.limit
    count = len(preset.backbones) * sum(min(limit or DATASETS[d].test_size, DATASETS[d].test_size)
                                        for d in preset.datasets)
    # Each dataset's prompts, and the text sides of the defenses that read class descriptions (COLA's 50 a class).
    per_class = sum(d.descriptions_needed + 1 for d in defenses if d.reads_descriptions != "no")
    prompts = sum(len(names) * (len(templates) + per_class) for names, templates in
                  (class_prompts(d, config.model.prompts) for d in preset.datasets))
    setup = len(preset.backbones) * (load_seconds + timer.per_prompt * prompts)
    return Estimate(count, passes, seconds, setup)


def list_presets(config: RunConfig, device: torch.device) -> dict[str, Estimate]:
    start = time.perf_counter()
    clip = _timing_model(config, device)
    load_seconds = time.perf_counter() - start
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    limited = "" if config.data.limit is None else f" (--limit {config.data.limit} per dataset)"
    print(f"Presets of `counterattack reproduce`; times are ESTIMATES for {clip.description} on this machine's "
          f"{where}, precision {config.run.precision}, composed from each attack step's and defense's measured cost on "
          f"random images, scaled to every image{limited}.")
    timer = _Timer(clip, config, device)
    estimates = {}
    for name, preset in tqdm(PRESETS.items(), desc="timing the presets' pieces", unit="preset", leave=False,
                             disable=not config.run.progress):
        found = estimates[name] = estimate(preset, config, timer, load_seconds)
        checkpoints = f"; needs {', '.join(f'{f} FILE' for f in preset.checkpoint_flags.values())}" \
            if preset.checkpoint_flags else ""
        print(f"\n{name}: {preset.title}\n"
              f"  datasets ({len(preset.datasets)}): {', '.join(preset.datasets)}\n"
              f"  defenses: {', '.join(preset.defenses)}; attacks: {preset.describe_attacks()}; backbones: "
              f"{', '.join(preset.backbones)}{checkpoints}\n"
              f"  {found.images:,} images, {found.passes_per_image:.0f} encoder passes each (forwards + backwards); "
              f"estimated {found.seconds_per_image:.2f} s per image, {duration(found.seconds)} in all")
    return estimates


def run(config: RunConfig, group: ProcessGroup, device: torch.device) -> list[dict] | dict[str, Estimate]:
    if config.study.preset is None:
        return list_presets(config, device)
    return reproduce(config, group, device)
