"""The Python API as safe as the command line (issue 31, item 4, and item 8's API part): one probe each.

A mistake through the API is one line (an ``InputError`` or a ``CounterattackError``, never a raw torch error),
and a caller habit that computes the right thing (int32 labels, ``torch.inference_mode()``) gives the same result
as the plain call."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from counterattack import (
    CW, PGD, TTC, AdaptiveAttack, AutoAttack, CounterattackError, HedgeDefense, ImageRandomness, InputError,
    ZeroShotClassifier, build_attack, build_defense, defended, load_clip,
)
from counterattack.inputs import ArgumentKindError
from counterattack.options import large_budgets_meant

from testkit import CIFAR10_CLASSES, RANDOM_CLIP_CFG, write_local_dir


def one_line(error: pytest.ExceptionInfo, *fragments: str) -> str:
    """The error's message: a CounterattackError (the command line prints it, no traceback) on one line."""
    message = str(error.value)
    assert isinstance(error.value, CounterattackError) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def labels(images) -> torch.Tensor:
    return torch.arange(len(images)) % 10


def streams(images: torch.Tensor, purpose: str = "") -> ImageRandomness:
    return ImageRandomness.from_seed(0, len(images), purpose)


# --- 1. weights that overflow: named on the first batch, not NaN logits and chance accuracy ----------------------

@pytest.fixture(scope="module")
def overflowing_clip(tmp_path_factory):
    model = write_local_dir(tmp_path_factory.mktemp("overflow"), RANDOM_CLIP_CFG, seed=0)
    weights = load_file(str(model / "open_clip_model.safetensors"))
    weights["visual.proj"] = weights["visual.proj"] * 1e38  # finite (the loader accepts it), until a product overflows
    save_file(weights, str(model / "open_clip_model.safetensors"))
    return load_clip(f"local-dir:{model}")


def test_weights_that_overflow_are_named_on_the_first_batch(overflowing_clip, images, labels):
    for run in (lambda c: c.logits(images),
                lambda c: TTC(tau_thres=0.0)(c, images, streams(images)),  # every image judged clean: no logits call
                lambda c: PGD(steps=1)(c, images, labels, streams(images))):
        classifier = ZeroShotClassifier.from_clip(overflowing_clip, CIFAR10_CLASSES)
        with pytest.raises(CounterattackError) as error:
            run(classifier)
        one_line(error, "non-finite image embedding norms", "overflow")


def test_the_finiteness_check_runs_once_per_encoder_and_again_after_a_cast(random_clip_dir, images):
    classifier = ZeroShotClassifier.from_clip(load_clip(f"local-dir:{random_clip_dir}"), CIFAR10_CLASSES)
    assert not classifier.encoder.checked_finite
    classifier.logits(images)
    assert classifier.encoder.checked_finite  # later batches pay nothing
    classifier.double()
    assert not classifier.encoder.checked_finite  # weights fine in one precision may overflow in another


# --- 2. labels of any integer dtype ----------------------------------------------------------------------------

def test_labels_of_any_integer_dtype_give_the_int64_result(random_classifier, images, labels):
    pgd = PGD(eps=8 / 255, steps=1, step_size=4 / 255)
    expected = pgd(random_classifier, images, labels, streams(images))
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        assert torch.equal(pgd(random_classifier, images, labels.to(dtype), streams(images)), expected)
    # The other losses (CW's margin gathers by label) and an attack through a defense, with int32 labels.
    for attack in (CW(eps=8 / 255, steps=1, step_size=4 / 255),
                   AdaptiveAttack(TTC(tau_thres=float("inf")), PGD(eps=8 / 255, steps=1, step_size=4 / 255))):
        expected = attack(random_classifier, images, labels, streams(images))
        assert torch.equal(attack(random_classifier, images, labels.int(), streams(images)), expected)


# --- 3. torch.inference_mode() --------------------------------------------------------------------------------

def test_attacks_and_defenses_under_inference_mode_give_the_plain_result(random_classifier, images, labels):
    pgd = PGD(eps=8 / 255, steps=3, step_size=2 / 255)
    attacked_all, gated = TTC(tau_thres=float("inf")), TTC()

    def every_entry_point(x, y):
        return {
            "pgd": pgd(random_classifier, x, y, streams(x)),
            "ttc (every image counterattacked)": attacked_all(random_classifier, x, streams(x)).logits,
            "ttc": gated(random_classifier, x, streams(x)).logits,
            "ttc.counterattack": attacked_all.counterattack(random_classifier, x, streams(x)).images,
            "defended": defended(random_classifier, attacked_all, seed=0)(x),
        }

    plain = every_entry_point(images, labels)
    with torch.inference_mode():
        x, y = images.clone(), labels.clone()  # inference tensors, as a caller inside the block has them
        inside = every_entry_point(x, y)
        assert (inside["pgd"] != x).any()  # the attack moved the images: its gradient steps ran
    for name, value in plain.items():
        assert torch.equal(inside[name], value), name
        assert not inside[name].is_inference()  # usable outside the block too


# --- 4. a float where an integer is expected: refused when built -----------------------------------------------

@pytest.mark.parametrize("build, name", [
    (lambda: PGD(steps=1.5), "pgd"),
    (lambda: CW(steps=1.5), "cw"),
    (lambda: AutoAttack(steps=1.5), "autoattack"),
    (lambda: build_attack("pgd", steps=1.5), "pgd"),
    (lambda: TTC(steps=1.5), "ttc"),
    (lambda: HedgeDefense(steps=2.0), "hd"),
    (lambda: build_defense("ttc", steps=1.5), "ttc"),
    (lambda: dataclasses.replace(TTC(), steps=0.5), "ttc"),
])
def test_a_float_where_an_integer_is_expected_is_refused_when_built(build, name):
    with pytest.raises(CounterattackError) as error:
        build()
    one_line(error, f"{name}: steps must be an integer")


# --- 5. a wrong object where a classifier or a defense is expected ---------------------------------------------

@pytest.fixture(scope="module")
def not_classifiers(random_clip_dir) -> dict:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)  # torchvision initialises its random weights from the global generator
    clip = load_clip(f"local-dir:{random_clip_dir}")
    return {"a model name": "ViT-B-32", "an open_clip model": clip.model, "a LoadedCLIP": clip,
            "a torchvision model": torchvision.models.resnet18(num_classes=10),
            "the classifier class": ZeroShotClassifier}


@pytest.mark.parametrize("what", ["a model name", "an open_clip model", "a LoadedCLIP", "a torchvision model",
                                  "the classifier class"])
def test_a_wrong_object_as_the_classifier_is_one_line(not_classifiers, images, labels, what):
    wrong = not_classifiers[what]
    for run in (lambda: PGD(steps=1)(wrong, images, labels, streams(images)),
                lambda: AutoAttack(steps=1)(wrong, images, labels, streams(images)),
                lambda: TTC()(wrong, images, streams(images)),
                lambda: TTC().attack_view(wrong, images, streams(images), "exact"),
                lambda: TTC().counterattack(wrong, images, streams(images)),
                lambda: build_defense("rn")(wrong, images, streams(images)),
                lambda: defended(wrong, TTC()),
                lambda: defended(wrong, "ttc")):
        with pytest.raises(ArgumentKindError) as error:
            run()
        assert isinstance(error.value, InputError) and isinstance(error.value, TypeError)
        one_line(error, "expected a ZeroShotClassifier as the classifier")


def test_a_defended_model_as_the_classifier_points_to_the_adaptive_attack(random_classifier, images, labels):
    with pytest.raises(ArgumentKindError) as error:
        PGD(steps=1)(defended(random_classifier, TTC()), images, labels, streams(images))
    one_line(error, "got a DefendedModel", "AdaptiveAttack(defense, attack)")


def test_a_non_defense_as_the_defense_is_one_line(random_classifier):
    for wrong, named in ((PGD(), "a PGD"), (TTC, "the class TTC (an instance is needed"),
                         (random_classifier, "a ZeroShotClassifier"), (42, "an int")):
        with pytest.raises(ArgumentKindError) as error:
            defended(random_classifier, wrong)
        one_line(error, "expected a defense as the defense", named)
    with pytest.raises(CounterattackError) as error:
        defended(random_classifier, "not-a-defense")
    one_line(error, "Unknown defense")


# --- 6. casting a DefendedModel casts its own copy of the classifier ------------------------------------------

def test_casting_a_defended_model_leaves_the_callers_classifier_as_it_was(random_clip_dir, images):
    clip = load_clip(f"local-dir:{random_clip_dir}")
    classifier = ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES)
    before = {name: t.clone() for name, t in classifier.state_dict().items()}

    def dtypes(module: torch.nn.Module) -> set:
        return {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}

    same = defended(classifier, TTC()).to("cpu")  # a cast that changes nothing copies nothing
    assert same.classifier is classifier
    for cast in (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.to_empty(
            device="cpu")):
        model = cast(defended(classifier, TTC(), seed=0))
        assert model.classifier is not classifier and model.owns_classifier
        assert dtypes(classifier) == dtypes(clip.model) == {torch.float32}
        assert all(torch.equal(t, before[name]) for name, t in classifier.state_dict().items())
    model = defended(classifier, TTC(tau_thres=float("inf")), seed=0).double()
    # The copy's image and text towers are cast together (a text-side defense encodes text with the copy).
    assert dtypes(model.classifier) == dtypes(model.classifier.clip.model) == {torch.float64}
    assert model.classifier.encoder.visual is model.classifier.clip.model.visual
    assert model.classifier.encode_texts(["a photo of a cat."]).shape == (1, RANDOM_CLIP_CFG["embed_dim"])
    plain = defended(classifier, TTC(tau_thres=float("inf")), seed=0)(images)
    assert torch.allclose(model(images), plain, atol=1e-3)
    model.double()  # a second cast casts the copy it owns, not another
    assert model.owns_classifier and dtypes(classifier) == {torch.float32}


# --- 7. a budget above a quarter of the pixel range: a warning line -------------------------------------------

def budget_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("counterattack") and r.levelno == logging.WARNING and "pixel range" in r.message]


def test_a_budget_above_a_quarter_of_the_pixel_range_warns_once_per_construction(caplog):
    caplog.set_level(logging.WARNING, logger="counterattack")
    PGD(eps=1)
    (message,) = budget_warnings(caplog)
    assert "\n" not in message and "pgd: eps=1 (255/255)" in message and "4 / 255" in message
    caplog.clear()
    TTC(eps=0.5, step_size=0.3)
    (message,) = budget_warnings(caplog)  # one line names every large budget of the instance
    assert "ttc: eps=0.5 (127.5/255) and step_size=0.3 (76.5/255)" in message
    caplog.clear()
    PGD(eps=63 / 255, step_size=16 / 255)  # up to a quarter (63.75/255): a plausible budget, no word
    build_attack("cw", eps=8 / 255)
    assert budget_warnings(caplog) == []
    with large_budgets_meant():  # the command line's 1/255 units, a sanity sweep's unbounded eps
        PGD(eps=1, step_size=1)
        dataclasses.replace(PGD(), eps=1)
    assert budget_warnings(caplog) == []
    dataclasses.replace(PGD(), eps=1)  # a replace builds an instance: it warns as one
    assert len(budget_warnings(caplog)) == 1


# --- 8. a string where a list of names is expected ---------------------------------------------------------------

def test_a_string_where_a_list_of_names_is_expected_is_one_line(random_clip_dir):
    clip = load_clip(f"local-dir:{random_clip_dir}")
    with pytest.raises(ArgumentKindError) as error:
        ZeroShotClassifier.from_clip(clip, "cat")
    one_line(error, "class_names must be a list of strings", "the string 'cat'")
    with pytest.raises(ArgumentKindError) as error:
        ZeroShotClassifier.from_clip(clip, ["cat", "dog"], templates="a photo of a {}.")
    one_line(error, "templates must be a list of strings")
    assert ZeroShotClassifier.from_clip(clip, ("cat",), templates=("a photo of a {}.",)).class_names == ["cat"]



def test_class_names_that_differ_only_in_case_or_spaces_are_said_to_repeat(random_clip_dir, caplog):
    clip = load_clip(f"local-dir:{random_clip_dir}")
    with caplog.at_level(logging.WARNING, logger="counterattack"):
        ZeroShotClassifier.from_clip(clip, ["Cat", "cat ", "dog"])
    (said,) = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
    assert "'Cat'" in said and "'cat '" in said and "'dog'" not in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="counterattack"):
        ZeroShotClassifier.from_clip(clip, ["cat", "dog"])
    assert not [r for r in caplog.records if "repeat" in r.getMessage()]
