"""The checks every running command makes before anything loads: cheap, so a mistake fails in seconds, not hours in.

A stored set's attacks and the flags that cannot apply to them, a study's one dataset and one defense, an output
folder inside a dataset's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from ..adversarial import AdversarialSet
from ..attacks import ATTACKS, Attack, build_attacks
from ..config import RunConfig
from ..data import DATASETS, IMAGEFOLDER_PREFIX, short_name
from ..defenses import DEFENSES
from ..errors import CounterattackError
from ..options import flag


def stored_attacks(adversarial: AdversarialSet) -> list[Attack]:
    """The attacks a stored set was made with, rebuilt from its configuration (their names and settings)."""
    described = adversarial.config.attacks
    unknown = [d["attack"] for d in described if d["attack"] not in ATTACKS]
    if unknown:
        raise CounterattackError(f"{adversarial.folder} holds images of {', '.join(unknown)}, which this installation "
                                 f"does not have (attacks: {', '.join(ATTACKS)}).")
    built = []
    for entry in described:
        own = {f.name for f in fields(ATTACKS[entry["attack"]])}
        built += build_attacks([entry["attack"]], {entry["attack"]: {k: v for k, v in entry.items() if k in own}})
    return built


def check_stored_attacks(config: RunConfig, adversarial: AdversarialSet, attacks: Sequence[Attack]) -> None:
    """No flag may ask for what a stored set's attacks cannot be."""
    if config.attack.threat != "paper":
        raise CounterattackError("--adversarial holds images crafted against the undefended model (the paper's "
                                 "protocol); adaptive attacks are crafted through each defense and cannot be stored "
                                 "once for all.")
    shared = {"--eps": config.attack.eps, "--attack-steps": config.attack.steps,
              "--attack-step-size": config.attack.step_size, "--attack-precision": config.attack.precision}
    given = [name for name, value in shared.items() if value is not None]
    given += [flag(name, setting) for name, settings in config.attack.settings.items() for setting in settings]
    if config.attack.given and sorted(config.attack.names) != sorted(a.name for a in attacks):
        given.insert(0, f"--attack {','.join(config.attack.names)}")
    stored_bits, asked_bits = adversarial.config.quantize_adversarial, config.attack.quantize
    if stored_bits and asked_bits and asked_bits != stored_bits:
        raise CounterattackError(f"{adversarial.folder} holds images already put on the 8-bit grid by {stored_bits}; "
                                 f"--quantize-adversarial {asked_bits} cannot apply to them: drop it, or craft "
                                 f"another set with `counterattack attack --quantize-adversarial {asked_bits}`.")
    stored_labels = adversarial.config.attack_labels
    if config.attack.labels is not None and config.attack.labels != stored_labels:
        raise CounterattackError(f"{adversarial.folder} holds images crafted against the {stored_labels} labels; "
                                 f"--attack-labels {config.attack.labels} needs images crafted against the "
                                 f"{config.attack.labels} ones: `counterattack attack --attack-labels "
                                 f"{config.attack.labels}` makes such a set.")
    if given:
        raise CounterattackError(f"{adversarial.folder} holds {', '.join(a.name for a in attacks)} with their own "
                                 f"settings (see its config.json); {', '.join(given)} cannot apply to it: drop them, "
                                 "or craft another set with `counterattack attack`.")


def check_single_dataset(config: RunConfig, why: str) -> None:
    if len(config.data.datasets) != 1:
        raise CounterattackError(f"{config.command} works on one --dataset: {why}.")


def single_defense(config: RunConfig) -> str:
    """The one defense a study (sweep, calibration) judges on one stored set, checked before anything loads."""
    names = config.defense.names
    DEFENSES.check_names(names)
    if len(names) != 1:
        raise CounterattackError(f"{config.command} studies one defense; got {', '.join(names)}.")
    if config.attack.threat != "paper":
        raise CounterattackError(f"{config.command} judges every setting on one stored adversarial set (the paper's "
                                 "protocol); use `counterattack eval --threat adaptive` for adaptive attacks.")
    return names[0]


def dataset_folders(config: RunConfig) -> list[Path]:
    """The folders the run's images are read from: an image folder itself, a registry dataset's under the data root."""
    folders = []
    for spec in config.data.datasets:
        if spec.startswith(IMAGEFOLDER_PREFIX):
            folders.append(Path(spec[len(IMAGEFOLDER_PREFIX):]).expanduser())
        elif spec in DATASETS:
            folders.append(Path(config.data.root).expanduser() / DATASETS[spec].folder)
    return folders


def check_distinct_names(config: RunConfig) -> None:
    """Refuse two datasets that tables, plots and the page would name alike (two image folders ending in the same
    ``x/test``): one's histogram would overwrite the other's, and their columns could not be told apart."""
    seen: dict[str, str] = {}
    for spec in dict.fromkeys(config.data.datasets):
        resolved = (f"{IMAGEFOLDER_PREFIX}{Path(spec[len(IMAGEFOLDER_PREFIX):]).expanduser().resolve()}"
                    if spec.startswith(IMAGEFOLDER_PREFIX) else spec)
        name = short_name(resolved)
        if name in seen and seen[name] != resolved:
            raise CounterattackError(f"{seen[name]} and {resolved} would both be called {name!r} in the tables, plots "
                                     "and report of one run: run them in two runs, or give one a folder (or a "
                                     "symlink) of another name.")
        seen[name] = resolved


def check_out(config: RunConfig) -> None:
    """Refuse an output folder inside a dataset's folder: its plots and files would become images of the next run."""
    if config.out is None:
        return
    out = Path(config.out).expanduser().resolve()
    for folder in dataset_folders(config):
        folder = folder.resolve()
        if out == folder or folder in out.parents:
            raise CounterattackError(f"--out {config.out} is inside the dataset folder {folder}: what a run writes "
                                     "there would be read as images by the next one. Give a folder outside it.")
