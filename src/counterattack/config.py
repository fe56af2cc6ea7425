"""What one command runs: a frozen ``RunConfig``, built once from the command line, holding every default.

Each section groups what one part of a run needs: the model, the data, the attacks, the defenses,
how the work is executed, and a study's own settings (a sweep's grid, a calibration's target rate,
the stability experiment's noise budgets). A default lives here and nowhere else: the command line
leaves every flag it was not given unset, and ``COMMAND_DEFAULTS`` holds the few defaults that
differ between commands. Budgets are stored in [0, 1] pixel units; the command line speaks 1/255.

This module imports neither torch nor the registries, so that parsing stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
QUANTIZE_MODES = ("round", "floor")  # how adversarial images are put on the 8-bit grid (--quantize-adversarial)
ATTACK_LABELS = ("true", "predicted")  # the true labels (the papers' protocol), or the undefended model's predictions

Settings = Mapping[str, Mapping[str, Any]]  # per registered name, its options (library units)


def _frozen(settings: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    return MappingProxyType({name: MappingProxyType(dict(values)) for name, values in (settings or {}).items()})


def _proxy(values: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(values))


@dataclass(frozen=True)
class ModelConfig:
    name: str = DEFAULT_MODEL  # an open_clip name, local-dir:PATH, hf-hub:ORG/NAME or transformers:ORG/NAME|PATH
    pretrained: str = DEFAULT_PRETRAINED  # built-in names only
    vision_checkpoint: Path | None = None  # fine-tuned vision weights swapped into the vision tower
    backbone: str | None = None  # the name published tables give those weights (tecoa, fare, pmg-eps4, ...)
    tau_model: str | None = None  # "defended", another model, or None: the base model when a checkpoint is given
    tau_pretrained: str = DEFAULT_PRETRAINED
    prompts: str = "paper"  # class names and templates of the benchmark datasets
    templates: tuple[str, ...] | None = None  # None: each dataset's own
    descriptions: Path | None = None  # class descriptions (a JSON file, or a folder of one per dataset): DBD, COLA

    @property
    def pretrained_tag(self) -> str | None:
        """The pretrained tag, for built-in names only (the other schemes carry their own weights)."""
        return None if ":" in self.name else self.pretrained


@dataclass(frozen=True)
class DataConfig:
    datasets: tuple[str, ...] = ("cifar10",)  # registry names (``all`` already expanded) or imagefolder:DIR
    root: Path = Path("data")
    limit: int | None = None  # a class-balanced subset of this many images per dataset
    transform: str = "model"  # image folders: the model's own eval transform, or the paper's
    skip_unreadable: bool = False


@dataclass(frozen=True)
class AttackConfig:
    names: tuple[str, ...] = ("pgd",)
    given: bool = False  # --attack was given: a stored set must hold exactly these
    eps: float | None = None  # shared settings of every attack that has them; an attack's own wins
    steps: int | None = None
    step_size: float | None = None
    settings: Settings = field(default_factory=_frozen)  # each attack's own flags
    threat: str = "paper"  # paper: crafted against the undefended model; adaptive: through each defense
    labels: str | None = None  # true or predicted (the clean predictions); None: true, or a stored set's
    convergence_images: int = 100  # adaptive: images the masking verdict's doubled attack runs on (0: none)
    adaptive: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # AdaptiveAttack's options
    precision: str | None = None  # None: RunOptions.precision
    quantize: str | None = None  # adversarial images to 8 bits before any defense sees them: "round" (CSR's, R-TPT's
    # papers: PIL) or "floor" (DBD's and AGC's code: a PNG written by truncation); None keeps them in float

    @property
    def shared(self) -> dict[str, Any]:
        return {"eps": self.eps, "steps": self.steps, "step_size": self.step_size}


@dataclass(frozen=True)
class DefenseConfig:
    names: tuple[str, ...] = ("none", "ttc")
    settings: Settings = field(default_factory=_frozen)  # each defense's own flags
    precision: str | None = None  # None: RunOptions.precision


@dataclass(frozen=True)
class RunOptions:
    precision: str = "fp32"
    batch_size: int = 128
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # repeat the run once per seed
    device: str = "auto"
    workers: int | None = None  # None: 4, or 8 with a GPU, at most the CPU count
    progress: bool = True
    dist_timeout_minutes: float = 60.0
    gallery: int = 8  # images per dataset whose pictures a run keeps for `report --html` (0: none)


@dataclass(frozen=True)
class StudyConfig:
    grid: tuple[str, ...] = ()  # sweep: OPTION=V1,V2,... per axis
    target_fpr: float = 0.05  # calibrate: fraction of clean images the chosen threshold flags
    noise: tuple[float, ...] = (1 / 255, 4 / 255, 8 / 255, 16 / 255)  # stability: uniform noise budgets
    preset: str | None = None  # reproduce: a published table (None: list the presets)
    skip_missing: bool = False  # reproduce: run the datasets under the data root, skip the others
    checkpoints: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))  # reproduce: per backbone


@dataclass(frozen=True)
class RunConfig:
    command: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    run: RunOptions = field(default_factory=RunOptions)
    study: StudyConfig = field(default_factory=StudyConfig)
    out: Path | None = None
    adversarial: Path | None = None  # a stored set to read instead of attacking

    @property
    def precisions(self) -> dict[str, str]:
        """The precision of each part: its own setting, else the run's."""
        return {"attack": self.attack.precision or self.run.precision,
                "defense": self.defense.precision or self.run.precision}

    def for_seed(self, seed: int) -> RunConfig:
        """This run with one seed of ``--seeds``, written under ``out/seed-S``."""
        return replace(self, run=replace(self.run, seed=seed, seeds=None),
                       out=None if self.out is None else self.out / f"seed-{seed}")


# The defaults that differ between commands ("section.field": value).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "sanity": {"data.limit": 200, "defense.names": ("none",), "run.gallery": 0},
    "attack": {"defense.names": (), "run.gallery": 0},
    "sweep": {"defense.names": ("ttc",), "run.gallery": 0},
    "calibrate": {"defense.names": ("ttc",), "run.gallery": 0},
    "stability": {"defense.names": (), "run.gallery": 0},
    "reproduce": {"defense.names": ()},
}

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "attack": AttackConfig, "defense": DefenseConfig,
             "run": RunOptions, "study": StudyConfig}


def default(command: str, key: str) -> Any:
    """The default of ``section.field`` for ``command``: what a run gets when the flag is not given."""
    if key in COMMAND_DEFAULTS.get(command, {}):
        return COMMAND_DEFAULTS[command][key]
    section, name = key.split(".")
    return getattr(_SECTIONS[section](), name)


def default_out(command: str, preset: str | None) -> Path | None:
    """Where results go without ``--out``: eval's ``runs/latest``, a preset's ``runs/NAME``; else none."""
    if command == "eval":
        return Path("runs/latest")
    if command == "reproduce" and preset:
        return Path("runs") / preset
    return None


def build_config(command: str, given: Mapping[str, Any], **top: Any) -> RunConfig:
    """A ``RunConfig`` from the settings given (``section.field`` -> value; absent or None: the default)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    chosen = {**COMMAND_DEFAULTS.get(command, {}), **{k: v for k, v in given.items() if v is not None}}
    if top.get("out") is None:
        top = {**top, "out": default_out(command, chosen.get("study.preset"))}
    for key, value in chosen.items():
        section, name = key.split(".")
        frozen = {"settings": _frozen, "adaptive": _proxy, "checkpoints": _proxy}.get(name)
        sections[section][name] = frozen(value) if frozen else value
    return RunConfig(command, **{name: cls(**sections[name]) for name, cls in _SECTIONS.items()}, **top)
