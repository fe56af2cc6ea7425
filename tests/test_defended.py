"""``defended(classifier, defense)``: a defense as an ``nn.Module`` that attack libraries can run through."""

import pytest
import torch
import torch.nn.functional as F

from counterattack import TTC, CounterattackError, ImageRandomness, RandomNoise, defended
from counterattack.defended_model import RANDOMNESS_KEY, call_purpose
from counterattack.defenses import build_defenses
from counterattack.sanity import autoattack_warnings

from testkit import threshold_between

IDS = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]


def _ttc_with_both_branches(classifier, images) -> TTC:
    """TTC whose gate judges about half of ``images`` attacked, so both branches are exercised."""
    rng = ImageRandomness.for_images(0, RANDOMNESS_KEY, IDS, call_purpose(0))
    taus = TTC().counterattack(classifier, images, rng).tau
    return TTC(tau_thres=threshold_between(taus))


def _own_output(defense, classifier, images, seed, call, ids=IDS) -> torch.Tensor:
    return defense(classifier, images, ImageRandomness.for_images(seed, RANDOMNESS_KEY, ids, call_purpose(call))).logits


@pytest.mark.parametrize("name", ["none", "rn", "ttc"])
def test_logits_are_the_defenses_own_output_for_the_same_ids(random_classifier, images, name):
    defense = _ttc_with_both_branches(random_classifier, images) if name == "ttc" else build_defenses([name])[0]
    model = defended(random_classifier, defense, seed=3)
    with torch.no_grad():
        first, second = model(images, IDS), model(images, IDS)
    assert torch.equal(first, _own_output(defense, random_classifier, images, seed=3, call=0))
    assert torch.equal(second, _own_output(defense, random_classifier, images, seed=3, call=1))
    if name in ("rn", "ttc"):  # randomised: every call is a fresh draw
        assert not torch.equal(first, second)
    model.calls = 0  # replays the same draws
    with torch.no_grad():
        assert torch.equal(model(images, IDS), first)


def test_draws_follow_the_image_ids_not_the_batch(random_classifier, images):
    order = [3, 0, 5, 1, 4, 2]
    with torch.no_grad():
        together = defended(random_classifier, RandomNoise(), seed=1)(images, IDS)
        shuffled = defended(random_classifier, RandomNoise(), seed=1)(images[order], [IDS[i] for i in order])
        by_position = defended(random_classifier, RandomNoise(), seed=1)(images)
        numbered = defended(random_classifier, RandomNoise(), seed=1)(images, torch.arange(len(images)))
    # The same noise per image; a batch of another order only rounds the encoder's sums differently.
    assert torch.allclose(shuffled, together[order], atol=1e-5)
    assert torch.equal(by_position, numbered)  # without ids, an image is keyed by its position
    assert not torch.allclose(by_position, together, atol=1e-3)


@pytest.mark.parametrize("method", ["exact", "bpda"])
def test_gradients_flow_through_the_defenses_attack_view(random_classifier, images, method):
    ttc = _ttc_with_both_branches(random_classifier, images)
    model = defended(random_classifier, ttc, seed=0, method=method)
    x = images.clone().requires_grad_(True)
    logits = model(x, IDS)
    view = ttc.attack_view(random_classifier, images.clone().requires_grad_(True),
                           ImageRandomness.for_images(0, RANDOMNESS_KEY, IDS, call_purpose(0)), method)
    assert torch.equal(logits, view.logits)
    assert torch.allclose(logits, _own_output(ttc, random_classifier, images, seed=0, call=0), atol=1e-4)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long)), x)
    assert grad.abs().sum(dim=(1, 2, 3)).gt(0).all()


def test_exact_and_bpda_gradients_differ_where_ttc_counterattacks(random_classifier, images):
    ttc = _ttc_with_both_branches(random_classifier, images)
    grads = {}
    for method in ("exact", "bpda"):
        x = images.clone().requires_grad_(True)
        logits = defended(random_classifier, ttc, seed=0, method=method)(x, IDS)
        (grads[method],) = torch.autograd.grad(logits[:, 0].sum(), x)
    assert not torch.allclose(grads["exact"], grads["bpda"])


def test_torchattacks_pgd_attacks_through_the_defense(random_classifier, images):
    torchattacks = pytest.importorskip("torchattacks")
    model = defended(random_classifier, _ttc_with_both_branches(random_classifier, images), seed=0)
    with torch.no_grad():
        labels = model(images).argmax(-1)  # attack the defended model's own clean predictions
    eps = 16 / 255
    torch.manual_seed(0)  # torchattacks draws PGD's random start from the global generator
    adversarial = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=5, random_start=True)(images, labels)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert model.calls == 1 + 5  # every PGD step went through the defended module
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = (images + eps * noise).clamp(0, 1)  # the same budget without a gradient
    with torch.no_grad():
        fooled_by_pgd = (model(adversarial).argmax(-1) != labels).float().mean()
        fooled_by_noise = (model(noisy).argmax(-1) != labels).float().mean()
    assert fooled_by_pgd >= 0.8 and fooled_by_noise <= 0.2


@pytest.fixture
def fresh_dynamic_check():
    """pyautoattack counts gradient calls for its dynamic-defense check in global counters that it
    never resets: zero them for this test and put them back after, so no other test is affected."""
    checks = pytest.importorskip("pyautoattack.checks")
    saved = dict(checks.funcs)

    def zero() -> None:
        checks.funcs.update(dict.fromkeys(checks.funcs, 0))

    zero()
    yield zero
    checks.funcs.update(saved)


def test_autoattack_checks_see_ttc_as_randomised_and_dynamic(random_classifier, images, fresh_dynamic_check):
    """``counterattack sanity`` runs AutoAttack's checks on the defended module."""
    labels = torch.zeros(len(images), dtype=torch.long)
    assert autoattack_warnings(random_classifier, build_defenses(["none"])[0], images, labels, seed=0) == []
    fresh_dynamic_check()
    flagged = " ".join(autoattack_warnings(random_classifier, TTC(), images, labels, seed=0))
    assert "randomized" in flagged and "dynamic" in flagged


def test_bad_arguments_are_refused(random_classifier, images):
    with pytest.raises(CounterattackError, match="exact"):
        defended(random_classifier, TTC(), method="analytic")
    with pytest.raises(ValueError, match="6 images but 2 image ids"):
        defended(random_classifier, "rn")(images, ["a", "b"])
