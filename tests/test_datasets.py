"""Every dataset of the benchmark on a tiny fake copy of its on-disk layout (torchvision's own test
strategy): the loader finds the files, yields the right labels and the right number of class names,
and a broken layout gives a clear error."""

import io
import json
import pickle

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets as tv

from counterattack import CounterattackError, load_clip, load_dataset
from counterattack.cli import main
from counterattack.data import DATASETS
from counterattack.data.registry import curated_class_names, readable

PAPER_COUNTS = {
    "cifar10": 10, "cifar100": 100, "stl10": 10, "imagenet": 1000, "caltech101": 101, "caltech256": 257,
    "oxford_pets": 37, "flowers102": 102, "fgvc_aircraft": 100, "stanford_cars": 196, "sun397": 397,
    "country211": 211, "food101": 101, "eurosat": 10, "dtd": 47, "pcam": 2, "tinyimagenet": 200,
}


def jpeg(seed: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def put(path, data: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or jpeg(hash(path.name) % 1000))


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


# Each builder lays out the dataset under root and returns the labels it should load, in order.
def build_cifar10(root, monkeypatch):
    monkeypatch.setattr(tv.cifar, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    base = root / "cifar-10-batches-py"
    base.mkdir()
    labels = [3, 1, 4, 1, 5, 9]
    data = np.random.default_rng(0).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    pickle.dump({"data": data, "labels": labels}, open(base / "test_batch", "wb"))
    pickle.dump({"label_names": names("c", 10)}, open(base / "batches.meta", "wb"))
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        put(base / name, b"x")
    return labels


def build_cifar100(root, monkeypatch):
    monkeypatch.setattr(tv.cifar, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    base = root / "cifar-100-python"
    base.mkdir()
    labels = [0, 99, 42]
    data = np.random.default_rng(0).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    pickle.dump({"data": data, "fine_labels": labels}, open(base / "test", "wb"))
    pickle.dump({"fine_label_names": names("c", 100)}, open(base / "meta", "wb"))
    put(base / "train", b"x")
    return labels


def build_stl10(root, monkeypatch):
    monkeypatch.setattr(tv.stl10, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    base = root / "stl10_binary"
    base.mkdir()
    labels = [2, 0, 9]
    np.random.default_rng(0).integers(0, 256, size=len(labels) * 3 * 96 * 96, dtype=np.uint8).tofile(base / "test_X.bin")
    (np.array(labels, dtype=np.uint8) + 1).tofile(base / "test_y.bin")
    (base / "class_names.txt").write_text("\n".join(names("c", 10)))
    for name in ("train_X.bin", "train_y.bin", "unlabeled_X.bin"):
        put(base / name, b"x")
    return labels


def build_imagenet(root, monkeypatch):
    base = root / "imagenet"
    wnids = [f"n{i:08d}" for i in range(1000)]
    base.mkdir()
    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, []), base / "meta.bin")
    for i, wnid in enumerate(wnids):
        put(base / "val" / wnid / f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(0))
    return list(range(1000))


def build_caltech101(root, monkeypatch):
    base = root / "caltech101" / "101_ObjectCategories"
    categories = sorted(["Faces", "Faces_easy", "Leopards", "Motorbikes"] + names("cat", 97))
    put(base / "BACKGROUND_Google" / "image_0001.jpg")
    labels = []
    for i, category in enumerate(categories):
        (base / category).mkdir(parents=True)
        if i % 50 == 0:
            put(base / category / "image_0001.jpg", jpeg(i, "L"))  # grayscale, as some Caltech images are
            labels.append(i)
    return labels


def build_caltech256(root, monkeypatch):
    base = root / "caltech256" / "256_ObjectCategories"
    labels = []
    for i in range(257):
        folder = base / f"{i + 1:03d}.{'motorbikes-101' if i == 144 else f'thing-{i}'}"
        folder.mkdir(parents=True)
        if i in (0, 144, 256):
            put(folder / f"{i + 1:03d}_0001.jpg", jpeg(i, "CMYK"))
            labels.append(i)
    return labels


def build_oxford_pets(root, monkeypatch):
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    lines, labels = [], []
    for i in range(37):
        image_id = f"breed_{i:02d}_1"
        put(base / "images" / f"{image_id}.jpg")
        lines.append(f"{image_id} {i + 1} 1 1")
        labels.append(i)
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    return labels


def build_flowers102(root, monkeypatch):
    monkeypatch.setattr(tv.flowers102, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    base = root / "flowers-102"
    labels = [5, 101, 0]
    for i in range(1, 4):
        put(base / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(labels) + 1})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([9]), "valid": np.array([8]), "tstid": np.array([1, 2, 3])})
    return labels


def build_fgvc_aircraft(root, monkeypatch):
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4"] + names("variant", 98)
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    (data / "images_variant_test.txt").write_text("0001 A300B4\n0002 707-320\n")
    for image in ("0001", "0002"):
        put(data / "images" / f"{image}.jpg")
    return [1, 0]


def build_stanford_cars(root, monkeypatch):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names("car", 196), dtype=object)})
    annotations = np.array([("00001.jpg", 7), ("00002.jpg", 196)], dtype=[("fname", object), ("class", object)])
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    for image in ("00001.jpg", "00002.jpg"):
        put(base / "cars_test" / image)
    return [6, 195]


def build_sun397(root, monkeypatch):
    base = root / "SUN397"
    classes = [f"/{c[0]}/{c}" for c in names("s", 396)] + ["/s/swimming_pool/outdoor"]
    base.mkdir()
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    put(base / "s" / "swimming_pool" / "outdoor" / "sun_a.jpg")
    return [396]


def build_country211(root, monkeypatch):
    codes = sorted(f"{a}{b}" for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for b in "ABCDEFGHI")[:211]
    for i, code in enumerate(codes):
        put(root / "country211" / "test" / code / f"{i}.jpg", jpeg(0))
    return list(range(211))


def build_food101(root, monkeypatch):
    base = root / "food-101"
    classes = names("dish_", 101)
    meta = {c: [f"{c}/{i}"] if i < 2 else [] for i, c in enumerate(classes)}
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "test.json").write_text(json.dumps(meta))
    for i in range(2):
        put(base / "images" / classes[i] / f"{i}.jpg")
    return [0, 1]


def build_eurosat(root, monkeypatch):
    classes = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
               "PermanentCrop", "Residential", "River", "SeaLake"]
    for i, c in enumerate(classes):
        put(root / "eurosat" / "2750" / c / f"{c}_1.jpg", jpeg(i))
    return list(range(10))


def build_dtd(root, monkeypatch):
    data = root / "dtd" / "dtd"
    classes = curated_class_names()["dtd"]
    (data / "labels").mkdir(parents=True)
    (data / "labels" / "test1.txt").write_text("\n".join(f"{c}/{c}_0001.jpg" for c in classes) + "\n")
    for c in classes:
        put(data / "images" / c / f"{c}_0001.jpg", jpeg(0))
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
    wnids = [f"n{i:08d}" for i in range(200)]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {i}, other name" for i, w in enumerate(wnids)) + "\n")
    rows = [("val_0.JPEG", wnids[7]), ("val_1.JPEG", wnids[199])]
    (base / "val" / "val_annotations.txt").write_text("\n".join(f"{f}\t{w}\t0\t0\t8\t8" for f, w in rows) + "\n")
    for f, _ in rows:
        put(base / "val" / "images" / f)
    return [7, 199]


BUILDERS = {name[len("build_"):]: fn for name, fn in globals().items() if name.startswith("build_")}


def test_every_registered_dataset_has_a_fake_layout_test():
    assert set(BUILDERS) == set(DATASETS) == set(PAPER_COUNTS)


def test_class_name_lists_have_the_datasets_class_counts():
    curated = curated_class_names()
    for name, names_ in curated.items():
        assert len(names_) == PAPER_COUNTS[name] == DATASETS[name].num_classes, name
        assert all(isinstance(n, str) and n.strip() and "_" not in n for n in names_), name
    assert curated["country211"][:2] == ["Andorra", "United Arab Emirates"]  # names, not ISO codes
    assert curated["pcam"] == ["lymph node", "lymph node containing metastatic tumor tissue"]


@pytest.fixture(scope="module")
def clip(random_clip_dir):
    return load_clip(f"local-dir:{random_clip_dir}")


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_fake_layout_loads_with_labels_and_class_names(tmp_path, monkeypatch, clip, name):
    expected = BUILDERS[name](tmp_path, monkeypatch)
    data = load_dataset(name, clip, tmp_path, download=False)
    assert data.targets == expected
    assert len(data.class_names) == PAPER_COUNTS[name]
    image, label = data.dataset[0]
    assert label == expected[0]
    assert image.shape == (3, 224, 224) and 0 <= image.min() and image.max() <= 1
    if name == "caltech256":
        assert data.class_names[0] == "thing 0" and data.class_names[144] == "motorbikes"
    if name == "fgvc_aircraft":
        assert data.class_names[:2] == ["707-320", "A300B4"]
    if name == "tinyimagenet":
        assert data.class_names[7] == "thing 7"


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_missing_or_broken_layout_gives_a_clear_error(tmp_path, monkeypatch, clip, name):
    with pytest.raises(CounterattackError) as missing:
        load_dataset(name, clip, tmp_path / "empty", download=False)
    assert name in str(missing.value)
    if name in ("caltech101", "caltech256", "eurosat", "country211", "imagenet"):
        return  # folder layouts: nothing but the folders to break
    BUILDERS[name](tmp_path, monkeypatch)
    for index in [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".txt", ".json", ".mat", ".bin", ".h5", "")]:
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
    assert [r["name"] for r in rows] == list(PAPER_COUNTS)
    assert {r["name"]: r["num_classes"] for r in rows} == PAPER_COUNTS
    assert [r["name"] for r in rows if r["present"]] == ["eurosat"]
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    assert "imagefolder:DIR" in capsys.readouterr().out


def test_suite_runs_dataset_by_dataset_with_the_average(tmp_path, monkeypatch, random_clip_dir, capsys):
    build_eurosat(tmp_path, monkeypatch)
    build_dtd(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert main(["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}",
                 "--data-root", str(tmp_path), "--dataset", "eurosat", "--dataset", "dtd", "--limit", "10",
                 "--attack-steps", "1", "--defense", "none,ttc", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["dataset"], r["defense"]) for r in results["records"]] == [
        ("eurosat", "none"), ("eurosat", "ttc"), ("dtd", "none"), ("dtd", "ttc")]
    average = {a["defense"]: a for a in results["average"]}
    records = {(r["dataset"], r["defense"]): r for r in results["records"]}
    assert average["ttc"]["datasets"] == 2
    assert average["ttc"]["robust_acc"] == pytest.approx((records["eurosat", "ttc"]["robust_acc"] + records["dtd", "ttc"]["robust_acc"]) / 2)
    printed = capsys.readouterr().out
    assert "| defense | eurosat | dtd | average |" in printed


def test_all_expands_to_every_dataset(tmp_path, random_clip_dir, capsys):
    assert main(["eval", "--model", f"local-dir:{random_clip_dir}", "--data-root", str(tmp_path / "none"),
                 "--dataset", "all", "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert "imagenet, stanford_cars, sun397, eurosat are not under" in error and "image-net.org" in error
