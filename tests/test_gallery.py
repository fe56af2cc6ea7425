"""What a run keeps of a few images for the HTML report: a class-balanced sample, every defense's view of each input,
lossless pictures, nothing when asked for none."""

import json

import pytest
import torch
from safetensors.torch import save_file

from counterattack import CounterattackError, ImageRandomness, ZeroShotClassifier, count_encoder_passes, load_clip
from counterattack.augment import straight_through
from counterattack.augmix import draw_views as augmix_draws, render_views
from counterattack.cli import main
from counterattack.data import load_dataset
from counterattack.defenses import _dbd_views as dbd_views
from counterattack.defenses.agc import AGC
from counterattack.defenses.base import SHOWN_VIEWS
from counterattack.defenses.clipure import CLIPure, blank_prompt_embedding, purified_logits
from counterattack.defenses.clipure import purify as clipure_purify
from counterattack.defenses.cola import COLA
from counterattack.defenses.dbd import DBD
from counterattack.defenses.mac import MAC
from counterattack.defenses.rtpt import RTPT, reliability_weights
from counterattack.defenses.ttc import TTC
from counterattack.defenses.tte import TransformEnsemble, default_transforms
from counterattack.descriptions import read_descriptions
from counterattack.gallery import Item, add_views, read_gallery, write_batch, write_index

from testkit import CIFAR10_CLASSES, part_batches, write_descriptions, write_image_folder


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


# --- what a defense that changes no pixel hands the gallery: its views, how far it moved the feature -------------


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Degrees between rows, by arccos of the float64 cosine (the library takes another formula)."""
    cosine = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.rad2deg(torch.arccos(cosine.clamp(-1, 1)))


def streams(n: int) -> ImageRandomness:
    return ImageRandomness.from_seed(3, n, "gallery")


def tte_case(classifier, x):
    """TTE draws nothing: its 10 flips and shifts recomputed from the image, its logits their mean."""
    transforms = default_transforms(x.shape[-1])
    logits = torch.stack([classifier.logits(t(x)) for t in transforms]).mean(dim=0)
    return TransformEnsemble(), [transforms[k](x) for k in (1, 4, 6, 9)], 10, None, logits, (10, 0)


def mac_case(classifier, x):
    """MAC's defended views (the image and one augmentation, each counterattacked): those it classifies."""
    mac = MAC(steps=2)
    result = mac.counterattack(classifier, x, streams(len(x)))
    defended = result.defended.view(len(x), 2, *x.shape[1:])
    logits = classifier.logits(result.defended).view(len(x), 2, -1).mean(dim=1)
    return mac, [defended[:, 0], defended[:, 1]], 2, None, logits, (2 * 5, 2 * 2)


def dbd_case(classifier, x):
    """DBD's first crop, JPEG at 50, first noisy view and median filter, drawn again from the same streams; f*'s angle
    to e_0 from the features."""
    dbd = DBD()
    draw = dbd_views.draw_views(streams(len(x)), x)
    crops, pixels = dbd_views.crop_views(x, draw, classifier.encoder.image_size), dbd_views.pixel_views(x, draw)
    result = dbd.directional_bias(classifier, x, streams(len(x)))
    f = result.defended
    logits = classifier.logit_scale * (f / (f.norm(dim=-1, keepdim=True) + 1e-8)) @ dbd.class_embeddings(classifier).T
    return dbd, [crops[:, 0], pixels[:, 3], pixels[:, 6], pixels[:, 12]], 32, angle(f, result.features[:, 0]), \
        logits, (32, 0)


def agc_case(classifier, x):
    """AGC's warps spread over its 32, drawn again; g lies beta * theta from a_0 along the great circle."""
    agc = AGC()
    warps = agc.warped_views(x, streams(len(x))).view(len(x), 32, *x.shape[1:])
    correction = agc.correction(classifier, x, streams(len(x)))
    assert (correction.beta * correction.theta < torch.pi).all()
    shift = torch.rad2deg((correction.beta * correction.theta).double())
    return agc, [warps[:, k] for k in (0, 10, 21, 31)], 33, shift, \
        classifier.logits_from_embeddings(correction.corrected), (33, 0)


def clipure_case(classifier, x):
    """CLIPure keeps no view: the angle from normalise(f(x)) to its purified z (after an odd number of steps, about 88
    degrees: after an even number most images return to where they started)."""
    start = torch.nn.functional.normalize(classifier.encode_image(x).float(), dim=-1)
    purified = clipure_purify(start, blank_prompt_embedding(classifier), 9, 30.0).detach()
    shift = angle(purified, start)
    assert (shift > 45).all()
    return CLIPure(steps=9), None, None, shift, purified_logits(classifier, purified), (1, 0)


def cola_case(classifier, x):
    """COLA's four crops (its first view is the image), drawn again; the transport on their features."""
    cola = COLA(prompts=4, subspace=8)
    views = cola.draw_views(x, streams(len(x)))
    features = torch.nn.functional.normalize(classifier.encoder(views.flatten(0, 1)).float(), dim=-1).view(
        len(x), 5, -1)
    logits = cola.transport_logits(classifier, features, cola.text_support(classifier))
    return cola, [views[:, k] for k in (1, 2, 3, 4)], 5, None, logits, (5, 0)


def rtpt_case(classifier, x):
    """R-TPT's four views its reliability weights weigh most, heaviest first."""
    rtpt = RTPT(views=10, neighbours=3)
    views = render_views(x, augmix_draws(streams(len(x)), 10, 1.0, x.device))
    features = torch.nn.functional.normalize(classifier.encode_image(views.flatten(0, 1)).float(), dim=-1).view(
        len(x), 10, -1)
    weights = reliability_weights(features, 3, 0.01)
    order = weights.argsort(dim=1, descending=True, stable=True)[:, :4]
    heaviest = views[torch.arange(len(x))[:, None], order]
    return rtpt, list(heaviest.unbind(1)), 10, None, None, (10, 0)


CASES = {"tte": tte_case, "mac": mac_case, "dbd": dbd_case, "agc": agc_case, "clipure": clipure_case,
         "cola": cola_case, "rtpt": rtpt_case}


@pytest.fixture(scope="module")
def described(random_classifier, tmp_path_factory):
    """The random tiny CLIP with class descriptions, for COLA."""
    path = write_descriptions(tmp_path_factory.mktemp("descriptions") / "cifar10.json", CIFAR10_CLASSES, 6)
    return ZeroShotClassifier.from_clip(random_classifier.clip, CIFAR10_CLASSES, descriptions=read_descriptions(path))


@pytest.mark.parametrize("name", list(CASES))
def test_a_defense_that_changes_no_pixel_keeps_the_views_it_classified_and_its_feature_move(name, described, images):
    """The views equal those recomputed independently from the same streams, the angle the features', and the logits
    and counted passes are those of the computation written out (the new fields cost nothing)."""
    x = images[:3]
    with torch.no_grad():
        defense, views, count, shift, logits, (forwards, backwards) = CASES[name](described, x)
    with count_encoder_passes() as passes:
        output = defense(described, x, streams(len(x)))
    assert (passes.forwards, passes.backwards) == (forwards * len(x), backwards * len(x))
    if logits is not None:
        assert torch.equal(output.logits, logits)
    assert output.images is None  # it changes no pixel of its input
    if views is None:
        assert output.views is None and output.view_count is None
    else:
        assert output.view_count == count and len(output.views) == len(views) <= SHOWN_VIEWS
        for kept, expected in zip(output.views, views, strict=True):
            assert kept.shape[0] == len(x) and not kept.requires_grad and torch.equal(kept, expected.float())
            assert kept.untyped_storage().nbytes() == kept.numel() * 4  # a copy: it keeps no larger tensor alive
    if shift is None:
        assert output.feature_shift is None
    else:
        assert output.feature_shift.shape == (len(x),)
        assert torch.allclose(output.feature_shift, shift.to(output.feature_shift.dtype), atol=1e-3)


def test_the_gallery_keeps_the_views_and_the_feature_shift_losslessly(tmp_path, described, images):
    """Through add_views, a shard and the index, back as they were; the pixel-changing defenses keep theirs."""
    x, labels = images[:3], torch.tensor([0, 1, 2])
    adversarial = (x + 2 / 255).clamp(0, 1)
    kept = {row: Item("toy", row, int(labels[row]), x[row]) for row in (0, 2)}
    outputs = {}
    for name, defense in (("dbd", DBD()), ("tte", TransformEnsemble()), ("clipure", CLIPure()), ("ttc", TTC())):
        clean = defense(described, x, streams(len(x)))
        attacked = defense(described, adversarial, streams(len(x)))
        outputs[name] = (clean, attacked)
        add_views(kept, name, defense.gate is not None, labels, x, clean, {"pgd": {"transfer": attacked}},
                  {"pgd": {"transfer": adversarial}}, described.logits)
    write_batch(tmp_path, 0, "run", "toy", list(kept.values()))
    write_index(tmp_path, "run", {"toy": CIFAR10_CLASSES}, [("toy", 0), ("toy", 2)])
    _, items = read_gallery(tmp_path)
    assert [item.image_id for item in items] == [0, 2]
    for item in items:
        row = item.image_id
        for view in item.views:
            output = outputs[view.defense][view.input == "pgd"]
            assert view.view_count == output.view_count and (view.views is None) == (output.views is None)
            for stored, batch in zip(view.views or [], output.views or [], strict=True):
                assert torch.equal(stored, batch[row])
            if output.feature_shift is None:
                assert view.feature_shift is None
            else:
                assert view.feature_shift == float(output.feature_shift[row])
            assert (view.defended is not None) == (view.defense == "ttc")


def test_an_older_gallery_without_views_or_shifts_reads_with_none(tmp_path, images):
    """A shard written before views were kept: no view keys, no view_count or feature_shift in its numbers."""
    (tmp_path / "gallery").mkdir()
    numbers = {"defense": "dbd", "input": "clean", "pred": 1, "prob": 0.5, "label_prob": 0.2, "bare_pred": 1,
               "bare_prob": 0.4, "score": 0.3, "flagged": False, "component": None}
    metadata = {"run": "old", "dataset": "toy", "ids": "[7]", "labels": "[1]", "views": json.dumps([[numbers]])}
    save_file({"clean": images[:1].contiguous(), "image/0/dbd\x1fclean": images[0].clone()},
              str(tmp_path / "gallery" / "rank-0-000000.safetensors"), metadata=metadata)
    write_index(tmp_path, "old", {"toy": CIFAR10_CLASSES}, [("toy", 7)])
    _, (item,) = read_gallery(tmp_path)
    (view,) = item.views
    assert view.views is None and view.view_count is None and view.feature_shift is None
    assert torch.equal(view.image, images[0]) and view.score == 0.3


@pytest.mark.parametrize("damage", ["no shard", "no row", "row out of range", "not an entry"])
def test_a_damaged_index_entry_is_one_line_naming_the_file(tmp_path, random_clip_dir, folder, damage, capsys):
    out = tmp_path / "out"
    assert run(random_clip_dir, folder, out, "--gallery", 3, "--limit", 3, "--defense", "none") == 0
    index_path = out / "gallery" / "index.json"
    index = json.loads(index_path.read_text())
    entry = index["images"][1]
    if damage == "no shard":
        del entry["shard"]
    elif damage == "no row":
        del entry["row"]
    elif damage == "row out of range":
        entry["row"] = 99
    else:
        index["images"][1] = "cat/0000.png"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CounterattackError) as caught:
        read_gallery(out)
    message = str(caught.value)
    assert str(index_path) in message and "\n" not in message
    assert main(["report", str(out), "--html"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and str(index_path) in err


def test_an_eval_keeps_each_defense_s_views_and_feature_move(tmp_path, random_clip_dir, folder):
    """End to end: TTE's views of what it saw, DBD's JPEG and median views (drawn from nothing), CLIPure's angle."""
    assert run(random_clip_dir, folder, tmp_path / "out", "--gallery", 3, "--limit", 3, "--defense",
               "tte,dbd,clipure") == 0
    _, items = read_gallery(tmp_path / "out")
    classifier = None
    for item in items:
        for view in item.views:
            x = view.image[None]
            if view.defense == "tte":
                transforms = default_transforms(32)
                assert view.view_count == 10 and view.feature_shift is None
                assert [v.tolist() for v in view.views] == [transforms[k](x)[0].tolist() for k in (1, 4, 6, 9)]
            elif view.defense == "dbd":
                assert view.view_count == 32 and len(view.views) == 4 and view.views[0].shape == (3, 32, 32)
                jpeg = straight_through(x, dbd_views.jpeg_levels(dbd_views.eight_bit_levels(x), 50) / 255)
                assert torch.equal(view.views[1], jpeg[0])
                assert torch.equal(view.views[3], dbd_views.median_filter(x)[0])
                assert 0 <= view.feature_shift <= 180
            else:
                if classifier is None:
                    clip = load_clip(f"local-dir:{random_clip_dir}")
                    classifier = ZeroShotClassifier.from_clip(clip, ["cat", "dog", "owl"])
                with torch.no_grad():
                    start = torch.nn.functional.normalize(classifier.encode_image(x).float(), dim=-1)
                    purified = clipure_purify(start, blank_prompt_embedding(classifier), 10, 30.0)
                assert view.views is None and view.view_count is None
                assert view.feature_shift == pytest.approx(float(angle(purified.detach(), start)[0]), abs=1e-2)
