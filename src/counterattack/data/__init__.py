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

IMAGEFOLDER_PREFIX = "imagefolder:"


def paper_transform() -> transforms.Compose:
    """The paper's test transform: Resize(256) -> CenterCrop(224) -> [0, 1] tensor (no normalisation)."""
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])


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


def _cifar10(data_root: Path, clip: LoadedCLIP, download: bool) -> EvalDataset:
    try:
        ds = datasets.CIFAR10(str(data_root), train=False, transform=paper_transform(), download=download)
    except Exception as exc:  # torchvision raises RuntimeError, URLError or OSError here
        raise CounterattackError(
            f"CIFAR-10 is not under {data_root} and could not be downloaded ({exc}). With internet it is "
            "downloaded automatically; otherwise fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
            f"and extract it into {data_root} (giving {data_root}/cifar-10-batches-py/)."
        ) from exc
    return EvalDataset("cifar10", ds, list(ds.classes), list(ds.targets))


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


DATASETS: dict[str, Callable[[Path, LoadedCLIP, bool], EvalDataset]] = {"cifar10": _cifar10}


def load_dataset(spec: str, clip: LoadedCLIP, data_root: str | Path = "data", download: bool = True) -> EvalDataset:
    """A registered dataset's test split by name, or ``imagefolder:DIR``."""
    if spec.startswith(IMAGEFOLDER_PREFIX):
        return _imagefolder(Path(spec[len(IMAGEFOLDER_PREFIX) :]).expanduser(), clip)
    if spec not in DATASETS:
        raise CounterattackError(
            f"Unknown dataset {spec!r}. Available: {', '.join(DATASETS)}, or imagefolder:DIR."
        )
    return DATASETS[spec](Path(data_root).expanduser(), clip, download)


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
