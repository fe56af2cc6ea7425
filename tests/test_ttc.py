import math

import pytest
import torch

from counterattack import TTC, ImageRandomness, ZeroShotClassifier, count_encoder_passes, load_clip
from counterattack.defenses import relative_shift

from testkit import CIFAR10_CLASSES, RANDOM_CLIP_CFG, threshold_between, write_local_dir

EPS, ALPHA = 4 / 255, 1 / 255


def rng(n: int, seed: int = 0, purpose: str = "ttc") -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, purpose)


def expected_delta0(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The paper's step 1, written out: uniform noise, then clipped so x + delta0 stays in [0, 1]."""
    noise = rng(len(images), seed).uniform_like(images, -EPS, EPS)
    return torch.max(torch.min(noise, 1 - images), -images)


def oracle_steps(encoder, images: torch.Tensor, delta0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The counterattack steps as the paper describes them, one image batch at a time."""
    with torch.no_grad():
        anchor = encoder(images)
    deltas, delta = [delta0], delta0.clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = ((encoder(images + delta) - anchor) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        delta = torch.max(torch.min(delta, 1 - images), -images)
        deltas.append(delta)
    return deltas


def test_step_weights_follow_the_formula():
    ttc = TTC(steps=2, beta=2.0)
    z = 1 + math.exp(2) + math.exp(4)
    expected = torch.tensor([1 / z, math.exp(2) / z, math.exp(4) / z], dtype=torch.float64)
    assert torch.allclose(ttc.step_weights(), expected)
    assert TTC(steps=5, beta=0.0).step_weights().tolist() == pytest.approx([1 / 6] * 6)


@pytest.mark.parametrize("tau_thres", [0.0, 0.2, float("inf")])
def test_perturbation_stays_in_budget_and_box(random_classifier, images, tau_thres):
    result = TTC(tau_thres=tau_thres).counterattack(random_classifier, images, rng(len(images)))
    delta = result.images - images
    assert delta.abs().max() <= EPS + 1e-6
    assert result.images.min() >= -1e-6 and result.images.max() <= 1 + 1e-6


def test_tau_is_relative_embedding_shift_under_delta0(random_classifier, images):
    result = TTC().counterattack(random_classifier, images, rng(len(images)))
    encoder = random_classifier.encoder
    with torch.no_grad():
        f_x = encoder(images)
        f_noisy = encoder(images + expected_delta0(images))
    expected = (f_noisy - f_x).norm(dim=-1) / f_x.norm(dim=-1)
    assert torch.allclose(result.tau, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(relative_shift(f_noisy, f_x), expected)


def test_images_judged_clean_get_exactly_delta0(random_classifier, images):
    result = TTC(tau_thres=0.0).counterattack(random_classifier, images, rng(len(images)))
    assert not result.counterattacked.any()
    assert torch.equal(result.images, images + expected_delta0(images))


def test_images_judged_attacked_get_the_weighted_sum_of_the_kept_steps(random_classifier, images):
    ttc = TTC(tau_thres=float("inf"))
    result = ttc.counterattack(random_classifier, images, rng(len(images)))
    assert result.counterattacked.all()
    deltas = oracle_steps(random_classifier.encoder, images, expected_delta0(images), ttc.steps)
    weights = ttc.step_weights()
    expected = sum(float(w) * d for w, d in zip(weights, deltas, strict=True))
    assert torch.allclose(result.images - images, expected, atol=1e-6)
    # The steps really moved: the answer is not delta0.
    assert not torch.allclose(expected, deltas[0], atol=1e-4)


def test_mixed_batch_follows_each_images_own_gate(random_classifier, images):
    taus = TTC().counterattack(random_classifier, images, rng(len(images))).tau
    threshold = threshold_between(taus)
    result = TTC(tau_thres=threshold).counterattack(random_classifier, images, rng(len(images)))
    assert torch.equal(result.counterattacked, taus < threshold)
    assert 0 < int(result.counterattacked.sum()) < len(images)
    delta0 = expected_delta0(images)
    clean = ~result.counterattacked
    assert torch.equal(result.images[clean], (images + delta0)[clean])
    assert not torch.allclose(result.images[~clean], (images + delta0)[~clean], atol=1e-4)


def test_defense_logits_are_the_logits_of_the_defended_images(random_classifier, images):
    taus = TTC().counterattack(random_classifier, images, rng(len(images))).tau
    ttc = TTC(tau_thres=threshold_between(taus))
    with count_encoder_passes() as passes:
        output = ttc(random_classifier, images, rng(len(images)))
    defended = ttc.counterattack(random_classifier, images, rng(len(images))).images
    with torch.no_grad():
        assert torch.allclose(output.logits, random_classifier.logits(defended), atol=1e-4)
    attacked = int(output.counterattacked.sum())
    # Images judged clean: f(x), f(x + delta0). Attacked ones: also 2 steps and a final forward.
    assert passes.forwards == 2 * len(images) + 3 * attacked
    assert passes.backwards == 2 * attacked


def test_seeded_determinism(random_classifier, images):
    ttc = TTC(tau_thres=float("inf"))
    first = ttc.counterattack(random_classifier, images, rng(len(images), seed=3))
    again = ttc.counterattack(random_classifier, images, rng(len(images), seed=3))
    other = ttc.counterattack(random_classifier, images, rng(len(images), seed=4))
    assert torch.equal(first.images, again.images) and torch.equal(first.tau, again.tau)
    assert not torch.equal(first.images, other.images)


@pytest.mark.parametrize("tau_thres", [0.0, float("inf")])
def test_batch_size_invariance(random_classifier, images, tau_thres):
    ttc = TTC(tau_thres=tau_thres)
    ids = list(range(10, 10 + len(images)))
    whole = ttc(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p"))
    for i, image_id in enumerate(ids):
        alone = ttc(random_classifier, images[i : i + 1], ImageRandomness.for_images(0, "d", [image_id], "p"))
        assert alone.logits.argmax(-1).item() == whole.logits[i].argmax().item()
        assert torch.allclose(alone.logits[0], whole.logits[i], atol=1e-3)
        assert torch.allclose(alone.score[0], whole.score[i], rtol=1e-4)


def test_tau_from_a_separate_encoder(random_classifier, images, tmp_path):
    other = load_clip(f"local-dir:{write_local_dir(tmp_path / 'other', RANDOM_CLIP_CFG, seed=7)}")
    tau_encoder = ZeroShotClassifier.from_clip(other, CIFAR10_CLASSES).encoder
    ttc = TTC(tau_thres=float("inf"), tau_encoder=tau_encoder)
    result = ttc.counterattack(random_classifier, images, rng(len(images)))
    delta0 = expected_delta0(images)
    with torch.no_grad():
        expected_tau = relative_shift(tau_encoder(images + delta0), tau_encoder(images))
        own_tau = relative_shift(random_classifier.encoder(images + delta0), random_classifier.encoder(images))
    assert torch.allclose(result.tau, expected_tau, rtol=1e-5)
    assert not torch.allclose(result.tau, own_tau, rtol=1e-2)
    # The counterattack itself still ascends the defended model's embedding shift.
    deltas = oracle_steps(random_classifier.encoder, images, delta0, ttc.steps)
    expected = sum(float(w) * d for w, d in zip(ttc.step_weights(), deltas, strict=True))
    assert torch.allclose(result.images - images, expected, atol=1e-6)


def _fast_and_reference(classifier, images, ttc):
    from counterattack.defenses.reference import reference_ttc

    fast = ttc.counterattack(classifier, images, rng(len(images)))
    fast_out = ttc(classifier, images, rng(len(images)))
    ref_images, ref_out = reference_ttc(ttc, classifier, images, rng(len(images)))
    return fast, fast_out, ref_images, ref_out


def _assert_agree(classifier, images, ttc):
    fast, fast_out, ref_images, ref_out = _fast_and_reference(classifier, images, ttc)
    assert torch.equal(fast.counterattacked, ref_out.counterattacked)
    assert torch.allclose(fast.tau, ref_out.score, rtol=1e-5)
    assert torch.allclose(fast.images, ref_images, atol=1e-6)
    assert torch.equal(fast_out.logits.argmax(-1), ref_out.logits.argmax(-1))
    assert torch.allclose(fast_out.logits, ref_out.logits, atol=1e-4)
    return fast


@pytest.mark.parametrize("regime", ["all-clean", "all-attacked", "few-attacked", "most-attacked"])
def test_fast_path_equals_reference_on_a_random_model(random_classifier, images, regime):
    taus = TTC().counterattack(random_classifier, images, rng(len(images))).tau
    threshold = {"all-clean": 0.0, "all-attacked": float("inf"), "few-attacked": threshold_between(taus, below=2),
                 "most-attacked": threshold_between(taus, below=5)}[regime]
    fast = _assert_agree(random_classifier, images, TTC(tau_thres=threshold))
    expected = {"all-clean": 0, "all-attacked": 6, "few-attacked": 2, "most-attacked": 5}[regime]
    assert int(fast.counterattacked.sum()) == expected


def test_tau_exactly_at_the_threshold_is_judged_clean(random_classifier, images):
    # One code path only: the reference's tau may differ from the fast path's in the last bit.
    taus = TTC().counterattack(random_classifier, images, rng(len(images))).tau
    fast = TTC(tau_thres=float(taus[0])).counterattack(random_classifier, images, rng(len(images)))
    assert torch.equal(fast.tau, taus)
    assert not fast.counterattacked[0]
    assert torch.equal(fast.images[0], images[0] + expected_delta0(images)[0])


def test_fast_path_equals_reference_with_a_separate_tau_encoder(random_classifier, images, tmp_path):
    other = load_clip(f"local-dir:{write_local_dir(tmp_path / 'other', RANDOM_CLIP_CFG, seed=7)}")
    tau_encoder = ZeroShotClassifier.from_clip(other, CIFAR10_CLASSES).encoder
    taus = TTC(tau_encoder=tau_encoder).counterattack(random_classifier, images, rng(len(images))).tau
    _assert_agree(random_classifier, images, TTC(tau_thres=threshold_between(taus), tau_encoder=tau_encoder))


def test_fast_path_equals_reference_on_the_tiny_clip(tiny_classifier):
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    fast = _assert_agree(tiny_classifier, images, TTC())  # paper threshold: every image counterattacked
    assert fast.counterattacked.all()
    _assert_agree(tiny_classifier, images, TTC(tau_thres=threshold_between(fast.tau, below=6)))
