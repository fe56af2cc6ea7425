"""A dataset is one row of the registry: a row added at runtime, with a fake layout on disk and nothing shipped
for it, loads with the class names and templates its row gives, stays out of the paper's average unless it says
otherwise, and the prompts command explains instead of failing. The rows of the 22 registered datasets are what
the other dataset and prompt tests check."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets as tv

from counterattack import CounterattackError, load_clip, load_dataset
from counterattack.cli import main
from counterattack.data import DATASETS, PAPER_AVERAGE_DATASETS, DatasetInfo
from counterattack.data.prompts import (
    OPENAI_TEMPLATE, PAPER_TEMPLATE, check_own_classes, class_prompts, clean, prompt_class_indices, raw_classes,
)
from counterattack.data.registry import Loader

from testkit import build_eurosat

# An image-folder dataset described by its row alone: torchvision's ImageFolder under shapes/test/<class>/.
SHAPES = DatasetInfo("shapes", 3, 5, "test", "shapes/test", Loader(tv.ImageFolder, subdir="shapes/test"),
                     "made by the test", in_paper_average=False, downloadable=False)
IMAGES = {"circle": 2, "sea_lion": 1, "Square-ish": 2}
OWN = ["Square-ish", "circle", "sea_lion"]  # ImageFolder's order: sorted, upper case first
TARGETS = [0, 0, 1, 1, 2]


def build_shapes(root) -> None:
    rng = np.random.default_rng(0)
    for name, count in IMAGES.items():
        (root / "shapes" / "test" / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "shapes" / "test" / name / f"{i}.png")


@pytest.fixture(scope="module")
def clip(random_clip_dir):
    return load_clip(f"local-dir:{random_clip_dir}")


def test_a_row_must_say_whether_it_counts_in_the_papers_average():
    with pytest.raises(TypeError, match="in_paper_average"):
        DatasetInfo("x", 2, 2, "test", "x", Loader(tv.ImageFolder), "made by hand", downloadable=False)
    assert PAPER_AVERAGE_DATASETS == tuple(name for name, info in DATASETS.items() if info.in_paper_average)
    assert [name for name, info in DATASETS.items() if not info.in_paper_average] == [
        "tinyimagenet", "ucf101", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"]


def test_a_dataset_added_as_one_row_works_end_to_end(tmp_path, monkeypatch, clip, capsys):
    before = list(DATASETS)
    build_shapes(tmp_path)
    with monkeypatch.context() as patch:
        patch.setitem(DATASETS, "shapes", SHAPES)
        assert list(DATASETS) == [*before, "shapes"] and "shapes" not in PAPER_AVERAGE_DATASETS

        # Loaded with the row's defaults: the own names as they are, the TTC code's template; openai the same names.
        for prompts, template in (("paper", PAPER_TEMPLATE), ("openai", OPENAI_TEMPLATE)):
            data = load_dataset("shapes", clip, tmp_path, download=False, prompts=prompts)
            assert data.class_names == OWN and data.templates == (template,)
            assert data.targets == TARGETS and data.image_ids == list(range(5)) and data.randomness_key == "shapes"
            assert [f.split("/test/")[1].split("/")[0] for f in data.files] == [OWN[y] for y in TARGETS]
            image, label = data.dataset[2]
            assert label == 1 and image.shape == (3, 224, 224)
        assert class_prompts("shapes", "paper", OWN) == (OWN, [PAPER_TEMPLATE])
        check_own_classes("shapes", ["anything"])  # nothing shipped to compare with: the loaded list is the truth

        # Nothing ships for it, so its prompts are known once loaded: one line, no traceback.
        with pytest.raises(CounterattackError, match="known once its data is loaded"):
            class_prompts("shapes")
        with pytest.raises(CounterattackError, match="No class list of shapes"):
            raw_classes("shapes")
        assert main(["prompts", "shapes"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "Traceback" not in captured.err
        assert captured.err.splitlines() == [("counterattack: error: No class list of shapes ships with the package "
                                              "(raw_classes.json): its classes are known once its data is loaded.")]

        assert main(["datasets", "--data-root", str(tmp_path), "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows[-1] == {"name": "shapes", "num_classes": 3, "test_size": 5, "split": "test", "present": True,
                            "downloadable": False}
    assert list(DATASETS) == before and "shapes" not in DATASETS


def test_a_new_rows_paper_rule_template_and_dropped_class_apply(tmp_path, monkeypatch, clip):
    build_shapes(tmp_path)
    row = dataclasses.replace(SHAPES, paper_rule=clean, paper_template="A drawing of a {}.", paper_dropped=("circle",))
    monkeypatch.setitem(DATASETS, "shapes", row)
    full = load_dataset("shapes", clip, tmp_path, download=False, prompts="openai")
    paper = load_dataset("shapes", clip, tmp_path, download=False)
    assert full.class_names == OWN and full.targets == TARGETS
    assert prompt_class_indices("shapes", "paper", OWN) == [0, 2]
    assert prompt_class_indices("shapes", "openai", OWN) == [0, 1, 2]
    # The circles are gone with their class; sea_lion moves down to label 1; the ids stay the full dataset's.
    assert paper.class_names == ["square ish", "sea lion"] and paper.templates == ("A drawing of a {}.",)
    assert paper.image_ids == [0, 1, 4] and paper.targets == [0, 0, 1]
    assert paper.files == [full.files[i] for i in (0, 1, 4)] and paper.fingerprint != full.fingerprint
    assert [paper.dataset[k][1] for k in range(3)] == [0, 0, 1]


def test_a_new_dataset_stays_out_of_the_papers_average_in_an_evaluation(tmp_path, monkeypatch, random_clip_dir, capsys):
    build_shapes(tmp_path)
    build_eurosat(tmp_path, monkeypatch)
    monkeypatch.setitem(DATASETS, "shapes", SHAPES)
    out = tmp_path / "out"
    assert main(["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}",
                 "--data-root", str(tmp_path), "--dataset", "eurosat", "--dataset", "shapes", "--limit", "4",
                 "--attack-steps", "1", "--defense", "none", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["dataset"]: r["n"] for r in results["records"]} == {"eurosat": 4, "shapes": 4}
    assert {a["scope"]: a["datasets"] for a in results["average"]} == {"paper": 1, "all": 2}
    assert "average, paper's datasets (1 of 16)" in capsys.readouterr().out
