"""Every dataset of the benchmark on a tiny fake copy of its on-disk layout (torchvision's own test
strategy): the loader finds the files, yields the right labels and the prompt set's class names, refuses
a copy whose own class list is not the shipped one, and a broken layout gives a clear error.

The fakes use each dataset's real class list (``raw_classes``), laid out so that the stock torchvision
class (or, for R-TPT's datasets, CoOp's layout) derives exactly that list from the files, as it would from
the real download."""

import dataclasses
import json
import os
import pickle
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets as tv

from counterattack import CounterattackError, load_clip, load_dataset
from counterattack.cli import main
from counterattack.data import DATASETS, PAPER_AVERAGE_DATASETS, find_unreadable
from counterattack.data.prompts import (
    IMAGENET_DROPPED_WNID, OPENAI_TEMPLATE, class_prompts, imagenet_paper_name, raw_classes, tinyimagenet_paper_name,
)
from counterattack.data.registry import IMAGENET_A_URL, curated_class_names, readable

from testkit import build_eurosat, jpeg, put

CLASS_COUNTS = {
    "cifar10": 10, "cifar100": 100, "stl10": 10, "imagenet": 1000, "caltech101": 101, "caltech256": 257,
    "oxford_pets": 37, "flowers102": 102, "fgvc_aircraft": 100, "stanford_cars": 196, "sun397": 397,
    "country211": 211, "food101": 101, "eurosat": 10, "dtd": 47, "pcam": 2, "tinyimagenet": 200,
    # R-TPT's protocol (CoOp's layouts), outside the TTC paper
    "ucf101": 101, "imagenet_a": 200, "imagenet_v2": 1000, "imagenet_r": 200, "imagenet_sketch": 1000,
}


def file_exists(path, md5=None) -> bool:
    """Stands in for torchvision's md5 integrity check: the fake files have the right names, not the real bytes."""
    return os.path.isfile(path)


# Each builder lays out the dataset under root and returns the labels it should load, in order.
def build_cifar10(root, monkeypatch, label_names=None):
    monkeypatch.setattr(tv.cifar, "check_integrity", file_exists)
    base = root / "cifar-10-batches-py"
    base.mkdir()
    labels = [3, 1, 4, 1, 5, 9]
    data = np.random.default_rng(0).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    pickle.dump({"data": data, "labels": labels}, open(base / "test_batch", "wb"))
    pickle.dump({"label_names": label_names or raw_classes("cifar10")}, open(base / "batches.meta", "wb"))
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        put(base / name, b"x")
    return labels


def build_cifar100(root, monkeypatch):
    monkeypatch.setattr(tv.cifar, "check_integrity", file_exists)
    base = root / "cifar-100-python"
    base.mkdir()
    labels = [0, 99, 42]
    data = np.random.default_rng(0).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    pickle.dump({"data": data, "fine_labels": labels}, open(base / "test", "wb"))
    pickle.dump({"fine_label_names": raw_classes("cifar100")}, open(base / "meta", "wb"))
    put(base / "train", b"x")
    return labels


def build_stl10(root, monkeypatch):
    monkeypatch.setattr(tv.stl10, "check_integrity", file_exists)
    base = root / "stl10_binary"
    base.mkdir()
    labels = [2, 0, 9]
    pixels = np.random.default_rng(0).integers(0, 256, size=len(labels) * 3 * 96 * 96, dtype=np.uint8)
    pixels.tofile(base / "test_X.bin")
    (np.array(labels, dtype=np.uint8) + 1).tofile(base / "test_y.bin")  # STL-10 counts from 1
    (base / "class_names.txt").write_text("\n".join(raw_classes("stl10")) + "\n")
    for name in ("train_X.bin", "train_y.bin", "unlabeled_X.bin"):
        put(base / name, b"x")
    return labels


def imagenet_layout(root, images_per_class: dict[str, int] | None = None) -> list[int]:
    """ImageNet as torchvision leaves it once unpacked: ``imagenet/meta.bin`` and ``imagenet/val/<wnid>/*.JPEG``.
    ImageFolder refuses an empty class folder, so every synset holds one image, or ``images_per_class[wnid]``."""
    base = root / "imagenet"
    wnids = raw_classes("imagenet")
    base.mkdir()
    names = dict(zip(wnids, curated_class_names()["imagenet"], strict=True))
    torch.save(({w: (name,) for w, name in names.items()}, []), base / "meta.bin")
    labels, number = [], 0
    for label, wnid in enumerate(wnids):
        for _ in range((images_per_class or {}).get(wnid, 1)):
            number += 1
            put(base / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG")  # each image its own pixels
            labels.append(label)
    return labels


def build_imagenet(root, monkeypatch):
    return imagenet_layout(root)


def build_caltech101(root, monkeypatch):
    base = root / "caltech101" / "101_ObjectCategories"
    put(base / "BACKGROUND_Google" / "image_0001.jpg")  # torchvision drops this folder: not a class
    labels = []
    for i, category in enumerate(raw_classes("caltech101")):
        (base / category).mkdir(parents=True)
        if i % 50 == 0:
            put(base / category / "image_0001.jpg", jpeg(i, "L"))  # grayscale, as some Caltech images are
            labels.append(i)
    return labels


def build_caltech256(root, monkeypatch, rename: dict[str, str] | None = None):
    base = root / "caltech256" / "256_ObjectCategories"
    labels = []
    for i, folder in enumerate(raw_classes("caltech256")):
        folder = (rename or {}).get(folder, folder)
        (base / folder).mkdir(parents=True)
        if i in (0, 144, 256):
            put(base / folder / f"{i + 1:03d}_0001.jpg", jpeg(i, "CMYK"))
            labels.append(i)
    return labels


def build_oxford_pets(root, monkeypatch):
    # torchvision names the classes after the image ids (``american_bulldog_12`` -> "American Bulldog"),
    # ordered by label: every breed needs an image in the split. The lines come shuffled.
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    breeds = raw_classes("oxford_pets")
    labels = [int(i) for i in np.random.default_rng(0).permutation(len(breeds))]
    lines = []
    for label in labels:
        image_id = f"{breeds[label].lower().replace(' ', '_')}_{label + 1}"
        put(base / "images" / f"{image_id}.jpg")
        lines.append(f"{image_id} {label + 1} 1 1")
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    return labels


def build_flowers102(root, monkeypatch):
    monkeypatch.setattr(tv.flowers102, "check_integrity", file_exists)
    base = root / "flowers-102"
    labels = [5, 101, 0]
    for i in range(1, 4):
        put(base / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(labels) + 1})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([9]), "valid": np.array([8]), "tstid": np.array([1, 2, 3])})
    return labels


def build_fgvc_aircraft(root, monkeypatch):
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = raw_classes("fgvc_aircraft")
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    labels = [1, 0, variants.index("Boeing 717"), 99]  # a variant with a space in its name, too
    (data / "images_variant_test.txt").write_text("".join(f"{i:04d} {variants[y]}\n" for i, y in enumerate(labels)))
    for i in range(len(labels)):
        put(data / "images" / f"{i:04d}.jpg")
    return labels


def build_stanford_cars(root, monkeypatch):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(raw_classes("stanford_cars"), dtype=object)})
    annotations = np.array([("00001.jpg", 7), ("00002.jpg", 196)], dtype=[("fname", object), ("class", object)])
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    for image in ("00001.jpg", "00002.jpg"):
        put(base / "cars_test" / image)
    return [6, 195]


def build_sun397(root, monkeypatch):
    # torchvision finds the images with rglob, whose order is the file system's: the test compares in path order.
    base = root / "SUN397"
    classes = raw_classes("sun397")
    base.mkdir()
    (base / "ClassName.txt").write_text("".join(f"/{c[0]}/{c}\n" for c in classes))
    labels = [classes.index("abbey"), classes.index("swimming_pool/outdoor"), len(classes) - 1]
    for i, label in enumerate(labels):
        put(base / classes[label][0] / classes[label] / f"sun_{i}.jpg")
    return labels  # in path order: a/abbey, s/swimming_pool/outdoor, y/youth_hostel


def build_country211(root, monkeypatch):
    image = jpeg(0)
    for i, code in enumerate(raw_classes("country211")):
        put(root / "country211" / "test" / code / f"{i}.jpg", image)
    return list(range(211))


def build_food101(root, monkeypatch):
    base = root / "food-101"
    classes = raw_classes("food101")
    with_images = {3: 2, 100: 1}  # class -> images
    meta = {c: [f"{c}/{j}" for j in range(with_images.get(i, 0))] for i, c in enumerate(classes)}
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "test.json").write_text(json.dumps(meta))
    for paths in meta.values():
        for path in paths:
            put(base / "images" / f"{path}.jpg")
    return [3, 3, 100]


def build_dtd(root, monkeypatch):
    data = root / "dtd" / "dtd"
    classes = raw_classes("dtd")
    (data / "labels").mkdir(parents=True)
    (data / "labels" / "test1.txt").write_text("\n".join(f"{c}/{c}_0001.jpg" for c in classes) + "\n")
    image = jpeg(0)
    for c in classes:
        put(data / "images" / c / f"{c}_0001.jpg", image)
    return list(range(47))


def build_pcam(root, monkeypatch):
    import h5py

    base = root / "pcam"
    base.mkdir()
    labels = [1, 0, 1]
    with h5py.File(base / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f["x"] = np.random.default_rng(0).integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)
    with h5py.File(base / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f["y"] = np.array(labels, dtype=np.uint8).reshape(3, 1, 1, 1)
    return labels


def build_tinyimagenet(root, monkeypatch):
    base = root / "tiny-imagenet-200"
    wnids = raw_classes("tinyimagenet")
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {i}, other name" for i, w in enumerate(wnids)) + "\n")
    rows = [("val_0.JPEG", wnids[7]), ("val_1.JPEG", wnids[199])]
    (base / "val" / "val_annotations.txt").write_text("\n".join(f"{f}\t{w}\t0\t0\t8\t8" for f, w in rows) + "\n")
    for f, _ in rows:
        put(base / "val" / "images" / f)
    return [7, 199]


def build_ucf101(root, monkeypatch, test_rows=None):
    """CoOp's UCF101: middle frames by class folder, and the split file whose rows are [path, label, class name].
    Every class has a training row (that is where most names come from); the test rows are the evaluated ones."""
    base = root / "ucf101"
    classes = raw_classes("ucf101")
    train = [[f"{c}/v_{c.replace('_', '')}_g08_c01.jpg", i, c] for i, c in enumerate(classes)]
    test = test_rows or [[f"{classes[y]}/v_{classes[y].replace('_', '')}_g01_c0{k}.jpg", y, classes[y]]
                         for k, y in enumerate([36, 0, 100, 36])]
    for path, _, _ in test:
        put(base / "UCF-101-midframes" / path)
    (base / "split_zhou_UCF101.json").write_text(json.dumps({"train": train, "val": [], "test": test}))
    return [y for _, y, _ in test]


def wnid_folders(base, wnids, per_class: int = 1) -> list[int]:
    """``base/<wnid>/*.JPEG``, ``per_class`` images each; the labels in ImageFolder's order (sorted wnids)."""
    for wnid in wnids:
        for k in range(per_class):
            put(base / wnid / f"{wnid}_{k}.JPEG")
    return [label for label in range(len(wnids)) for _ in range(per_class)]


def build_imagenet_a(root, monkeypatch):
    put(root / "imagenet-adversarial" / "imagenet-a" / "README.txt", b"not a class")  # shipped beside the classes
    return wnid_folders(root / "imagenet-adversarial" / "imagenet-a", raw_classes("imagenet_a"))


def build_imagenet_r(root, monkeypatch):
    put(root / "imagenet-rendition" / "imagenet-r" / "README.txt", b"not a class")
    return wnid_folders(root / "imagenet-rendition" / "imagenet-r", raw_classes("imagenet_r"))


def build_imagenet_v2(root, monkeypatch):
    # Folders 0..999 are ImageNet's class indices; they are walked in name order ("0", "1", "10", "100", ...).
    base = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for k in range(1000):
        put(base / str(k) / f"{k}.jpeg")
    return [int(name) for name in sorted(str(k) for k in range(1000))]


def build_imagenet_sketch(root, monkeypatch):
    return wnid_folders(root / "imagenet-sketch" / "images", raw_classes("imagenet_sketch"))


# build_eurosat is shared with test_dataset_rows.py, so it lives in testkit.
BUILDERS = {name[len("build_"):]: fn for name, fn in globals().items() if name.startswith("build_")}


def test_every_registered_dataset_has_a_fake_layout_test():
    assert set(BUILDERS) == set(DATASETS) == set(CLASS_COUNTS)


def test_class_name_lists_have_the_datasets_class_counts():
    curated = curated_class_names()
    for name, names_ in curated.items():
        assert len(names_) == CLASS_COUNTS[name] == DATASETS[name].num_classes, name
        assert all(isinstance(n, str) and n.strip() and "_" not in n for n in names_), name
    assert curated["country211"][:2] == ["Andorra", "United Arab Emirates"]  # names, not ISO codes
    assert curated["pcam"] == ["lymph node", "lymph node containing metastatic tumor tissue"]
    for name, count in CLASS_COUNTS.items():
        assert len(raw_classes(name)) == count, name
    assert "tinyimagenet" not in PAPER_AVERAGE_DATASETS and len(PAPER_AVERAGE_DATASETS) == 16


@pytest.fixture(scope="module")
def clip(random_clip_dir):
    return load_clip(f"local-dir:{random_clip_dir}")


# A few class names of each prompt set, written out: the TTC code's names ("paper") and the curated ones ("openai").
SPOT_NAMES = {
    "cifar100": {"paper": {1: "aquarium_fish"}, "openai": {1: "aquarium fish"}},
    "imagenet": {"paper": {0: "tench", 637: "mailbox", 638: "maillot", 998: "toilet tissue"},
                 "openai": {0: "tench", 638: "tights", 639: "one-piece bathing suit", 999: "toilet paper"}},
    "caltech101": {"paper": {0: "person", 1: "person", 2: "Leopards"},
                   "openai": {0: "off-center face", 1: "centered face"}},
    "caltech256": {"paper": {0: "ak47", 1: "american flag", 144: "motorbikes"},
                   "openai": {0: "ak47", 144: "motorbikes"}},
    "oxford_pets": {"paper": {1: "american bulldog"}, "openai": {1: "American Bulldog"}},
    "fgvc_aircraft": {"paper": {0: "boeing 707-320", 1: "boeing 727-200"}, "openai": {0: "707-320", 1: "727-200"}},
    "stanford_cars": {"paper": {0: "am general hummer suv"}, "openai": {0: "AM General Hummer SUV 2000"}},
    "country211": {"paper": {0: "Andorra", 210: "Zimbabwe"}, "openai": {0: "Andorra"}},
    "eurosat": {"paper": {0: "annualcrop"}, "openai": {0: "annual crop land"}},
    "pcam": {"paper": {0: "This is a photo of a healthy lymph node tissue."},
             "openai": {1: "lymph node containing metastatic tumor tissue"}},
    "tinyimagenet": {"paper": {0: "Egyptian cat", 7: tinyimagenet_paper_name(raw_classes("tinyimagenet")[7])},
                     "openai": {0: "Egyptian Mau"}},
    # CoOp's names with spaces for '_'; OpenAI's own spelling of one of them
    "ucf101": {"paper": {0: "Apply Eye Makeup", 36: "Handstand Pushups"},
               "openai": {0: "Apply Eye Makeup", 36: "Hand Stand Pushups"}},
    # ImageNet-A's first class is ImageNet's 7th (stingray); -R's first is ImageNet's 2nd (goldfish)
    "imagenet_a": {"paper": {0: "stingray"}, "openai": {0: "stingray"}},
    "imagenet_r": {"paper": {0: "goldfish", 2: "hammerhead"}, "openai": {0: "goldfish", 2: "hammerhead shark"}},
    # the TTC code's ImageNet names, and OpenAI's for the one synset their table lacks: no class is dropped
    "imagenet_v2": {"paper": {0: "tench", 637: "mailbox", 638: "tights", 639: "maillot", 999: "toilet tissue"},
                    "openai": {0: "tench", 638: "tights", 999: "toilet paper"}},
    "imagenet_sketch": {"paper": {638: "tights", 639: "maillot"}, "openai": {639: "one-piece bathing suit"}},
}


@pytest.mark.parametrize("name", sorted(CLASS_COUNTS))
def test_fake_layout_loads_with_labels_and_class_names(tmp_path, monkeypatch, clip, name):
    expected = BUILDERS[name](tmp_path, monkeypatch)
    fingerprints = {}
    for prompts in ("openai", "paper"):
        data = load_dataset(name, clip, tmp_path, download=False, prompts=prompts)
        names, templates = class_prompts(name, prompts)
        assert data.class_names == names and data.templates == tuple(templates)
        if prompts == "openai":
            assert data.templates == (OPENAI_TEMPLATE,)
        for label, text in SPOT_NAMES.get(name, {}).get(prompts, {}).items():
            assert data.class_names[label] == text, (prompts, label)
        assert data.randomness_key == name and data.describe()["fingerprint"] == data.fingerprint
        fingerprints[prompts] = data.fingerprint
        if name == "imagenet" and prompts == "paper":
            assert len(data.class_names) == 999  # the rest: test_paper_imagenet_is_the_ttc_codes_999_classes
            continue
        assert len(data.class_names) == CLASS_COUNTS[name]
        targets = data.targets
        if name == "sun397":  # its order is the file system's
            targets = [y for _, y in sorted(zip(data.files, data.targets, strict=True))]
        assert targets == expected
        assert data.image_ids == list(range(len(expected)))
        if data.files is not None:
            assert len(data.files) == len(data) and all(os.path.isfile(f) for f in data.files)
    assert (fingerprints["paper"] == fingerprints["openai"]) == (name != "imagenet")
    image, label = data.dataset[0]
    assert label == data.targets[0]
    assert image.shape == (3, 224, 224) and 0 <= image.min() and image.max() <= 1


def test_paper_imagenet_is_the_ttc_codes_999_classes(tmp_path, clip):
    wnids = raw_classes("imagenet")
    dropped = wnids.index(IMAGENET_DROPPED_WNID)
    # Two images in the dropped synset, and more than one in its neighbours and the last synset.
    labels = imagenet_layout(tmp_path, {wnids[dropped - 1]: 2, IMAGENET_DROPPED_WNID: 2, wnids[dropped + 1]: 3,
                                        wnids[-1]: 2})
    full = load_dataset("imagenet", clip, tmp_path, download=False, prompts="openai")
    paper = load_dataset("imagenet", clip, tmp_path, download=False)

    # openai: all 1000 classes and every image, in torchvision's order.
    assert len(full.class_names) == 1000 and full.class_names == curated_class_names()["imagenet"]
    assert full.targets == labels and full.image_ids == list(range(len(labels))) and len(full.files) == len(labels)

    # paper: exactly the dropped synset's images are gone; the others keep their torchvision index as id.
    kept = [i for i, y in enumerate(labels) if y != dropped]
    assert len(paper) == len(labels) - 2 and paper.image_ids == kept
    assert paper.files == [full.files[i] for i in kept]
    dropped_files = [f for f in full.files if f"/{IMAGENET_DROPPED_WNID}/" in f]
    assert [f for f in full.files if f not in paper.files] == dropped_files
    # Later classes move down by one; earlier ones stay; each label names its image's synset.
    assert len(paper.class_names) == 999
    assert paper.targets == [labels[i] - (labels[i] > dropped) for i in kept]
    assert paper.targets[paper.image_ids.index(kept[-1])] == 998
    for target, i in zip(paper.targets, paper.image_ids, strict=True):
        assert paper.class_names[target] == imagenet_paper_name(wnids[labels[i]])
    assert paper.class_names[dropped - 1 : dropped + 1] == ["mailbox", "maillot"]  # n03710193, n03710721
    # The images themselves come with the moved labels.
    for wnid in (wnids[dropped - 1], wnids[dropped + 1], wnids[-1]):
        k = next(k for k, f in enumerate(paper.files) if f"/{wnid}/" in f)
        image, label = paper.dataset[k]
        assert label == paper.targets[k] == labels[paper.image_ids[k]] - (wnid > IMAGENET_DROPPED_WNID)
        assert torch.equal(image, full.dataset[paper.image_ids[k]][0])
    assert paper.fingerprint != full.fingerprint and paper.randomness_key == full.randomness_key == "imagenet"


def test_a_copy_with_another_class_list_is_refused_naming_the_first_difference(tmp_path, monkeypatch, clip):
    swapped = raw_classes("cifar10")
    swapped[3], swapped[5] = swapped[5], swapped[3]
    build_cifar10(tmp_path, monkeypatch, label_names=swapped)
    for prompts in ("paper", "openai"):  # the prompts are matched to labels by position, whichever the set
        with pytest.raises(CounterattackError, match=r"cifar10's own class list does not match .* 10 classes, "
                           r"expected 10; first difference at index 3: expected 'cat', found 'dog'"):
            load_dataset("cifar10", clip, tmp_path, download=False, prompts=prompts)
    # A Caltech-256 copy with a renamed folder: same count and order, one name differs.
    build_caltech256(tmp_path / "other", monkeypatch, rename={"145.motorbikes-101": "145.motorbikes"})
    with pytest.raises(CounterattackError, match=r"first difference at index 144: expected '145\.motorbikes-101', "
                       r"found '145\.motorbikes'\."):
        load_dataset("caltech256", clip, tmp_path / "other", download=False)


@pytest.mark.parametrize("name", sorted(CLASS_COUNTS))
def test_missing_or_broken_layout_gives_a_clear_error(tmp_path, monkeypatch, clip, name):
    with pytest.raises(CounterattackError) as missing:
        load_dataset(name, clip, tmp_path / "empty", download=False)
    assert name in str(missing.value)
    if name in ("caltech101", "caltech256", "eurosat", "country211", "imagenet", "imagenet_a", "imagenet_r",
                "imagenet_v2", "imagenet_sketch"):
        return  # folder layouts: nothing but the folders to break
    BUILDERS[name](tmp_path, monkeypatch)
    indexes = (".txt", ".json", ".mat", ".bin", ".h5", "")
    for index in [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in indexes]:
        index.unlink()  # the labels and lists, without which the images mean nothing
    with pytest.raises(CounterattackError, match=f"Could not load {name}"):
        load_dataset(name, clip, tmp_path, download=False)


def test_readable_caltech256_names():
    assert readable("002.american-flag") == "american flag"
    assert readable("145.motorbikes-101") == "motorbikes"


def test_datasets_command_lists_every_dataset_and_what_is_present(tmp_path, monkeypatch, capsys):
    build_eurosat(tmp_path, monkeypatch)
    assert main(["datasets", "--data-root", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(CLASS_COUNTS)
    assert {r["name"]: r["num_classes"] for r in rows} == CLASS_COUNTS
    assert [r["name"] for r in rows if r["present"]] == ["eurosat"]
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    assert "imagefolder:DIR" in capsys.readouterr().out


def test_suite_runs_dataset_by_dataset_with_the_averages(tmp_path, monkeypatch, random_clip_dir, capsys):
    for build in (build_eurosat, build_dtd, build_tinyimagenet):
        build(tmp_path, monkeypatch)
    datasets, attacks, defenses = ["eurosat", "dtd", "tinyimagenet"], ["pgd", "cw", "worst-case"], ["none", "ttc"]
    out = tmp_path / "out"
    assert main(["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}",
                 "--data-root", str(tmp_path), "--dataset", "eurosat", "--dataset", "dtd", "--dataset", "tinyimagenet",
                 "--limit", "4", "--attack", "pgd,cw", "--attack-steps", "1", "--defense", "none,ttc",
                 "--ttc-steps", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [a["attack"] for a in results["config"]["attacks"]] == ["pgd", "cw"]
    # Per dataset: each attack, then the worst case over both; within each, the defenses.
    assert [(r["dataset"], r["attack"], r["defense"]) for r in results["records"]] == [
        (d, a, f) for d in datasets for a in attacks for f in defenses]
    assert {r["dataset"]: r["n"] for r in results["records"]} == {"eurosat": 4, "dtd": 4, "tinyimagenet": 2}
    records = {(r["dataset"], r["attack"], r["defense"]): r for r in results["records"]}
    for d in datasets:
        for f in defenses:  # robust under both attacks: no more than under either
            worst = records[d, "worst-case", f]["robust_acc"]
            assert worst <= min(records[d, a, f]["robust_acc"] for a in ("pgd", "cw"))
    averages = {(a["scope"], a["attack"], a["defense"]): a for a in results["average"]}
    assert set(averages) == {(s, a, f) for s in ("paper", "all") for a in attacks for f in defenses}
    for a in attacks:
        for f in defenses:
            paper, everything = averages["paper", a, f], averages["all", a, f]
            assert paper["datasets"] == 2 and everything["datasets"] == 3  # Tiny ImageNet is outside the paper's
            for key in ("clean_acc", "robust_acc"):
                assert paper[key] == pytest.approx(sum(records[d, a, f][key] for d in datasets[:2]) / 2)
                assert everything[key] == pytest.approx(sum(records[d, a, f][key] for d in datasets) / 3)
    printed = capsys.readouterr().out
    header = "| defense | eurosat | dtd | tinyimagenet | average, paper's datasets (2 of 16) | average, all (3) |"
    sections = ["### Clean accuracy (%)", "### Robust accuracy (%), attack pgd", "### Robust accuracy (%), attack cw",
                "### Robust accuracy (%), attack worst-case"]
    assert [printed.index(s) for s in sections] == sorted(printed.index(s) for s in sections)
    assert printed.count(header) == len(sections)
    for a in attacks:
        # Each dataset's accuracy with its 95% interval; the averages have none.
        cells = [f"{records[d, a, 'ttc']['robust_acc']:.2f} ({records[d, a, 'ttc']['robust_ci95'][0]:.1f}–"
                 f"{records[d, a, 'ttc']['robust_ci95'][1]:.1f})" for d in datasets]
        cells += [f"{averages[scope, a, 'ttc']['robust_acc']:.2f}" for scope in ("paper", "all")]
        assert "| ttc | " + " | ".join(cells) + " |" in printed
    assert (out / "report.md").read_text().count(header) == len(sections)


def test_all_expands_to_every_dataset(tmp_path, random_clip_dir, capsys):
    assert main(["eval", "--model", f"local-dir:{random_clip_dir}", "--data-root", str(tmp_path / "none"),
                 "--dataset", "all", "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert "imagenet, stanford_cars, sun397, eurosat, ucf101, imagenet_sketch are not under" in error
    assert "image-net.org" in error and "split_zhou_UCF101.json" in error


# --- R-TPT's datasets: what their layouts add to the folders above --------------------------------------------------

def test_imagenet_v2s_label_is_its_folders_number(tmp_path, monkeypatch, clip):
    build_imagenet_v2(tmp_path, monkeypatch)
    data = load_dataset("imagenet_v2", clip, tmp_path, download=False, prompts="openai")
    curated = curated_class_names()["imagenet"]
    for folder in ("0", "10", "100", "999"):  # ImageFolder's own numbering would give folder "10" label 2
        (k,) = [k for k, f in enumerate(data.files) if f"/{folder}/" in f]
        assert data.targets[k] == int(folder) and data.class_names[data.targets[k]] == curated[int(folder)]
    base = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    os.rename(base / "999", base / "n15075141")  # a folder renamed by hand: the numbers no longer say the class
    with pytest.raises(CounterattackError, match=r"should hold the folders 0 to 999 .* found 1000 folders, "
                       r"unexpected: n15075141, missing: 999"):
        load_dataset("imagenet_v2", clip, tmp_path, download=False)


def test_ucf101_evaluates_the_test_rows_named_by_the_split_file(tmp_path, monkeypatch, clip):
    labels = build_ucf101(tmp_path, monkeypatch)
    data = load_dataset("ucf101", clip, tmp_path, download=False)
    assert data.targets == labels == [36, 0, 100, 36] and len(data.class_names) == 101
    assert [f.split("UCF-101-midframes/")[1] for f in data.files] == [
        "Handstand_Pushups/v_HandstandPushups_g01_c00.jpg", "Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg",
        "Yo_Yo/v_YoYo_g01_c02.jpg", "Handstand_Pushups/v_HandstandPushups_g01_c03.jpg"]
    # A split file naming one label two ways cannot say which prompt its images belong to.
    other = tmp_path / "other"
    build_ucf101(other, monkeypatch, test_rows=[["Archery/a.jpg", 2, "Archery"], ["Archery/b.jpg", 2, "Arching"]])
    with pytest.raises(CounterattackError, match=r"Could not load ucf101 .* names label 2 both 'Archery' and "
                       r"'Arching'.*split_zhou_UCF101\.json"):
        load_dataset("ucf101", clip, other, download=False)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_imagenet_a_is_downloaded_and_unpacked_where_coop_keeps_it(tmp_path, monkeypatch, clip):
    """The real download code against a local web server holding a tar laid out as Hendrycks' imagenet-a.tar."""
    served = tmp_path / "served"
    build_imagenet_a(served, monkeypatch)
    with tarfile.open(tmp_path / "imagenet-a.tar", "w") as archive:
        archive.add(served / "imagenet-adversarial" / "imagenet-a", arcname="imagenet-a")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        row = DATASETS["imagenet_a"]
        url = f"http://127.0.0.1:{server.server_address[1]}/imagenet-a.tar"
        assert row.loader.kwargs["url"] == IMAGENET_A_URL and IMAGENET_A_URL.endswith("/imagenet-a.tar")
        loader = dataclasses.replace(row.loader, kwargs={**row.loader.kwargs, "url": url})
        monkeypatch.setitem(DATASETS, "imagenet_a", dataclasses.replace(row, loader=loader))
        root = tmp_path / "root"
        data = load_dataset("imagenet_a", clip, root, download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert (root / "imagenet-adversarial" / "imagenet-a" / "README.txt").is_file()
    assert data.targets == list(range(200)) and data.class_names[0] == "stingray"
    assert data.fingerprint == load_dataset("imagenet_a", clip, served, download=False).fingerprint


# --- identity: the bytes of the files that hold the images ------------------------------------------------------------

def test_a_registered_dataset_is_identified_by_the_bytes_of_its_files(tmp_path, monkeypatch, clip):
    build_eurosat(tmp_path, monkeypatch)  # one file per image
    build_cifar10(tmp_path, monkeypatch)  # every image in one file
    before = {name: load_dataset(name, clip, tmp_path, download=False) for name in ("eurosat", "cifar10")}

    first, second = (tmp_path / "eurosat" / "2750" / c / f"{c}_1.jpg" for c in raw_classes("eurosat")[:2])
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
    first.write_bytes(second_bytes)
    second.write_bytes(first_bytes)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    stored = pickle.load(open(batch, "rb"))
    stored["data"] = stored["data"][::-1].copy()  # the same pixels, the images in another order: the same size
    pickle.dump(stored, open(batch, "wb"))

    for name, old in before.items():
        new = load_dataset(name, clip, tmp_path, download=False)
        assert new.targets == old.targets and new.randomness_key == old.randomness_key == name
        assert new.fingerprint != old.fingerprint, name


def test_a_listed_image_that_is_missing_leaves_the_decode_check_to_report_it(tmp_path, monkeypatch, clip):
    build_dtd(tmp_path, monkeypatch)
    missing = tmp_path / "dtd" / "dtd" / "images" / "banded" / "banded_0001.jpg"
    missing.unlink()
    data = load_dataset("dtd", clip, tmp_path, download=False)
    (index,) = [k for k, f in enumerate(data.files) if f == str(missing)]
    assert list(find_unreadable(data, range(len(data)), progress=False)) == [index]


@pytest.mark.parametrize("name, class_folder", [
    ("eurosat", "eurosat/2750/Forest"), ("imagenet_r", "imagenet-rendition/imagenet-r/n01443537"),
])
def test_a_link_loop_in_a_registered_folder_dataset_is_refused(tmp_path, monkeypatch, clip, name, class_folder):
    BUILDERS[name](tmp_path, monkeypatch)
    os.symlink("..", tmp_path / class_folder / "up")  # torchvision's ImageFolder would count its images again
    with pytest.raises(CounterattackError, match=f"{tmp_path / class_folder / 'up'} leads back to"):
        load_dataset(name, clip, tmp_path, download=False)
