"""Datasets kept as plain files in folders: class folders walked once each, and the R-TPT protocol's layouts
(CoOp's UCF101 middle frames, ImageNet-A, -R, -V2 and -Sketch).

torchvision's ImageFolder walks a class folder with ``os.walk(followlinks=True)``: a symbolic link back to an
enclosing folder makes it count the same images again, level after level, until the path grows too long, and a
run then reports a larger n without a word. :func:`walk_once` enters each real folder once and refuses the
second way in (a loop, or two names for one folder), naming both paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader, has_file_allowed_extension
from torchvision.datasets.utils import download_and_extract_archive

from ..errors import CounterattackError

IMAGENET_CLASSES = 1000


def walk_once(top: str, seen: dict[str, str]) -> list[tuple[str, list[str]]]:
    """``(folder, its file names)`` for ``top`` and every folder below it, symbolic links followed, in
    ``sorted(os.walk(top, followlinks=True))``'s order. ``seen`` maps each real folder entered so far to the path
    it was entered by; reaching one again is refused, since its images would count twice."""
    found: list[tuple[str, list[str]]] = []

    def enter(folder: str) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            raise CounterattackError(
                f"{folder} leads back to {seen[real]} (a symbolic link loop, or two names for one folder): its images "
                "would be counted again. Remove the link.")
        seen[real] = folder
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
        found.append((folder, [entry.name for entry in listed if not entry.is_dir()]))
        for entry in listed:
            if entry.is_dir():
                enter(entry.path)

    enter(top)
    return sorted(found)


class ClassFolders(ImageFolder):
    """torchvision's ImageFolder (the same classes, order and errors), except that every real folder is entered
    once: a symbolic link loop, or two class folders that are one folder, is refused instead of counted again."""

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        def valid(path: str) -> bool:
            return is_valid_file(path) if is_valid_file is not None else has_file_allowed_extension(path, extensions)

        seen = {os.path.realpath(directory): str(directory)}  # a link up to the dataset's own folder is a loop too
        samples: list[tuple[str, int]] = []
        for name in sorted(class_to_idx):
            class_dir = os.path.join(directory, name)
            if not os.path.isdir(class_dir):
                continue
            samples += [(path, class_to_idx[name]) for folder, file_names in walk_once(class_dir, seen)
                        for path in (os.path.join(folder, f) for f in sorted(file_names)) if valid(path)]
        present = {label for _, label in samples}
        empty = {name for name, index in class_to_idx.items() if index not in present}
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}.")
        return samples


def walked_once(folder_dataset: type[ImageFolder]) -> type[ImageFolder]:
    """A torchvision dataset built on ImageFolder (ImageNet, EuroSAT, Country211) walking its folders as
    :class:`ClassFolders` does: everything else, its arguments included, stays torchvision's."""
    return type(folder_dataset.__name__, (folder_dataset,), {
        "make_dataset": staticmethod(ClassFolders.make_dataset), "__doc__": folder_dataset.__doc__})


def _fetch(base: Path, url: str | None, download: bool) -> None:
    """Download and unpack ``url`` beside ``base`` when ``base`` is missing and downloading is allowed."""
    if download and url and not base.is_dir():
        download_and_extract_archive(url, str(base.parent))


class WnidFolders(ClassFolders):
    """ImageNet-A, -R and -Sketch as CoOp lays them out: ``<folder>/<wnid>/*`` (other files beside the class
    folders, such as ImageNet-A's README.txt, are ignored); ``url`` is an archive that unpacks to ``folder``'s
    last part. Classes are the sorted WordNet ids (``wnids``), as CoOp and torchvision number them."""

    def __init__(self, root: str, transform: Callable, download: bool = False, *, folder: str,
                 url: str | None = None):
        base = Path(root) / folder
        _fetch(base, url, download)
        super().__init__(str(base), transform=transform)
        self.wnids = list(self.classes)


class ImageNetV2Folders(ClassFolders):
    """ImageNet-V2 as its archive unpacks: ``<folder>/<k>/*`` for ImageNet's class index k = 0..999. Label k is
    the folder's number (ImageFolder's own sort would put folder "10" second); its classes are ImageNet's wnids in
    index order, which the folders do not name."""

    def __init__(self, root: str, transform: Callable, download: bool = False, *, folder: str,
                 url: str | None = None):
        base = Path(root) / folder
        _fetch(base, url, download)
        super().__init__(str(base), transform=transform)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        expected = [str(k) for k in range(IMAGENET_CLASSES)]
        found = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if sorted(expected) != found:
            unexpected = sorted(set(found) - set(expected))[:3]
            missing = sorted(set(expected) - set(found), key=int)[:3]
            raise FileNotFoundError(
                f"{directory} should hold the folders 0 to {IMAGENET_CLASSES - 1} (ImageNet's class indices); found "
                f"{len(found)} folders" + (f", unexpected: {', '.join(unexpected)}" if unexpected else "")
                + (f", missing: {', '.join(missing)}" if missing else ""))
        return expected, {name: k for k, name in enumerate(expected)}


class UCF101Midframes(Dataset):
    """CoOp's UCF101: the middle frame of each clip, ``ucf101/UCF-101-midframes/<Class_Name>/*.jpg``, evaluated on
    the test rows of ``ucf101/split_zhou_UCF101.json`` (``[path under the frames folder, label, class name]``), in
    the file's order. Class names are read by label from all the split's rows, so each label has the one name CoOp
    gave it; a label named two ways, or a gap in the labels, is refused."""

    FOLDER, SPLIT = "ucf101", "split_zhou_UCF101.json"

    def __init__(self, root: str, transform: Callable):
        base = Path(root) / self.FOLDER
        split = json.loads((base / self.SPLIT).read_text(encoding="utf-8"))
        names: dict[int, str] = {}
        for part in ("train", "val", "test"):
            for _, label, name in split.get(part, []):
                if names.setdefault(int(label), name) != name:
                    raise ValueError(f"{self.SPLIT} names label {label} both {names[int(label)]!r} and {name!r}")
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{self.SPLIT}'s labels are not 0 to {len(names) - 1}")
        self.classes = [names[k] for k in range(len(names))]
        self.samples = [(str(base / "UCF-101-midframes" / path), int(label)) for path, label, _ in split["test"]]
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        return self.transform(default_loader(path)), label
