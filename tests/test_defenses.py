import random

import pytest
import torch
import torch.nn.functional as F

from counterattack import (
    count_encoder_passes, TTC, AntiAdversary, HedgeDefense, ImageRandomness, RandomNoise, TransformEnsemble,
    build_defenses,
)
from counterattack.defenses.hd import summed_class_losses
from counterattack.defenses.tte import default_transforms

EPS = 4 / 255


def rng(n: int) -> ImageRandomness:
    return ImageRandomness.from_seed(0, n, "defense")


@pytest.mark.parametrize("name", ["rn", "anti-adversary", "hd", "ttc"])
def test_defended_images_stay_in_budget_and_box_and_are_what_is_classified(random_classifier, images, name):
    (defense,) = build_defenses([name], tau_thres=float("inf"))
    output = defense(random_classifier, images, rng(len(images)))
    assert (output.images - images).abs().max() <= EPS + 1e-6
    assert output.images.min() >= -1e-6 and output.images.max() <= 1 + 1e-6
    assert not torch.equal(output.images, images)
    with torch.no_grad():
        assert torch.allclose(output.logits, random_classifier.logits(output.images), atol=1e-4)


@pytest.mark.parametrize("tau_thres", [0.0, 1e-12])
def test_rn_equals_ttc_when_every_image_is_judged_clean(random_classifier, images, tau_thres):
    rn = RandomNoise()(random_classifier, images, rng(len(images)))
    ttc = TTC(tau_thres=tau_thres)(random_classifier, images, rng(len(images)))
    assert not ttc.counterattacked.any()
    assert torch.equal(rn.images, ttc.images)
    assert torch.equal(rn.logits, ttc.logits)


def test_anti_adversary_raises_the_confidence_of_the_predicted_class(random_classifier, images):
    output = AntiAdversary()(random_classifier, images, rng(len(images)))
    with torch.no_grad():
        before = F.softmax(random_classifier.logits(images), dim=-1)
    predicted = before.argmax(-1)
    after = F.softmax(output.logits, dim=-1)
    assert (after.gather(1, predicted[:, None]) > before.gather(1, predicted[:, None])).all()


def test_hedge_defense_raises_the_summed_loss_over_all_classes(random_classifier, images):
    output = HedgeDefense()(random_classifier, images, rng(len(images)))
    with torch.no_grad():
        before = -torch.log_softmax(random_classifier.logits(images), -1).sum(-1)
    after = -torch.log_softmax(output.logits, -1).sum(-1)
    assert (after > before).all()
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    by_class = sum(F.cross_entropy(logits, torch.full((3,), c), reduction="sum") for c in range(5))
    assert torch.allclose(summed_class_losses(logits), by_class)


def test_tte_averages_logits_over_its_views_in_any_order(random_classifier, images):
    views = default_transforms(images.shape[-1])
    assert len(views) == 10
    shuffled = views[:]
    random.Random(0).shuffle(shuffled)
    ordered = TransformEnsemble(transforms=views)(random_classifier, images, rng(len(images)))
    reordered = TransformEnsemble(transforms=shuffled)(random_classifier, images, rng(len(images)))
    assert torch.allclose(ordered.logits, reordered.logits, atol=1e-5)
    with torch.no_grad():
        by_hand = sum(random_classifier.logits(v(images)) for v in views) / len(views)
        assert torch.allclose(ordered.logits, by_hand, atol=1e-5)
        # The views differ: the ensemble is not the identity's logits.
        assert not torch.allclose(ordered.logits, random_classifier.logits(images), atol=1e-3)
    with count_encoder_passes() as passes:
        TransformEnsemble(transforms=views)(random_classifier, images, rng(len(images)))
    assert (passes.forwards, passes.backwards) == (10 * len(images), 0)


def test_tte_views_flip_and_shift():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    identity, up, down, left, right, flip, *_ = default_transforms(4, shift_fraction=0.25)
    assert torch.equal(identity(x), x)
    assert torch.equal(flip(x), torch.flip(x, dims=[-1]))
    assert torch.equal(down(x)[0, 0, 1:], x[0, 0, :3])  # content moved down one row
    assert torch.equal(up(x)[0, 0, :3], x[0, 0, 1:])
    assert torch.equal(right(x)[0, 0, :, 1:], x[0, 0, :, :3])
    assert torch.equal(left(x)[0, 0, :, :3], x[0, 0, :, 1:])


def test_every_registered_defense_costs_what_its_paper_says(random_classifier, images):
    """Encoder passes as counted by the encoder itself (forwards, and backwards through it), per image."""
    costs = {}
    # The successors (mac, doc, csr, rtpt) test their own costs against their papers' counts.
    for defense in build_defenses(["none", "rn", "anti-adversary", "hd", "tte", "ttc"], tau_thres=float("inf")):
        with count_encoder_passes() as passes:
            defense(random_classifier, images, rng(len(images)))
        costs[defense.name] = passes
    n = len(images)
    assert {k: (v.forwards / n, v.backwards / n) for k, v in costs.items()} == {
        "none": (1, 0), "rn": (1, 0), "anti-adversary": (3, 2), "hd": (3, 2), "tte": (10, 0),
        # all counterattacked: f(x), f(x + delta0) reused as the first step's forward, 1 more step, final;
        # the first backward runs over the whole batch.
        "ttc": (4, 2),
    }
