"""Evaluation datasets: a registry of loaders yielding [0, 1] image tensors, labels and class names."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.transform import image_transform
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from ..errors import CounterattackError
from ..models import LoadedCLIP
from .registry import DATASETS, DatasetInfo, curated_class_names, is_present

IMAGEFOLDER_PREFIX = "imagefolder:"

__all__ = [
    "DATASETS", "DatasetInfo", "EvalDataset", "IMAGEFOLDER_PREFIX", "WithIndex", "balanced_subset", "check_manual_datasets",
    "dataset_names", "is_present", "load_dataset", "model_eval_transform", "paper_transform",
]


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB")


def paper_transform() -> transforms.Compose:
    """The paper's test transform: RGB -> Resize(256) -> CenterCrop(224) -> [0, 1] tensor (no normalisation).

    Grayscale and CMYK images (Caltech, ImageNet) are converted to RGB first.
    """
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
    ])


def model_eval_transform(clip: LoadedCLIP) -> Callable[[Any], torch.Tensor]:
    """open_clip's own eval transform for this model (resize, center crop), without the normalisation,
    which belongs to the classifier."""
    cfg = clip.preprocess_cfg
    return image_transform(
        clip.image_size,
        is_train=False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


@dataclass
class EvalDataset:
    """A test split: ``dataset[i]`` is ``(image in [0, 1], label)``; ``targets[i]`` its label."""

    name: str
    dataset: Dataset
    class_names: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)


def _imagefolder(directory: Path, clip: LoadedCLIP) -> EvalDataset:
    if not directory.is_dir():
        raise CounterattackError(f"Image folder not found: {directory}")
    try:
        ds = datasets.ImageFolder(str(directory), transform=model_eval_transform(clip))
    except (FileNotFoundError, OSError) as exc:
        raise CounterattackError(
            f"{directory} is not an image folder: expected one sub-folder per class holding images ({exc})."
        ) from exc
    names = [c.replace("_", " ") for c in ds.classes]
    return EvalDataset(f"{IMAGEFOLDER_PREFIX}{directory}", ds, names, list(ds.targets))


def dataset_names(specs: Sequence[str]) -> list[str]:
    """Expand ``all`` into every registered dataset; keep the rest (duplicates dropped)."""
    expanded = [name for spec in specs for name in (DATASETS if spec == "all" else [spec])]
    return list(dict.fromkeys(expanded))


def check_manual_datasets(specs: Sequence[str], data_root: str | Path) -> None:
    """Fail before any download when a dataset that must be fetched by hand is missing."""
    root = Path(data_root).expanduser()
    missing = [DATASETS[s] for s in specs if s in DATASETS and not DATASETS[s].downloadable and not is_present(DATASETS[s], root)]
    if missing:
        raise CounterattackError(
            f"{', '.join(i.name for i in missing)} {'is' if len(missing) == 1 else 'are'} not under {root} and cannot be "
            "downloaded automatically. " + " ".join(f"{i.name}: {i.how_to_get}." for i in missing)
        )


def load_dataset(spec: str, clip: LoadedCLIP, data_root: str | Path = "data", download: bool = True) -> EvalDataset:
    """A registered dataset's evaluation split by name, or ``imagefolder:DIR``."""
    if spec.startswith(IMAGEFOLDER_PREFIX):
        return _imagefolder(Path(spec[len(IMAGEFOLDER_PREFIX) :]).expanduser(), clip)
    if spec not in DATASETS:
        raise CounterattackError(
            f"Unknown dataset {spec!r}. Available: {', '.join(DATASETS)}, all, or imagefolder:DIR."
        )
    info = DATASETS[spec]
    root = Path(data_root).expanduser()
    check_manual_datasets([spec], root)
    try:
        ds, labels, own_names = info.load(root, paper_transform(), download and info.downloadable)
    except CounterattackError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, KeyError for bad layouts
        raise CounterattackError(
            f"Could not load {spec} from {root}: {exc}. It is {info.how_to_get}."
        ) from exc
    curated = curated_class_names().get(spec)
    names = curated if curated is not None else [info.clean_name(c) for c in own_names]
    if len(names) != info.num_classes or len(own_names) != info.num_classes:
        raise CounterattackError(
            f"{spec} under {root} has {len(own_names)} classes, expected {info.num_classes}: is it the full dataset?"
        )
    return EvalDataset(spec, ds, list(names), labels)


def balanced_subset(targets: Sequence[int], limit: int | None) -> list[int]:
    """A deterministic class-balanced subset of ``limit`` indices, in dataset order.

    With K classes it holds the first ceil(limit/K) images of each class (the last round cut to
    reach ``limit`` in class order); ``None`` keeps everything.
    """
    if limit is None or limit >= len(targets):
        return list(range(len(targets)))
    if limit <= 0:
        raise CounterattackError(f"--limit must be positive, got {limit}.")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(int(label), []).append(index)
    per_class = math.ceil(limit / len(by_class))
    rounds = [
        index
        for rank in range(per_class)
        for label in sorted(by_class)
        if rank < len(by_class[label])
        for index in [by_class[label][rank]]
    ]
    return sorted(rounds[:limit])


class WithIndex(Dataset):
    """Yields ``(image, label, index in the full dataset)``: the index seeds the image's randomness."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.subset = Subset(dataset, list(indices))
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.subset[i]
        return image, label, self.indices[i]
