"""The zero-shot benchmark of the TTC paper: 16 datasets, plus Tiny ImageNet, on stock torchvision.

Each entry loads the split the paper evaluates on (the test split; the whole dataset where
torchvision defines none), gives its labels without decoding images, and its curated class names
(``classnames.json``, sources inside). Datasets torchvision cannot download fail with the files to
fetch and the layout expected under ``--data-root``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets as tv
from torchvision.datasets.utils import download_and_extract_archive

from ..errors import CounterattackError

Loader = Callable[[Path, Callable, bool], tuple[Dataset, list[int], list[str]]]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    test_size: int
    split: str
    folder: str  # under --data-root; its presence means the dataset is there
    load: Loader  # (data root, transform, download) -> (dataset, labels, its own raw class list: raw_classes.json)
    how_to_get: str  # shown when the data is missing
    downloadable: bool = True
    clean_name: Callable[[str], str] = str  # for datasets without a curated list: their own labels, tidied


@cache
def curated_class_names() -> dict[str, list[str]]:
    text = files("counterattack.data").joinpath("classnames.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _shipped_own_classes(dataset: str) -> list[str]:
    """The shipped own-class list, for datasets whose files name no class."""
    from .prompts import raw_classes  # prompts imports this module

    return raw_classes(dataset)


@cache
def _openai_imagenet_names() -> dict[str, str]:
    from .prompts import raw_classes  # prompts imports this module

    return dict(zip(raw_classes("imagenet"), curated_class_names()["imagenet"]))


def _openai_imagenet_name(wnid: str) -> str:
    """Tiny ImageNet's WordNet ids named as OpenAI's curated ImageNet names (all 200 are ImageNet-1k synsets);
    an unknown id stays as it is."""
    return _openai_imagenet_names().get(wnid, wnid)


def _cifar10(root, transform, download):
    ds = tv.CIFAR10(str(root), train=False, transform=transform, download=download)
    return ds, list(ds.targets), list(ds.classes)


def _cifar100(root, transform, download):
    ds = tv.CIFAR100(str(root), train=False, transform=transform, download=download)
    return ds, list(ds.targets), list(ds.classes)


def _stl10(root, transform, download):
    ds = tv.STL10(str(root), split="test", transform=transform, download=download)
    return ds, [int(y) for y in ds.labels], list(ds.classes)


def _imagenet(root, transform, download):
    ds = tv.ImageNet(str(root / "imagenet"), split="val", transform=transform)
    return ds, list(ds.targets), list(ds.wnids)


def _caltech101(root, transform, download):
    ds = tv.Caltech101(str(root), target_type="category", transform=transform, download=download)
    return ds, list(ds.y), list(ds.categories)


def _caltech256(root, transform, download):
    ds = tv.Caltech256(str(root), transform=transform, download=download)
    return ds, list(ds.y), list(ds.categories)


def _oxford_pets(root, transform, download):
    ds = tv.OxfordIIITPet(str(root), split="test", transform=transform, download=download)
    return ds, list(ds._labels), list(ds.classes)


def _flowers102(root, transform, download):
    ds = tv.Flowers102(str(root), split="test", transform=transform, download=download)
    return ds, list(ds._labels), _shipped_own_classes("flowers102")  # its files hold label numbers only


def _fgvc_aircraft(root, transform, download):
    ds = tv.FGVCAircraft(str(root), split="test", annotation_level="variant", transform=transform, download=download)
    return ds, list(ds._labels), list(ds.classes)


def _stanford_cars(root, transform, download):
    ds = tv.StanfordCars(str(root), split="test", transform=transform)
    return ds, [label for _, label in ds._samples], list(ds.classes)


def _sun397(root, transform, download):
    ds = tv.SUN397(str(root), transform=transform)
    # torchvision lists the files in the file system's order: sorted, an index names the same image on every copy.
    ds._image_files, ds._labels = map(list, zip(*sorted(zip(ds._image_files, ds._labels)))) if ds._labels else ([], [])
    return ds, list(ds._labels), list(ds.classes)


def _country211(root, transform, download):
    ds = tv.Country211(str(root), split="test", transform=transform, download=download)
    return ds, list(ds.targets), list(ds.classes)


def _food101(root, transform, download):
    ds = tv.Food101(str(root), split="test", transform=transform, download=download)
    return ds, list(ds._labels), list(ds.classes)


def _eurosat(root, transform, download):
    ds = tv.EuroSAT(str(root), transform=transform)
    return ds, list(ds.targets), list(ds.classes)


def _dtd(root, transform, download):
    ds = tv.DTD(str(root), split="test", partition=1, transform=transform, download=download)
    return ds, list(ds._labels), list(ds.classes)


def _pcam(root, transform, download):
    try:
        import h5py
    except ImportError as exc:
        raise CounterattackError("PCAM is stored as HDF5: pip install 'clip-counterattack[pcam]' (h5py).") from exc
    ds = tv.PCAM(str(root), split="test", transform=transform, download=download)
    with h5py.File(ds._base_folder / ds._FILES["test"]["targets"][0]) as f:
        labels = [int(y) for y in f["y"][:, 0, 0, 0]]
    return ds, labels, _shipped_own_classes("pcam")  # torchvision names no PCAM class


class TinyImageNetVal(Dataset):
    """Tiny ImageNet's validation split (its test split has no labels): ``val/images`` with
    ``val/val_annotations.txt``; classes are ``wnids.txt`` in order, named by ``words.txt``."""

    URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

    def __init__(self, root: Path, transform: Callable, download: bool):
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


def _tinyimagenet(root, transform, download):
    ds = TinyImageNetVal(root, transform, download)
    return ds, [label for _, label in ds.samples], list(ds.wnids)


def _manual(files_: str, layout: str) -> str:
    return f"Download {files_} and arrange them under --data-root as: {layout}"


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo("cifar10", 10, 10000, "test", "cifar-10-batches-py", _cifar10,
                "downloaded automatically from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    DatasetInfo("cifar100", 100, 10000, "test", "cifar-100-python", _cifar100,
                "downloaded automatically from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    DatasetInfo("stl10", 10, 8000, "test", "stl10_binary", _stl10,
                "downloaded automatically from http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
    DatasetInfo("imagenet", 1000, 50000, "val", "imagenet", _imagenet, _manual(
        "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from https://image-net.org (free account)",
        "imagenet/ILSVRC2012_img_val.tar and imagenet/ILSVRC2012_devkit_t12.tar.gz (torchvision unpacks them "
        "into imagenet/val/<wnid>/ and imagenet/meta.bin on first use)"), downloadable=False),
    DatasetInfo("caltech101", 101, 8677, "all (no split)", "caltech101/101_ObjectCategories", _caltech101,
                "downloaded automatically (Google Drive); or put 101_ObjectCategories/ in caltech101/"),
    DatasetInfo("caltech256", 257, 30607, "all (no split)", "caltech256/256_ObjectCategories", _caltech256,
                "downloaded automatically (Google Drive); or put 256_ObjectCategories/ in caltech256/",
                clean_name=lambda c: readable(c)),
    DatasetInfo("oxford_pets", 37, 3669, "test", "oxford-iiit-pet", _oxford_pets,
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/pets/"),
    DatasetInfo("flowers102", 102, 6149, "test", "flowers-102", _flowers102,
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    DatasetInfo("fgvc_aircraft", 100, 3333, "test", "fgvc-aircraft-2013b", _fgvc_aircraft,
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"),
    DatasetInfo("stanford_cars", 196, 8041, "test", "stanford_cars", _stanford_cars, _manual(
        "the Stanford Cars test images and labels (e.g. the Kaggle mirror: cars_test/, cars_test_annos_withlabels.mat, "
        "devkit/cars_meta.mat; torchvision's own download no longer works)",
        "stanford_cars/cars_test/*.jpg, stanford_cars/cars_test_annos_withlabels.mat, stanford_cars/devkit/cars_meta.mat, "
        "stanford_cars/devkit/cars_train_annos.mat"), downloadable=False),
    DatasetInfo("sun397", 397, 108754, "all (no split)", "SUN397", _sun397, _manual(
        "SUN397.tar.gz (the original URL is dead; mirrors exist, e.g. on the Hugging Face Hub)",
        "SUN397/ClassName.txt and SUN397/<letter>/<class>/sun_*.jpg"), downloadable=False),
    DatasetInfo("country211", 211, 21100, "test", "country211", _country211,
                "downloaded automatically from https://openaipublic.azureedge.net/clip/data/country211.tgz"),
    DatasetInfo("food101", 101, 25250, "test", "food-101", _food101,
                "downloaded automatically from https://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"),
    DatasetInfo("eurosat", 10, 27000, "all (no split)", "eurosat/2750", _eurosat, _manual(
        "EuroSAT_RGB.zip (from the Hugging Face Hub or https://github.com/phelber/EuroSAT)",
        "eurosat/2750/<ClassName>/*.jpg"), downloadable=False),
    DatasetInfo("dtd", 47, 1880, "test (partition 1)", "dtd/dtd", _dtd,
                "downloaded automatically from https://www.robots.ox.ac.uk/~vgg/data/dtd/"),
    DatasetInfo("pcam", 2, 32768, "test", "pcam", _pcam,
                "downloaded automatically (Google Drive; needs h5py: pip install 'clip-counterattack[pcam]')"),
    DatasetInfo("tinyimagenet", 200, 10000, "val", "tiny-imagenet-200", _tinyimagenet,
                f"downloaded automatically from {TinyImageNetVal.URL}", clean_name=_openai_imagenet_name),
]}


def is_present(info: DatasetInfo, data_root: Path) -> bool:
    return (Path(data_root) / info.folder).exists()


def readable(name: str) -> str:
    """Caltech-256's folder names as words: ``002.american-flag`` -> ``american flag``,
    ``145.motorbikes-101`` -> ``motorbikes``."""
    if "." in name and name.split(".", 1)[0].isdigit():
        name = name.split(".", 1)[1]
    name = name.removesuffix("-101")
    return name.replace("_", " ").replace("-", " ").strip()
