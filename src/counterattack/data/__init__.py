"""Evaluation datasets: a registry of loaders yielding [0, 1] image tensors, labels and class names."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from open_clip.transform import image_transform
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from tqdm.auto import tqdm

from ..classifier import DEFAULT_TEMPLATES
from ..errors import CounterattackError
from ..fingerprints import files_content_digest
from ..loading import LoadedCLIP
from .layouts import ClassFolders
from .prompts import PROMPT_SETS, check_own_classes, class_prompts, prompt_class_indices, raw_classes
from .registry import DATASETS, DatasetInfo, is_present

IMAGEFOLDER_PREFIX = "imagefolder:"

# The datasets behind the TTC paper's headline average (Table 1), as their rows say: a dataset joins it only by
# saying so (Tiny ImageNet is evaluated there but left out of it).
PAPER_AVERAGE_DATASETS: tuple[str, ...] = tuple(name for name, info in DATASETS.items() if info.in_paper_average)

__all__ = [
    "DATASETS", "DatasetInfo", "EvalDataset", "IMAGEFOLDER_PREFIX", "ImageId", "PAPER_AVERAGE_DATASETS", "PROMPT_SETS",
    "TRANSFORMS", "WithIndex", "balanced_subset", "check_manual_datasets", "class_prompts", "dataset_names",
    "find_unreadable", "is_present", "load_dataset", "model_eval_transform", "paper_transform", "raw_classes",
    "short_name",
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


ImageId = Union[int, str]  # the dataset's own index, or an image file's path relative to its folder


@dataclass
class EvalDataset:
    """A test split: ``dataset[i]`` is ``(image in [0, 1], label)``; ``targets[i]`` its label.

    ``image_ids[i]`` is image i's stable key (results, resumption and its random streams use it):
    the torchvision dataset's own index, or for an image folder the file's path relative to the
    folder, so adding a file does not renumber the others. ``fingerprint`` identifies the content: the
    bytes of the files holding the images, with each image's id and label; ``randomness_key`` names the
    dataset in random streams, independent of where the data lies. ``files[i]`` is image i's file, where known.
    """

    name: str
    dataset: Dataset
    class_names: list[str]
    targets: list[int]
    image_ids: list[ImageId]
    fingerprint: str
    randomness_key: str
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    files: list[str] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self) -> dict:
        """The dataset's identity, as the run's configuration records it."""
        return {"name": self.name, "images": len(self), "classes": len(self.class_names),
                "fingerprint": self.fingerprint}


def _digest(lines: Iterable[str]) -> str:
    hasher = hashlib.sha256()
    for line in lines:
        hasher.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return hasher.hexdigest()[:16]


def _content_fingerprint(content: Sequence[str | Path], ids: Sequence[ImageId], targets: Sequence[int],
                         progress: bool, what: str) -> str:
    """A dataset's identity: the bytes of the files ``content`` that hold its images (hashed once per state of the
    files, fingerprints.py), then each image's id and label. Paths play no part: the same files elsewhere are the
    same dataset; other bytes behind the same names are another."""
    digest = files_content_digest(content, progress=progress, what=what)
    return _digest([f"content {digest} of {len(content)} files", *(f"{i}\t{y}" for i, y in zip(ids, targets,
                                                                                                  strict=True))])


def _names_and_sizes_digest(ids: Sequence[ImageId], files: Sequence[str], targets: Sequence[int]) -> str:
    """An image folder's former identity, its files' names and sizes: now only its random streams' key, which
    published numbers were drawn with (a same-size swap of two images does not change it, the identity does)."""
    return _digest(f"{i}\t{os.path.getsize(f)}\t{y}" for i, f, y in zip(ids, files, targets, strict=True))


def _prompt_key(name: str) -> str:
    """A class name as the text encoder sees it: tokenizers lower-case it and collapse whitespace."""
    return " ".join(name.replace("_", " ").split()).casefold()


TRANSFORMS = ("model", "paper")


def _imagefolder(directory: Path, clip: LoadedCLIP, transform: str, progress: bool) -> EvalDataset:
    directory = directory.resolve()
    if not directory.is_dir():
        raise CounterattackError(f"Image folder not found: {directory}")
    try:
        ds = ClassFolders(str(directory),
                          transform=model_eval_transform(clip) if transform == "model" else paper_transform())
    except (FileNotFoundError, OSError) as exc:
        raise CounterattackError(
            f"{directory} is not an image folder: expected one sub-folder per class holding images ({exc})."
        ) from exc
    names = [c.replace("_", " ") for c in ds.classes]
    if len(names) < 2:  # every image would be "correct", clean and adversarial alike
        raise CounterattackError(f"{directory} holds one class ({ds.classes[0]}): a zero-shot classifier needs at "
                                 "least two class folders to choose between.")
    seen: dict[str, str] = {}
    for folder in ds.classes:
        key = _prompt_key(folder)
        if key in seen:
            raise CounterattackError(f"{directory}: the class folders {seen[key]!r} and {folder!r} give the same "
                                     f"prompt once case, '_' and spaces are read as the text encoder reads them: one "
                                     "of the two classes could never be predicted. Rename one.")
        seen[key] = folder
    files = [path for path, _ in ds.samples]
    ids: list[ImageId] = [Path(path).relative_to(directory).as_posix() for path in files]
    fingerprint = _content_fingerprint(files, ids, ds.targets, progress, f"images of {directory.name}")
    return EvalDataset(f"{IMAGEFOLDER_PREFIX}{directory}", ds, names, list(ds.targets), ids, fingerprint,
                       f"{IMAGEFOLDER_PREFIX}{_names_and_sizes_digest(ids, files, ds.targets)}", files=files)


def short_name(dataset: str) -> str:
    """``imagefolder:/data/cifar10/test`` -> ``cifar10/test``; registry names stay."""
    if not dataset.startswith(IMAGEFOLDER_PREFIX):
        return dataset
    parts = Path(dataset[len(IMAGEFOLDER_PREFIX) :]).parts
    if parts and parts[-1] in ("test", "val", "train"):
        return "/".join(parts[-2:])
    return parts[-1] if parts else dataset


def dataset_names(specs: Sequence[str]) -> list[str]:
    """Expand ``all`` into every registered dataset; keep the rest (duplicates dropped)."""
    expanded = [name for spec in specs for name in (DATASETS if spec == "all" else [spec])]
    return list(dict.fromkeys(expanded))


def check_manual_datasets(specs: Sequence[str], data_root: str | Path) -> None:
    """Fail before any download when a dataset that must be fetched by hand is missing."""
    root = Path(data_root).expanduser()
    missing = [DATASETS[s] for s in specs
               if s in DATASETS and not DATASETS[s].downloadable and not is_present(DATASETS[s], root)]
    if missing:
        raise CounterattackError(
            f"{', '.join(i.name for i in missing)} {'is' if len(missing) == 1 else 'are'} not under {root} and cannot "
            "be downloaded automatically. " + " ".join(f"{i.name}: {i.how_to_get}." for i in missing)
        )


class _Relabelled(Dataset):
    """The images ``indices`` of ``dataset``, their labels mapped through ``labels``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], labels: dict[int, int]):
        self.dataset, self.indices, self.labels = dataset, list(indices), labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        return image, self.labels[label]


def _keep_classes(data: EvalDataset, kept: Sequence[int]) -> EvalDataset:
    """``data`` with only the classes ``kept`` (own labels, ascending) and their images; the labels are renumbered
    in order, so each later label moves down by the number of classes dropped before it; ids stay. Its identity is
    the full dataset's and the classes kept (not a second hashing of the kept files)."""
    labels = {y: new for new, y in enumerate(kept)}
    keep = [i for i, y in enumerate(data.targets) if y in labels]
    targets = [labels[data.targets[i]] for i in keep]
    return EvalDataset(
        data.name, _Relabelled(data.dataset, keep, labels), data.class_names, targets,
        [data.image_ids[i] for i in keep],
        _digest([data.fingerprint, "classes kept", *map(str, kept)]), data.randomness_key, data.templates,
        None if data.files is None else [data.files[i] for i in keep],
    )


def _files_of(dataset: Dataset) -> list[str] | None:
    """The image file behind each index of a torchvision dataset, where it keeps them in a list
    (or, for Caltech, where its ``__getitem__`` would open)."""
    if isinstance(dataset, (datasets.Caltech101, datasets.Caltech256)):
        folder, name = (("101_ObjectCategories", "image_{index:04d}.jpg") if isinstance(dataset, datasets.Caltech101)
                        else ("256_ObjectCategories", "{label:03d}_{index:04d}.jpg"))
        return [os.path.join(dataset.root, folder, dataset.categories[y], name.format(index=i, label=y + 1))
                for i, y in zip(dataset.index, dataset.y, strict=True)]
    for attribute in ("samples", "_samples"):
        entries = getattr(dataset, attribute, None)
        if isinstance(entries, list) and entries and isinstance(entries[0], tuple):
            return [str(entry[0]) for entry in entries]
    for attribute in ("_image_files", "_images"):
        entries = getattr(dataset, attribute, None)
        if isinstance(entries, list) and entries and isinstance(entries[0], (str, Path)):
            return [str(entry) for entry in entries]
    return None


def _holding_the_images(info: DatasetInfo, root: Path, files: list[str] | None) -> list[Path | str]:
    """The files a registered dataset's identity is read from: each image's own file where the loader lists them,
    else the row's ``stored_in`` files (CIFAR's test batch, PCAM's HDF5), else every file under its folder."""
    if files is not None:
        return list(files)
    if info.stored_in:
        return [root / name for name in info.stored_in]
    return sorted(path for path in (root / info.folder).rglob("*") if path.is_file())


def load_dataset(
    spec: str, clip: LoadedCLIP, data_root: str | Path = "data", download: bool = True,
    prompts: str = "paper", transform: str = "model", progress: bool = True,
) -> EvalDataset:
    """A registered dataset's evaluation split by name, or ``imagefolder:DIR``.

    ``prompts`` chooses a registered dataset's class names and templates: ``paper`` as the TTC
    authors' code builds them (ImageNet then has their 999 classes), ``openai`` the curated names
    with ``"This is a photo of a {}."``. ``transform`` is an image folder's preprocessing: the
    model's own eval transform, or the paper's Resize 256 -> CenterCrop 224. A dataset whose row ships no class
    list is named by the class list its data brings. The first load of a dataset (or of changed files) reads
    every file holding its images to identify it by content (``progress``: a bar when they are many).
    """
    if prompts not in PROMPT_SETS:
        raise CounterattackError(f"Unknown prompt set {prompts!r}. Available: {', '.join(PROMPT_SETS)}.")
    if transform not in TRANSFORMS:
        raise CounterattackError(f"Unknown transform {transform!r}. Available: {', '.join(TRANSFORMS)}.")
    if spec.startswith(IMAGEFOLDER_PREFIX):
        return _imagefolder(Path(spec[len(IMAGEFOLDER_PREFIX) :]).expanduser(), clip, transform, progress)
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
    if len(own_names) != info.num_classes:
        raise CounterattackError(
            f"{spec} under {root} has {len(own_names)} classes, expected {info.num_classes}: is it the full dataset?"
        )
    check_own_classes(spec, own_names)
    names, templates = class_prompts(spec, prompts, own_names)
    files, ids = _files_of(ds), list(range(len(labels)))
    fingerprint = _content_fingerprint(_holding_the_images(info, root, files), ids, labels, progress, spec)
    data = EvalDataset(spec, ds, list(names), list(labels), ids, fingerprint, spec, tuple(templates), files)
    kept = prompt_class_indices(spec, prompts, own_names)
    return data if len(kept) == len(own_names) else _keep_classes(data, kept)


def _decode_error(path: str) -> str | None:
    """Why an image file cannot be decoded, or None. JPEGs decode at 1/8 scale: fast, and a
    truncated or corrupt stream still fails."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image.width // 8 or 1, image.height // 8 or 1))
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return f"{type(exc).__name__}: {exc}"
    return None


def find_unreadable(data: EvalDataset, indices: Sequence[int], progress: bool = True) -> dict[int, str]:
    """The images among ``indices`` whose file cannot be decoded, with the reason (empty where files are unknown)."""
    if data.files is None:
        return {}
    problems = {}
    for i in tqdm(indices, desc=f"checking {short_name(data.name)}", unit="img", disable=not progress, leave=False):
        reason = _decode_error(data.files[i])
        if reason is not None:
            problems[i] = reason
    return problems


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
    """Yields ``(image, label, index in the full dataset)``: the index leads to the image's id."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.subset = Subset(dataset, list(indices))
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.subset[i]
        return image, label, self.indices[i]
