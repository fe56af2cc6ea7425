import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomPerspective

from counterattack import CounterattackError, ImageRandomness, count_encoder_passes
from counterattack.defenses.agc import (
    AGC, draw_endpoints, geodesic_correction, geodesic_push, perspective, sample_bicubic_pil, source_points,
    perspective_coefficients,
)

from testkit import transfer_and_adaptive

CODE_DEFAULTS = dict(beta_clean=0.45, beta_adv=2.25, gamma_attack=0.9, gamma_trust=1.0)


def rng(n: int, seed: int = 0) -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, "agc")


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def rotated(start: np.ndarray, towards: np.ndarray, angle: float) -> np.ndarray:
    """``start`` turned by ``angle`` in the plane of ``start`` and ``towards``: the matrix exponential of the
    plane's rotation generator (no cosine-and-sine formula, which is what the defense uses)."""
    tangent = towards - (start @ towards) * start
    tangent /= np.linalg.norm(tangent)
    generator = np.outer(tangent, start) - np.outer(start, tangent)
    return scipy.linalg.expm(angle * generator) @ start


def oracle_step(original: np.ndarray, augmented: np.ndarray, beta_clean=0.45, beta_adv=2.25, gamma_attack=0.9,
                gamma_trust=1.0) -> dict:
    """The spec's step-size rule and push on one image's unit features, in float64, pair by pair."""
    count = len(augmented)
    attack = min(max(np.mean([1 - a @ original for a in augmented]), 0.0), 1.0)
    if count > 1:
        pairs = [augmented[i] @ augmented[j] for i in range(count) for j in range(count) if i != j]
        trust = min(max((np.mean(pairs) + 1) / 2, 0.0), 1.0)
    else:
        trust = 1.0
    beta = beta_clean + (beta_adv - beta_clean) * min(attack**gamma_attack * trust**gamma_trust, 1.0)
    anchor = augmented.mean(axis=0)
    anchor /= np.linalg.norm(anchor)
    theta = float(np.arccos(np.clip(original @ anchor, -1, 1)))
    corrected = original if theta < 1e-6 else rotated(original, anchor, beta * theta)
    return {"attack": attack, "trust": trust, "beta": beta, "theta": theta, "corrected": corrected}


# --- the geodesic push and the step-size rule --------------------------------------------------------------


def test_the_push_lands_on_the_anchor_at_beta_one_and_overshoots_along_the_great_circle():
    original, anchor = (torch.from_numpy(r).float() for r in unit_rows(2, 16, seed=0))
    o, a = original.double().numpy(), anchor.double().numpy()
    theta = np.arccos(o @ a)
    for beta in (0.0, 0.45, 0.5, 1.0, 2.0, 2.25):
        pushed, angle = geodesic_push(original[None], anchor[None], torch.tensor([beta]))
        expected = rotated(o, a, beta * theta)
        assert np.allclose(pushed[0].double().numpy(), expected, atol=1e-6), beta
        assert float(angle) == pytest.approx(theta, abs=1e-6)
    # Independent landmarks: beta 1 is the anchor, 1/2 the normalised midpoint, 2 the reflection of a_0 through m.
    at = {beta: geodesic_push(original[None], anchor[None], torch.tensor([beta]))[0][0].double().numpy()
          for beta in (0.5, 1.0, 2.0)}
    assert np.allclose(at[1.0], a, atol=1e-6)
    assert np.allclose(at[0.5], (o + a) / np.linalg.norm(o + a), atol=1e-6)
    assert np.allclose(at[2.0], 2 * (o @ a) * a - o, atol=1e-6)
    assert np.arccos(np.clip(at[2.0] @ a, -1, 1)) == pytest.approx(theta, abs=1e-5)  # as far past m as a_0 before it


def test_no_angle_keeps_the_original_feature_and_its_gradient_finite():
    # Entries of +-1/4 in 16 dimensions: a unit vector whose float32 dot product with itself is exactly 1.
    signs = torch.from_numpy(np.sign(np.random.default_rng(1).standard_normal(16))).float()
    original = (0.25 * signs)[None].requires_grad_(True)
    pushed, angle = geodesic_push(original, original.detach().clone(), torch.tensor([2.25]))
    assert torch.equal(pushed, original) and float(angle.detach()) == 0.0
    (gradient,) = torch.autograd.grad(pushed.sum(), original)
    assert torch.equal(gradient, torch.ones_like(gradient))


@pytest.mark.parametrize("count", [1, 2, 32])
def test_step_size_rule_and_push_against_the_spec(count):
    """Unit features near one another, as views of one image are; each image's own oracle in float64."""
    rows = []
    for image in range(3):
        base = unit_rows(1, 24, seed=10 + image)
        spread = 0.3 * (image + 1)  # the views' distance from the image grows: A, and so beta, should too
        views = base + spread * unit_rows(count, 24, seed=20 + image)
        rows.append((base[0], views / np.linalg.norm(views, axis=1, keepdims=True)))
    original = torch.tensor(np.stack([r[0] for r in rows]), dtype=torch.float32)
    augmented = torch.tensor(np.stack([r[1] for r in rows]), dtype=torch.float32)
    result = geodesic_correction(original, augmented, **CODE_DEFAULTS)
    for image, (o, views) in enumerate(rows):
        expected = oracle_step(o, views)
        assert float(result.attack_score[image]) == pytest.approx(expected["attack"], abs=1e-6)
        assert float(result.trust_score[image]) == pytest.approx(expected["trust"], abs=1e-6)
        assert float(result.beta[image]) == pytest.approx(expected["beta"], abs=1e-5)
        assert float(result.theta[image]) == pytest.approx(expected["theta"], abs=1e-5)
        assert np.allclose(result.corrected[image].double().numpy(), expected["corrected"], atol=1e-5)
    if count == 1:
        assert torch.equal(result.trust_score, torch.ones(3))
    assert (result.beta[1:] > result.beta[:-1]).all()
    assert ((0.45 < result.beta) & (result.beta < 2.25)).all()


def test_views_equal_to_the_image_give_the_clean_step_and_keep_the_feature():
    """A = 0 exactly, where A^0.9 has an infinite slope: the gradient stays finite."""
    signs = torch.from_numpy(np.sign(np.random.default_rng(3).standard_normal((2, 16)))).float()
    original = (0.25 * signs).requires_grad_(True)  # unit rows whose float32 self-products are exactly 1
    result = geodesic_correction(original, original[:, None].expand(2, 4, 16), **CODE_DEFAULTS)
    assert torch.equal(result.attack_score, torch.zeros(2))
    assert torch.equal(result.beta, torch.full((2,), 0.45))
    assert torch.equal(result.corrected, original)
    (gradient,) = torch.autograd.grad(result.corrected.sum() + result.beta.sum(), original)
    assert torch.isfinite(gradient).all()


# --- the perspective views ---------------------------------------------------------------------------------


def test_corner_offsets_take_torchvisions_values_uniformly():
    height, width = 20, 32  # reach: int(0.5 * 10) = 5 down, int(0.5 * 16) = 8 across
    ours = draw_endpoints(rng(40), 100, height, width, 0.5)  # 4000 views
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    theirs = torch.tensor([RandomPerspective.get_params(width, height, 0.5)[1] for _ in range(4000)],
                          dtype=torch.float64)
    torch.set_rng_state(generator_state)
    for corner in range(4):
        for axis, reach in ((0, 8), (1, 5)):
            mine, torchvisions = ours[:, corner, axis], theirs[:, corner, axis]
            assert set(mine.unique().tolist()) == set(torchvisions.unique().tolist())
            assert len(set(mine.tolist())) == reach + 1
            counts = torch.bincount(mine.long() - int(mine.min()))
            assert (counts.double() / len(mine) - 1 / (reach + 1)).abs().max() < 0.03  # about 3.5 std of a share


def test_the_warp_is_pils_bicubic_and_torchvisions_bilinear_for_the_same_corners(cifar10_first):
    images, _ = cifar10_first(1)
    images = images[:3]
    height, width = images.shape[-2:]
    endpoints = draw_endpoints(rng(3), 4, height, width, 0.5)
    repeated = images.repeat_interleave(4, dim=0)
    bicubic, bilinear = perspective(repeated, endpoints, "bicubic"), perspective(repeated, endpoints, "bilinear")
    corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    for row, image in enumerate(repeated):
        ends = endpoints[row].long().tolist()
        # PIL on float images: its exact arithmetic, no 8-bit rounding (then clipped, as its 8-bit images are).
        pil_float = torch.stack([
            torch.from_numpy(np.array(TF.perspective(Image.fromarray(channel.numpy(), mode="F"), corners, ends,
                                                     InterpolationMode.BICUBIC, fill=0)))
            for channel in image])
        assert torch.allclose(bicubic[row], pil_float.clamp(0, 1), atol=1e-5), row
        # The code's own path: an 8-bit RGB image, whose results PIL clips and truncates.
        eight_bit = Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())
        pil_rgb = torch.from_numpy(np.array(TF.perspective(eight_bit, corners, ends, InterpolationMode.BICUBIC,
                                                           fill=0))).permute(2, 0, 1).float()
        ours = perspective(torch.round(image * 255)[None] / 255, endpoints[row:row + 1], "bicubic")[0]
        assert (torch.floor(ours * 255 + 1e-3) - pil_rgb).abs().max() <= 1
        assert (torch.floor(ours * 255 + 1e-3) == pil_rgb).float().mean() > 0.99
        tensor_warp = TF.perspective(image, corners, ends, InterpolationMode.BILINEAR, fill=[0.0, 0.0, 0.0])
        assert torch.allclose(bilinear[row], tensor_warp, atol=1e-5), row
    assert not torch.allclose(bicubic, bilinear, atol=1e-2)


def test_the_bicubic_sampler_is_differentiable_in_the_image():
    images = torch.rand(2, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    endpoints = draw_endpoints(rng(2), 1, 6, 5, 0.9)
    source_x, source_y = source_points(perspective_coefficients(endpoints, 6, 5), 6, 5, images.device)
    assert torch.autograd.gradcheck(lambda x: sample_bicubic_pil(x, source_x, source_y), images.requires_grad_(True))


def test_views_are_fresh_per_call_and_per_image(images):
    agc = AGC(views=3)
    streams = rng(len(images))
    first, second = agc.warped_views(images, streams), agc.warped_views(images, streams)
    assert first.shape == (3 * len(images), *images.shape[1:])
    assert not torch.equal(first, second)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(agc.warped_views(images, rng(len(images))), first)  # a pure function of the stream


# --- the defense --------------------------------------------------------------------------------------------


def test_defense_equals_an_oracle_written_from_the_spec(random_classifier, images):
    """Views made by PIL from the same corners, each encoded alone, the rule and push in float64, the head."""
    images = images[:2]
    agc = AGC()
    output = agc(random_classifier, images, rng(len(images)))
    endpoints = draw_endpoints(rng(len(images)), 32, *images.shape[-2:], 0.5)  # the defense's own first draw
    height, width = images.shape[-2:]
    corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    text = random_classifier.text_embeddings.double().numpy()
    for i, image in enumerate(images):
        views = [image] + [
            torch.stack([torch.from_numpy(np.array(TF.perspective(
                Image.fromarray(channel.numpy(), mode="F"), corners, endpoints[32 * i + k].long().tolist(),
                InterpolationMode.BICUBIC, fill=0))) for channel in image]).clamp(0, 1)
            for k in range(32)]
        with torch.no_grad():
            features = torch.cat([random_classifier.encode_image(v[None]) for v in views]).double().numpy()
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        expected = oracle_step(features[0], features[1:])
        logits = random_classifier.logit_scale * text @ expected["corrected"]
        assert np.allclose(output.logits[i].double().numpy(), logits, atol=1e-3)
        assert 0.45 < expected["beta"] < 2.25
    assert output.score is None and output.counterattacked is None and output.images is None


def test_counted_passes_match_the_spec(random_classifier, images):
    """33 forwards and no backward per image; through the defense, exact: 33 backwards, bpda: 1."""
    for agc, forwards in ((AGC(), 33), (AGC(views=4), 5)):
        with count_encoder_passes() as passes:
            agc(random_classifier, images, rng(len(images)))
        assert (passes.forwards / len(images), passes.backwards) == (forwards, 0)
    for method, backwards in (("exact", 33), ("bpda", 1)):
        x = images.clone().requires_grad_(True)
        with count_encoder_passes() as passes:
            view = AGC().attack_view(random_classifier, x, rng(len(images)), method)
            view.logits.sum().backward()
        assert (passes.forwards / len(images), passes.backwards / len(images)) == (33, backwards)


def test_batch_size_invariance(random_classifier, images):
    images = images[:4]
    agc = AGC(views=8)
    ids = list(range(50, 50 + len(images)))
    whole = agc.correction(random_classifier, images, ImageRandomness.for_images(0, "test", ids, "agc"))
    for start, stop in ((0, 1), (1, 3), (3, 4)):
        part = agc.correction(random_classifier, images[start:stop],
                              ImageRandomness.for_images(0, "test", ids[start:stop], "agc"))
        assert torch.allclose(part.corrected, whole.corrected[start:stop], atol=1e-5)
        assert torch.allclose(part.beta, whole.beta[start:stop], atol=1e-5)
    views = agc.warped_views(images, ImageRandomness.for_images(0, "test", ids, "agc"))
    alone = agc.warped_views(images[2:3], ImageRandomness.for_images(0, "test", ids[2:3], "agc"))
    assert torch.equal(alone, views[16:24])


def test_seeded_determinism(random_classifier, images):
    first = AGC(views=4)(random_classifier, images, rng(len(images), seed=3)).logits
    assert torch.equal(first, AGC(views=4)(random_classifier, images, rng(len(images), seed=3)).logits)
    assert not torch.equal(first, AGC(views=4)(random_classifier, images, rng(len(images), seed=4)).logits)


def test_attack_view_is_the_defense_and_passes_gradients(random_classifier, images):
    agc = AGC(views=8)
    expected = agc(random_classifier, images, rng(len(images))).logits
    gradients = {}
    for method in ("exact", "bpda"):
        x = images.clone().requires_grad_(True)
        view = agc.attack_view(random_classifier, x, rng(len(images)), method, with_score=True)
        assert torch.allclose(view.logits, expected, atol=1e-4)
        assert view.score is None
        loss = F.cross_entropy(view.logits, torch.zeros(len(x), dtype=torch.long))
        (gradients[method],) = torch.autograd.grad(loss, x)
        assert torch.isfinite(gradients[method]).all()
        assert gradients[method].abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert not torch.allclose(gradients["exact"], gradients["bpda"])
    streams = rng(len(images))  # EOT: each call draws new views
    first = agc.attack_view(random_classifier, images, streams, "exact").logits
    assert not torch.allclose(first, agc.attack_view(random_classifier, images, streams, "exact").logits)


def test_a_constant_image_keeps_the_clean_step_and_a_finite_gradient(random_classifier):
    """Black views of a black image (fill 0): A is 0 up to rounding, beta the clean step."""
    black = torch.zeros(2, 3, 32, 32)
    agc = AGC(views=4)
    result = agc.correction(random_classifier, black, rng(2))
    assert result.attack_score.max() < 1e-6
    assert torch.allclose(result.beta, torch.full((2,), 0.45), atol=1e-5)
    x = black.clone().requires_grad_(True)
    view = agc.attack_view(random_classifier, x, rng(2), "exact")
    (gradient,) = torch.autograd.grad(view.logits[:, 0].sum(), x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_options_out_of_bounds_are_refused():
    for bad in (dict(views=0), dict(views=2.5), dict(distortion=1.5), dict(distortion=-0.1), dict(beta_adv=-1.0),
                dict(gamma_attack=-0.5), dict(interpolation="nearest")):
        with pytest.raises(CounterattackError):
            AGC(**bad)
    assert AGC().describe()["views"] == 32 and AGC.paper_precision == "fp16" and AGC.gate is None


def test_adaptive_attack_beats_the_transfer_attack_on_the_tiny_clip(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    agc = AGC(views=4)  # fewer views than the code's 32 keep the attack's cost down; the rule is the same
    budget = dict(eps=4 / 255, steps=2, step_size=1 / 255)
    result = transfer_and_adaptive(agc, tiny_classifier, images, labels, budget, rng)
    assert result["adaptive"] < result["transfer"], (result["transfer"], result["adaptive"])
    assert result["through"].abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert not torch.allclose(result["through"], result["undefended"])
