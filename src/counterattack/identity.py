"""A run's identity: how its description (``records.RunDescription``) is made from what it loaded.

The description is what config.json, every parts file and shard, and results.json hold of a run: the weights (by
content), the images (each dataset's identity by content), the prompts, the attacks, the defenses, the threat,
precision and seed. Its hash guards resumption and binds every stored batch to its run; ``run`` holds what changes
no number (batch size, device, where things were read from, versions) and stays out of the hash. An adversarial set
is described by the same record without defenses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import __version__


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
