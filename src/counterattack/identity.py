"""A run's identity: how its description (``records.RunDescription``) is made from what it loaded.

The description is what config.json, every parts file and shard, and results.json hold of a run: the weights (by
content), the images (each dataset's identity by content), the prompts, the attacks, the defenses, the threat,
precision and seed. Its hash guards resumption and binds every stored batch to its run; ``run`` holds what changes
no number (batch size, device, where things were read from, versions) and stays out of the hash. An adversarial set
is described by the same record without defenses. Every command describes its run through these functions, from
its ``RunContext``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from . import __version__
from .adaptive import AdaptiveAttack
from .attacks import Attack
from .defenses import Defense
from .defenses.base import ADAPTIVE_METHODS
from .options import options_of
from .precision import defense_precision
from .records import ADVERSARIAL_SET, UNITS, RunDescription

if TYPE_CHECKING:  # the context is what a command loaded; this module only reads it
    from .commands.context import RunContext


def versions() -> dict[str, str]:
    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {"clip-counterattack": __version__,
            **{pkg: installed(pkg) for pkg in ("torch", "torchvision", "open_clip_torch")}}


def described_defenses(defenses: Mapping[str, Any], dataset: str | None, precision: str,
                       resolve_precision: Any) -> list[dict]:
    """Each defense as it runs on ``dataset`` (None: as built), named as its records are, with its resolved
    precision under ``paper`` (a defense's new paper precision is a new run)."""
    resolved = {name: d if dataset is None else d.for_dataset(dataset) for name, d in defenses.items()}
    return [{**d.describe(), **({"name": name} if name != d.name else {}),
             **({"precision": resolve_precision(precision, d)} if precision == "paper" else {})}
            for name, d in resolved.items()]


def per_dataset_settings(defenses: Mapping[str, Any], datasets: Sequence[str], precision: str,
                         resolve_precision: Any) -> dict[str, list[dict]] | None:
    """Settings a defense resolves per dataset (R-TPT's augmentation, DBD's template), where they differ from the
    run's: None where every dataset runs every defense as built."""
    built = described_defenses(defenses, None, precision, resolve_precision)
    found = {name: described_defenses(defenses, name, precision, resolve_precision) for name in datasets}
    return {name: settings for name, settings in found.items() if settings != built} or None


def inputs_identity(context: RunContext) -> dict[str, Any]:
    """What the images and the classifier are: a stored adversarial set must have been made for the same."""
    model, data = context.config.model, context.config.data
    return {
        **context.weights,
        **({"backbone": model.backbone} if model.backbone else {}),
        "prompts": model.prompts,
        "templates": list(model.templates) if model.templates else None,  # None: each dataset's own
        "transform": data.transform,
        "datasets": [s.data.describe() for s in context.selections],
        "limit": data.limit,
        "skip_unreadable": data.skip_unreadable,
    }


def run_record(context: RunContext) -> dict[str, Any]:
    """Settings that change no result: a resumed run may differ in them."""
    return {"batch_size": context.config.run.batch_size, "device": str(context.device),
            "processes": context.group.world_size, "data_root": str(context.config.data.root),
            "weights_from": context.weights_location,
            **({"tau_weights_from": context.tau_location} if context.tau_location else {}), "versions": versions()}


def batch_composition(context: RunContext, attacks: Sequence[Attack]) -> dict[str, Any] | None:
    """Attacks seeded per batch make results depend on which images share one: record what did."""
    if any(getattr(a, "seeded_per_batch", False) for a in attacks):
        return {"batch_size": context.config.run.batch_size, "processes": context.group.world_size}
    return None


def evaluation_description(context: RunContext, defenses: Mapping[str, Defense],
                           attacks: Sequence[Attack]) -> RunDescription:
    """Everything a results folder's numbers depend on (its hash guards resumption), and what does not (``run``)."""
    config = context.config
    adaptive = None
    if config.attack.threat == "adaptive":
        adaptive = {"methods": list(ADAPTIVE_METHODS),
                    **{f.name: getattr(AdaptiveAttack(None, attacks[0], **config.attack.adaptive), f.name)
                       for f in options_of(AdaptiveAttack)}}
    policy = config.precisions["defense"]
    described = RunDescription(
        **inputs_identity(context),
        tau_model=context.tau_identity,
        attacks=[attack.describe() for attack in attacks],
        threat=config.attack.threat,
        attack_labels=context.settings.attack_labels,
        adaptive=adaptive,
        defenses=described_defenses(defenses, None, policy, defense_precision),
        defenses_per_dataset=per_dataset_settings(defenses, [s.data.name for s in context.selections], policy,
                                                  defense_precision),
        precision=dict(config.precisions),
        seed=config.run.seed,
        descriptions=None if context.descriptions is None else dict(context.descriptions.digests),
        preset=config.study.preset,
        quantize_adversarial=config.attack.quantize,
        run=run_record(context),
    )
    if context.adversarial is None:
        described.batch_composition = batch_composition(context, attacks)
    else:  # the attacks' own settings are the set's
        stored = context.adversarial.config
        described.precision["attack"] = stored.precision["attack"]
        described.adversarial = {"hash": context.adversarial.hash, "seed": stored.seed}
        if stored.quantize_adversarial:  # a set stored in 8 bits is evaluated in 8 bits (its mode), flag or not
            described.quantize_adversarial = stored.quantize_adversarial
        described.run["adversarial_folder"] = str(context.adversarial.folder)  # a moved set is the same set
    return described


def adversarial_set_description(context: RunContext, attacks: Sequence[Attack]) -> RunDescription:
    """A stored adversarial set's description: the run's identity and its attacks, without defenses."""
    settings = context.settings
    return RunDescription(**inputs_identity(context), kind=ADVERSARIAL_SET, attacks=[a.describe() for a in attacks],
                          attack_labels=settings.attack_labels, precision={"attack": settings.attack_precision},
                          seed=settings.seed, quantize_adversarial=context.config.attack.quantize,
                          batch_composition=batch_composition(context, attacks), units=UNITS,
                          run=run_record(context))
