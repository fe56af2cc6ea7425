"""What a run keeps of a few images for the HTML report: a class-balanced sample, every defense's view of each input,
lossless pictures, nothing when asked for none."""

import pytest
import torch

from counterattack import ZeroShotClassifier, load_clip
from counterattack.cli import main
from counterattack.data import load_dataset
from counterattack.gallery import read_gallery

from testkit import part_batches, write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), {"cat": 4, "dog": 4, "owl": 4}, seed=2)


def run(model_dir, folder, out, *extra) -> int:
    return main(["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{model_dir}", "--dataset",
                 f"imagefolder:{folder}", "--attack-steps", "2", "--defense", "none,ttc", "--batch-size", "5",
                 "--out", str(out), *map(str, extra)])


def test_the_gallery_holds_a_balanced_sample_with_every_view(tmp_path, random_clip_dir, folder):
    assert run(random_clip_dir, folder, tmp_path / "out", "--gallery", 6) == 0
    class_names, items = read_gallery(tmp_path / "out")
    assert sorted(item.image_id for item in items) == sorted(f"{c}/{i:04d}.png" for c in ("cat", "dog", "owl")
                                                             for i in range(2))
    (dataset,) = class_names
    assert class_names[dataset] == ["cat", "dog", "owl"]
    clip = load_clip(f"local-dir:{random_clip_dir}")
    data = load_dataset(dataset, clip)
    classifier = ZeroShotClassifier.from_clip(clip, data.class_names, data.templates)
    for item in items:
        index = data.image_ids.index(item.image_id)
        pixels, label = data.dataset[index]
        assert torch.equal(item.clean, pixels) and item.label == label  # lossless: the very pixels evaluated
        views = {(v.defense, v.input): v for v in item.views}
        assert set(views) == {("none", "clean"), ("none", "pgd"), ("ttc", "clean"), ("ttc", "pgd")}
        for view in views.values():
            with torch.no_grad():
                bare = classifier.logits(view.image[None]).softmax(-1)[0]
            assert view.bare_pred == int(bare.argmax()) and view.bare_prob == pytest.approx(float(bare.max()), abs=1e-5)
            assert 0 <= view.label_prob <= view.prob <= 1  # the prediction is the most probable class
        none, ttc = views[("none", "pgd")], views[("ttc", "pgd")]
        assert none.pred == none.bare_pred and none.defended is None and none.score is None  # no defense, no change
        assert ttc.defended is not None and (ttc.defended - ttc.image).abs().max() <= 4 / 255 + 1e-6
        assert isinstance(ttc.score, float) and isinstance(ttc.flagged, bool)
        assert (ttc.image - item.clean).abs().max() <= 1 / 255 + 1e-6  # the adversarial image, within the budget


def test_no_gallery_when_asked_for_none(tmp_path, random_clip_dir, folder):
    assert run(random_clip_dir, folder, tmp_path / "out", "--gallery", 0, "--limit", 3) == 0
    assert not (tmp_path / "out" / "gallery").exists() and read_gallery(tmp_path / "out") == ({}, [])


def test_an_adaptive_runs_gallery_shows_the_component_each_defense_failed_first(tmp_path, random_clip_dir, folder):
    """As the record counts an image: the first component (transfer, then the adaptive ones) the defense fails, else
    the last."""
    assert run(random_clip_dir, folder, tmp_path / "out", "--gallery", 3, "--limit", 3, "--threat", "adaptive",
               "--convergence-images", 0) == 0
    _, items = read_gallery(tmp_path / "out")
    predictions = {}  # (defense, image id) -> component -> prediction, as the batch records hold them
    for batch in part_batches(tmp_path / "out"):
        for name, result in batch["defenses"].items():
            for row, image_id in enumerate(batch["ids"]):
                predictions[(name, image_id)] = {part: results["pred"][row]
                                                 for part, results in result["adv"]["pgd"]["components"].items()}
    for item in items:
        for view in item.views:
            if view.input == "pgd":
                components = predictions[(view.defense, item.image_id)]
                failed = [part for part, pred in components.items() if pred != item.label]
                assert view.component == (failed[0] if failed else list(components)[-1])
                assert view.pred == components[view.component]
