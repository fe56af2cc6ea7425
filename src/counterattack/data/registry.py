"""The zero-shot benchmark of the TTC paper: 16 datasets, plus Tiny ImageNet, on stock torchvision; and R-TPT's
(CoOp's) UCF101, ImageNet-A, -V2, -R and -Sketch, so that the fine-grained averages of MAC and DBD can be run.

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
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets as tv
from torchvision.datasets.utils import download_and_extract_archive

from ..errors import CounterattackError
from .layouts import ImageNetV2Folders, UCF101Midframes, WnidFolders, walked_once
from .names import (
    COOP_TEMPLATE, IMAGENET_DROPPED_WNID, PAPER_TEMPLATE, PCAM_PAPER_PROMPTS, UCF101_TEMPLATE, aircraft_name, as_is,
    caltech101_name, caltech256_name, clean, country211_name, curated_class_names, imagenet_paper_name,
    imagenet_variant_paper_name, openai_imagenet_name, readable, shipped_own_classes, stanford_cars_name,
    tinyimagenet_paper_name, words,
)

__all__ = ["DATASETS", "SHIPPED", "DatasetInfo", "Loader", "TinyImageNetVal", "curated_class_names", "is_present",
           "readable"]

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
    has no default, so that no dataset joins the paper's Table 1 average by being added.

    A dataset is identified by the content of the files holding its images: each image's file where the loader
    lists them, else the ``stored_in`` files (CIFAR's batches, PCAM's HDF5), else every file under ``folder``."""

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
    stored_in: tuple[str, ...] = ()  # under --data-root: the files holding the images, where no file is one image

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
        own = shipped_own_classes(self.name) if spec.classes == SHIPPED else getattr(ds, spec.classes)
        return ds, [int(y) for y in labels], list(own)


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
IMAGENET_A_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
IMAGENET_V2_URL = "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz"

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo("cifar10", 10, 10000, "test", "cifar-10-batches-py", Loader(tv.CIFAR10, {"train": False}),
                "downloaded automatically from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                in_paper_average=True,
                stored_in=("cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta")),
    DatasetInfo("cifar100", 100, 10000, "test", "cifar-100-python", Loader(tv.CIFAR100, {"train": False}),
                "downloaded automatically from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                in_paper_average=True, stored_in=("cifar-100-python/test", "cifar-100-python/meta")),
    DatasetInfo("stl10", 10, 8000, "test", "stl10_binary", Loader(tv.STL10, _TEST, labels="labels"),
                "downloaded automatically from http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                in_paper_average=True,
                stored_in=("stl10_binary/test_X.bin", "stl10_binary/test_y.bin", "stl10_binary/class_names.txt")),
    DatasetInfo("imagenet", 1000, 50000, "val", "imagenet",
                Loader(walked_once(tv.ImageNet), {"split": "val"}, classes="wnids", subdir="imagenet"), _manual(
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
    DatasetInfo("country211", 211, 21100, "test", "country211", Loader(walked_once(tv.Country211), _TEST),
                "downloaded automatically from https://openaipublic.azureedge.net/clip/data/country211.tgz",
                in_paper_average=True, paper_rule=country211_name, paper_template="A photo I took in {}."),
    DatasetInfo("food101", 101, 25250, "test", "food-101", Loader(tv.Food101, _TEST, labels="_labels"),
                "downloaded automatically from https://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                in_paper_average=True, paper_rule=clean, paper_template="A photo of {}, a type of food."),
    DatasetInfo("eurosat", 10, 27000, "all (no split)", "eurosat/2750", Loader(walked_once(tv.EuroSAT)), _manual(
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
                in_paper_average=True, paper_prompts=tuple(PCAM_PAPER_PROMPTS),
                stored_in=("pcam/camelyonpatch_level_2_split_test_x.h5", "pcam/camelyonpatch_level_2_split_test_y.h5")),
    DatasetInfo("tinyimagenet", 200, 10000, "val", "tiny-imagenet-200",
                Loader(TinyImageNetVal, labels=_second_of("samples"), classes="wnids"),
                f"downloaded automatically from {TinyImageNetVal.URL}",
                in_paper_average=False, paper_rule=tinyimagenet_paper_name, openai_name=openai_imagenet_name),
    # R-TPT's protocol (CoOp's layouts): UCF101 and the ImageNet variants, outside the TTC paper. Their ``paper``
    # prompts are CoOp's and R-TPT's templates; the variants take the TTC code's ImageNet names where it has them.
    DatasetInfo("ucf101", 101, 3783, "test (CoOp's split)", "ucf101/UCF-101-midframes", Loader(UCF101Midframes),
                _manual("UCF-101-midframes.zip (the middle frame of each clip) and split_zhou_UCF101.json from the "
                        "Google Drive links of CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp)",
                        "ucf101/UCF-101-midframes/<Class_Name>/*.jpg and ucf101/split_zhou_UCF101.json"),
                in_paper_average=False, downloadable=False, paper_rule=words, paper_template=UCF101_TEMPLATE),
    DatasetInfo("imagenet_a", 200, 7500, "all (no split)", "imagenet-adversarial/imagenet-a",
                Loader(WnidFolders, {"folder": "imagenet-adversarial/imagenet-a", "url": IMAGENET_A_URL},
                       classes="wnids"),
                f"downloaded automatically from {IMAGENET_A_URL} (unpacked into "
                "imagenet-adversarial/imagenet-a/<wnid>/)",
                in_paper_average=False, paper_rule=imagenet_variant_paper_name, paper_template=COOP_TEMPLATE,
                openai_name=openai_imagenet_name),
    DatasetInfo("imagenet_v2", 1000, 10000, "all (no split)", "imagenetv2/imagenetv2-matched-frequency-format-val",
                Loader(ImageNetV2Folders, {"folder": "imagenetv2/imagenetv2-matched-frequency-format-val",
                                           "url": IMAGENET_V2_URL}, classes=SHIPPED),  # its folders are numbers
                f"downloaded automatically from {IMAGENET_V2_URL} (unpacked into "
                "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/)",
                in_paper_average=False, paper_rule=imagenet_variant_paper_name, paper_template=COOP_TEMPLATE,
                openai_name=openai_imagenet_name),
    DatasetInfo("imagenet_r", 200, 30000, "all (no split)", "imagenet-rendition/imagenet-r",
                Loader(WnidFolders, {"folder": "imagenet-rendition/imagenet-r", "url": IMAGENET_R_URL},
                       classes="wnids"),
                f"downloaded automatically from {IMAGENET_R_URL} (unpacked into imagenet-rendition/imagenet-r/<wnid>/)",
                in_paper_average=False, paper_rule=imagenet_variant_paper_name, paper_template=COOP_TEMPLATE,
                openai_name=openai_imagenet_name),
    DatasetInfo("imagenet_sketch", 1000, 50889, "all (no split)", "imagenet-sketch/images",
                Loader(WnidFolders, {"folder": "imagenet-sketch/images"}, classes="wnids"), _manual(
                    "ImageNet-Sketch.zip (github.com/HaohanWang/ImageNet-Sketch: Google Drive, or "
                    "data/ImageNet-Sketch.zip of the Hugging Face dataset songweig/imagenet_sketch)",
                    "imagenet-sketch/images/<wnid>/*.JPEG (the zip's folder sketch/ renamed images/, as CoOp expects)"),
                in_paper_average=False, downloadable=False, paper_rule=imagenet_variant_paper_name,
                paper_template=COOP_TEMPLATE, openai_name=openai_imagenet_name),
]}


def is_present(info: DatasetInfo, data_root: Path) -> bool:
    return (Path(data_root) / info.folder).exists()
