"""``counterattack reproduce NAME``: one published table, run as a preset of ``eval`` and compared with the table.

A preset (``presets.PRESETS``) fixes the table's datasets, defenses, attacks and budget; the run goes
through ``eval``'s own code path (the same resume, the same torchrun), once per backbone, and ends
with ``comparison.md/.csv/.json/.png`` beside the results. ``--list`` shows every preset with what it
costs: its images, the encoder passes an image takes and an estimated time on this machine and
device, measured from a short warm-up of the real pipeline on random images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..attacks import build_attacks
from ..backbones import load_clip
from ..classifier import ImageEncoder, ZeroShotClassifier, count_encoder_passes
from ..compare import compare_results, write_comparison
from ..config import AttackConfig, DefenseConfig, RunConfig
from ..data import DATASETS, EvalDataset, class_prompts, is_present
from ..defenses import build_defenses
from ..distributed import ProcessGroup
from ..errors import CounterattackError
from ..evaluate import RunSettings, evaluate_dataset
from ..loading import LoadedCLIP
from ..presets import PRESETS, Preset
from ..published import load_published
from ..stats import duration
from . import eval as eval_command
from .context import open_run

WARM_UP_IMAGES = 2  # per timed batch on a CPU (a GPU times a whole batch): enough to time, cheap to run
WARM_UP_SIDE = 224  # the registry datasets' images: the paper's Resize 256 + CenterCrop 224


def preset_of(name: str) -> Preset:
    if name not in PRESETS:
        raise CounterattackError(f"Unknown preset {name!r}. Presets: {', '.join(PRESETS)} "
                                 "(see `counterattack reproduce --list`).")
    return PRESETS[name]


def _checkpoints(preset: Preset, config: RunConfig) -> dict[str, Path | None]:
    """Each backbone's vision weights (None: the model's own), refusing a fine-tuned one that was not given."""
    given = dict(config.study.checkpoints)
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
                            precision=config.attack.precision),
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

    return LoadedCLIP.from_model(open_clip.create_model(name, pretrained=None).to(device),
                                 open_clip.get_tokenizer(name), f"{name} (random weights, for timing)")


@dataclass
class Estimate:
    images: int  # every image of every dataset (and backbone) the preset runs
    passes_per_image: float  # image-encoder forwards and backwards: the attacks' and every defense's
    seconds_per_image: float
    setup_seconds: float  # loading the model, and the text embeddings of every dataset's prompts

    @property
    def seconds(self) -> float:
        return self.setup_seconds + self.images * self.seconds_per_image


def estimate(preset: Preset, config: RunConfig, clip: LoadedCLIP, load_seconds: float,
             device: torch.device) -> Estimate:
    """Time one batch of the real evaluation (the preset's attacks, then every defense on clean and adversarial
    images) after a warm-up batch, on random images labelled as the model classifies them (so that every image is
    attacked in full, as a correctly classified one is); scale to the preset's images, and add the model's loading
    and each dataset's text embeddings at the measured time per prompt."""
    batch = config.run.batch_size if device.type == "cuda" else min(config.run.batch_size, WARM_UP_IMAGES)
    classes = [f"class {i}" for i in range(10)]
    start = time.perf_counter()
    classifier = ZeroShotClassifier.from_clip(clip, classes)
    per_prompt = (time.perf_counter() - start) / len(classes)
    images = _RandomImages(2 * batch, len(classes))
    with torch.no_grad():
        images.labels = classifier.logits(images.images.to(device)).argmax(-1).tolist()
    data = EvalDataset("warm-up", images, classes, images.labels, list(range(2 * batch)), "random", "warm-up")
    # A fine-tuned backbone's TTC measures tau on the original encoder: two more forwards per image.
    defenses = build_defenses(preset.defenses)
    if preset.checkpoint_flags:
        defenses = [d.with_score_encoder(ImageEncoder.from_clip(clip)) for d in defenses]
    attacks = build_attacks(preset.attacks, preset.attack_settings)
    settings = RunSettings(config.run.seed, None, batch, 0, device, False, attack_precision=config.precisions["attack"],
                           defense_precision=config.precisions["defense"])
    evaluation = evaluate_dataset(classifier, data, attacks, defenses, settings)
    next(evaluation)  # the warm-up batch: lazy initialisation and caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with count_encoder_passes() as passes:
        next(evaluation)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / batch
    limit = config.data.limit
    count = len(preset.backbones) * sum(min(limit or DATASETS[d].test_size, DATASETS[d].test_size)
                                        for d in preset.datasets)
    prompts = sum(len(names) * len(templates) for names, templates in (class_prompts(d, config.model.prompts)
                                                                       for d in preset.datasets))
    setup = len(preset.backbones) * (load_seconds + per_prompt * prompts)
    return Estimate(count, (passes.forwards + passes.backwards) / batch, seconds, setup)


def list_presets(config: RunConfig, device: torch.device) -> dict[str, Estimate]:
    start = time.perf_counter()
    clip = _timing_model(config, device)
    load_seconds = time.perf_counter() - start
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    limited = "" if config.data.limit is None else f" (--limit {config.data.limit} per dataset)"
    print(f"Presets of `counterattack reproduce`; times are ESTIMATES for {clip.description} on this machine's "
          f"{where}, precision {config.run.precision}, measured from one warm-up batch of the real pipeline on random "
          f"images and scaled to every image{limited}.")
    estimates = {}
    for name, preset in PRESETS.items():
        found = estimates[name] = estimate(preset, config, clip, load_seconds, device)
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
