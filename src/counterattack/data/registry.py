"""The zero-shot benchmark of the TTC paper: 16 datasets, plus Tiny ImageNet, on stock torchvision.

A dataset is one row, :class:`DatasetInfo`: how to load the split the paper evaluates on (the test
split; the whole dataset where torchvision defines none) and read its labels without decoding images,
where its own class list comes from, the paper's prompt rule and template, whether it counts in the
paper's average, and what to tell a user who lacks the files. Nothing else in the package lists
datasets, so adding one is adding a row. Datasets torchvision cannot download fail with the files to
fetch and the layout expected under ``--data-root``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets as tv
from torchvision.datasets.utils import download_and_extract_archive

from ..errors import CounterattackError
from .prompts import (
    IMAGENET_DROPPED_WNID, PAPER_TEMPLATE, PCAM_PAPER_PROMPTS, aircraft_name, as_is, caltech101_name, caltech256_name,
    clean, country211_name, curated_class_names, imagenet_paper_name, raw_classes, stanford_cars_name,
    tinyimagenet_paper_name,
)

SHIPPED = "raw_classes.json"
"""A class source: the list shipped in ``raw_classes.json``, for datasets whose files name no class. Such a
list can only be checked against a loaded copy by its length."""


@dataclass(frozen=True)
class Loader:
    """A split built the torchvision way, ``factory(root, transform=..., download=..., **kwargs)`` (``download``
    only where the row is downloadable), its labels and own class list read off attributes: a dataset needs no
    code of its own, and its labels come without decoding an image.

    ``labels`` is an attribute, or a function of the dataset where they live elsewhere; ``classes`` an attribute,
    or :data:`SHIPPED`. ``subdir`` is handed to the factory instead of the data root (ImageNet keeps its own).
    """

    factory: Callable[..., Dataset]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    labels: str | Callable[[Dataset], Iterable[int]] = "targets"
    classes: str = "classes"
    subdir: str = ""


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset, all the package knows of it. The paper's names of class ``c`` are ``paper_rule`` applied to
    its own (raw) name, or ``paper_prompts`` where the paper wrote whole sentences; ``openai`` takes the curated
    names of ``classnames.json`` or, without a list there, ``openai_name`` of the own names. ``in_paper_average``
    has no default, so that no dataset joins the paper's Table 1 average by being added."""

    name: str
    num_classes: int
    test_size: int
    split: str
    folder: str  # under --data-root; its presence means the dataset is there
    loader: Loader
    how_to_get: str  # shown when the data is missing
    _: KW_ONLY
    in_paper_average: bool
    downloadable: bool = True
    paper_rule: Callable[[str], str] = as_is
    paper_template: str = PAPER_TEMPLATE
    paper_prompts: tuple[str, ...] = ()  # one whole prompt per class, instead of rule and template (PCAM)
    paper_dropped: tuple[str, ...] = ()  # own class names without a paper prompt: left out, with their images
    openai_name: Callable[[str], str] = str

    @property
    def names_its_classes(self) -> bool:
        """Whether the loaded data names its classes (else the shipped list stands in, and only its length is known)."""
        return self.loader.classes != SHIPPED

    def load(self, root: Path, transform: Callable, download: bool) -> tuple[Dataset, list[int], list[str]]:
        """``(dataset, labels, its own class list)`` from the files under ``root``."""
        spec = self.loader
        ds = spec.factory(str(Path(root) / spec.subdir), transform=transform,
                          **({"download": download} if self.downloadable else {}), **spec.kwargs)
        labels = spec.labels(ds) if callable(spec.labels) else getattr(ds, spec.labels)
        own = raw_classes(self.name) if spec.classes == SHIPPED else getattr(ds, spec.classes)
        return ds, [int(y) for y in labels], list(own)


@cache
def _openai_imagenet_names() -> dict[str, str]:
    return dict(zip(raw_classes("imagenet"), curated_class_names()["imagenet"], strict=True))


def _openai_imagenet_name(wnid: str) -> str:
    """Tiny ImageNet's WordNet ids named as OpenAI's curated ImageNet names (all 200 are ImageNet-1k synsets);
    an unknown id stays as it is."""
    return _openai_imagenet_names().get(wnid, wnid)


def readable(name: str) -> str:
    """Caltech-256's folder names as words: ``002.american-flag`` -> ``american flag``,
    ``145.motorbikes-101`` -> ``motorbikes``."""
    if "." in name and name.split(".", 1)[0].isdigit():
        name = name.split(".", 1)[1]
    name = name.removesuffix("-101")
    return name.replace("_", " ").replace("-", " ").strip()


# --- The few datasets a torchvision class does not describe by attributes alone. ---------------------------

def _second_of(attribute: str) -> Callable[[Dataset], list[int]]:
    """Labels kept as the second element of ``(file, label)`` pairs."""
    return lambda ds: [label for _, label in getattr(ds, attribute)]


def _sun397(root: str, **kwargs: Any) -> Dataset:
    """torchvision lists SUN397's files in the file system's order: sorted, an index names the same image on
    every copy."""
    ds = tv.SUN397(root, **kwargs)
    ds._image_files, ds._labels = (map(list, zip(*sorted(zip(ds._image_files, ds._labels, strict=True)), strict=True))
                                   if ds._labels else ([], []))
    return ds


def _pcam(root: str, **kwargs: Any) -> Dataset:
    """PCAM needs h5py, which the package does not require: say how to get it before torchvision fails."""
    if importlib.util.find_spec("h5py") is None:
        raise CounterattackError("PCAM is stored as HDF5: pip install 'clip-counterattack[pcam]' (h5py).")
    return tv.PCAM(root, **kwargs)


def _pcam_labels(ds: Dataset) -> list[int]:
    """PCAM's test labels, read from their own HDF5 file rather than through the images."""
    with ds.h5py.File(ds._base_folder / ds._FILES["test"]["targets"][0]) as f:
        return [int(y) for y in f["y"][:, 0, 0, 0]]


class TinyImageNetVal(Dataset):
    """Tiny ImageNet's validation split (its test split has no labels): ``val/images`` with
    ``val/val_annotations.txt``; classes are ``wnids.txt`` in order, named by ``words.txt``."""

    URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

    def __init__(self, root: Path | str, transform: Callable, download: bool):
        self.base = Path(root) / "tiny-imagenet-200"
        if download and not self.base.is_dir():
            download_and_extract_archive(self.URL, str(root))
        annotations = self.base / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise RuntimeError(f"Tiny ImageNet not found: {annotations} is missing")
        self.wnids = (self.base / "wnids.txt").read_text().split()
        words = dict(line.split("\t", 1) for line in (self.base / "words.txt").read_text().splitlines() if "\t" in line)
        self.classes = [words.get(w, w).split(",")[0].strip() for w in self.wnids]
        index = {w: i for i, w in enumerate(self.wnids)}
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        self.samples = sorted((self.base / "val" / "images" / r[0], index[r[1]]) for r in rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(tv.folder.default_loader(str(path))), label


def _manual(files_: str, layout: str) -> str:
    return f"Download {files_} and arrange them under --data-root as: {layout}"


_TEST = {"split": "test"}

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo("cifar10", 10, 10000, "test", "cifar-10-batches-py", Loader(tv.CIFAR10, {"train": False}),
                "downloaded automatically from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                in_paper_average=True),
    DatasetInfo("cifar100", 100, 10000, "test", "cifar-100-python", Loader(tv.CIFAR100, {"train": False}),
                "downloaded automatically from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                in_paper_average=True),
    DatasetInfo("stl10", 10, 8000, "test", "stl10_binary", Loader(tv.STL10, _TEST, labels="labels"),
                "downloaded automatically from http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                in_paper_average=True),
    DatasetInfo("imagenet", 1000, 50000, "val", "imagenet",
                Loader(tv.ImageNet, {"split": "val"}, classes="wnids", subdir="imagenet"), _manual(
                    "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from https://image-net.org (free account)",
                    "imagenet/ILSVRC2012_img_val.tar and imagenet/ILSVRC2012_devkit_t12.tar.gz (torchvision unpacks "
                    "them into imagenet/val/<wnid>/ and imagenet/meta.bin on first use)"),
                in_paper_average=True, downloadable=False, paper_rule=imagenet_paper_name,
                paper_dropped=(IMAGENET_DROPPED_WNID,)),
    DatasetInfo("caltech101", 101, 8677, "all (no split)", "caltech101/101_ObjectCategories",
                Loader(tv.Caltech101, {"target_type": "category"}, labels="y", classes="categories"),
                "downloaded automatically (Google Drive); or put 101_ObjectCategories/ in caltech101/",
                in_paper_average=True, paper_rule=caltech101_name),
    DatasetInfo("caltech256", 257, 30607, "all (no split)", "caltech256/256_ObjectCategories",
                Loader(tv.Caltech256, labels="y", classes="categories"),
                "downloaded automatically (Google Drive); or put 256_ObjectCategories/ in caltech256/",
                in_paper_average=True, paper_rule=caltech256_name, paper_template="A photo of a {}.",
                openai_name=readable),
    DatasetInfo("oxford_pets", 37, 3669, "test", "oxford-iiit-pet", Loader(tv.OxfordIIITPet, _TEST, labels="_labels"),
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/pets/",
                in_paper_average=True, paper_rule=clean, paper_template="A photo of a {}, a type of pet."),
    DatasetInfo("flowers102", 102, 6149, "test", "flowers-102",
                Loader(tv.Flowers102, _TEST, labels="_labels", classes=SHIPPED),  # its files hold label numbers only
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
                in_paper_average=True, paper_rule=clean, paper_template="A photo of a {}, a type of flower."),
    DatasetInfo("fgvc_aircraft", 100, 3333, "test", "fgvc-aircraft-2013b",
                Loader(tv.FGVCAircraft, {**_TEST, "annotation_level": "variant"}, labels="_labels"),
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
                in_paper_average=True, paper_rule=aircraft_name, paper_template="A photo of a {}, a type of aircraft."),
    DatasetInfo("stanford_cars", 196, 8041, "test", "stanford_cars",
                Loader(tv.StanfordCars, _TEST, labels=_second_of("_samples")), _manual(
                    "the Stanford Cars test images and labels (e.g. the Kaggle mirror: cars_test/, "
                    "cars_test_annos_withlabels.mat, devkit/cars_meta.mat; torchvision's own download no longer works)",
                    "stanford_cars/cars_test/*.jpg, stanford_cars/cars_test_annos_withlabels.mat, "
                    "stanford_cars/devkit/cars_meta.mat, stanford_cars/devkit/cars_train_annos.mat"),
                in_paper_average=True, downloadable=False, paper_rule=stanford_cars_name,
                paper_template="A photo of a {}."),
    DatasetInfo("sun397", 397, 108754, "all (no split)", "SUN397", Loader(_sun397, labels="_labels"), _manual(
        "SUN397.tar.gz (the original URL is dead; mirrors exist, e.g. on the Hugging Face Hub)",
        "SUN397/ClassName.txt and SUN397/<letter>/<class>/sun_*.jpg"), in_paper_average=True, downloadable=False),
    DatasetInfo("country211", 211, 21100, "test", "country211", Loader(tv.Country211, _TEST),
                "downloaded automatically from https://openaipublic.azureedge.net/clip/data/country211.tgz",
                in_paper_average=True, paper_rule=country211_name, paper_template="A photo I took in {}."),
    DatasetInfo("food101", 101, 25250, "test", "food-101", Loader(tv.Food101, _TEST, labels="_labels"),
                "downloaded automatically from https://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                in_paper_average=True, paper_rule=clean, paper_template="A photo of {}, a type of food."),
    DatasetInfo("eurosat", 10, 27000, "all (no split)", "eurosat/2750", Loader(tv.EuroSAT), _manual(
        "EuroSAT_RGB.zip (from the Hugging Face Hub or https://github.com/phelber/EuroSAT)",
        "eurosat/2750/<ClassName>/*.jpg"), in_paper_average=True, downloadable=False, paper_rule=clean,
        paper_template="A centered satellite photo of {}."),
    DatasetInfo("dtd", 47, 1880, "test (partition 1)", "dtd/dtd",
                Loader(tv.DTD, {**_TEST, "partition": 1}, labels="_labels"),
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/dtd/",
                in_paper_average=True, paper_rule=clean, paper_template="A surface with a {} texture."),
    DatasetInfo("pcam", 2, 32768, "test", "pcam",
                Loader(_pcam, _TEST, labels=_pcam_labels, classes=SHIPPED),  # torchvision names no PCAM class
                "downloaded automatically (Google Drive; needs h5py: pip install 'clip-counterattack[pcam]')",
                in_paper_average=True, paper_prompts=tuple(PCAM_PAPER_PROMPTS)),
    DatasetInfo("tinyimagenet", 200, 10000, "val", "tiny-imagenet-200",
                Loader(TinyImageNetVal, labels=_second_of("samples"), classes="wnids"),
                f"downloaded automatically from {TinyImageNetVal.URL}",
                in_paper_average=False, paper_rule=tinyimagenet_paper_name, openai_name=_openai_imagenet_name),
]}


def is_present(info: DatasetInfo, data_root: Path) -> bool:
    return (Path(data_root) / info.folder).exists()
