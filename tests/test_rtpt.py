import copy
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from counterattack import CounterattackError, ImageRandomness, ZeroShotClassifier, count_encoder_passes
from counterattack.augment import crop_and_resize, crop_boxes, warp
from counterattack.augmix import AUGMIX_OPS, draw_views, render_views
from counterattack.defenses.rtpt import RTPT, encode_prompts, prompt_context, reliability_weights, view_entropy
from counterattack.models import LoadedCLIP

from testkit import CIFAR10_CLASSES, RANDOM_CLIP_CFG, transfer_and_adaptive

FEW_VIEWS = 8  # most tests: a few views keep them fast; the default 64 is checked for the pass count only


def rng(n: int, seed: int = 0, purpose: str = "rtpt") -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, purpose)


def as_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def eight_bit_images() -> torch.Tensor:
    """A smooth 224-px image, a noisy one and one with few levels, on 8-bit levels."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 14, 14, generator=g), size=(224, 224), mode="bilinear")[0]
    noisy = torch.randint(30, 200, (3, 224, 224), generator=g) / 255
    few = (torch.randint(0, 256, (3, 224, 224), generator=g) // 40 * 40 + 7) / 255
    return torch.stack([(smooth * 255).round() / 255, noisy, few])


# --- 1. the views: inside the [0, 1] box, the image itself first, AugMix's operations as PIL does them ---


@pytest.mark.parametrize("augmentation", ["augmix", "crop-flip"])
def test_views_stay_in_the_box_and_the_first_is_the_image(images, augmentation):
    views = render_views(images, draw_views(rng(len(images)), FEW_VIEWS, 1.0, images.device), augmentation)
    assert views.shape == (len(images), FEW_VIEWS, *images.shape[1:])
    assert views.min() >= -1e-6 and views.max() <= 1 + 1e-6
    assert torch.equal(views[:, 0], images)
    moved = (views[:, 1:] - images[:, None]).abs().flatten(2).amax(dim=-1)
    assert (moved > 0.05).all()  # every other view is really augmented


def test_rtpt_leaves_the_image_alone(random_classifier, images):
    """R-TPT has no input perturbation (its eps ball is {0}): it returns logits and no defended images."""
    output = RTPT(views=FEW_VIEWS)(random_classifier, images[:2], rng(2))
    assert output.images is None and output.score is None and output.counterattacked is None
    assert output.logits.shape == (2, 10) and torch.isfinite(output.logits).all()


def test_augmix_views_by_hand(images):
    """Each view: crop and flip, three chains of 1-3 operations, Dirichlet(1,1,1) mix, Beta(1,1) blend."""
    from counterattack.augmix import PIXEL_OPS, _op_theta

    x = images[:2]
    draws = draw_views(rng(2), 4, 1.0, x.device)
    views = render_views(x, draws)
    for i in range(2):
        for v in range(3):
            box = crop_boxes(draws.crop[i, v][None], 32, 32)
            cropped = crop_and_resize(x[i : i + 1], box, draws.flip[i, v][None] < 0.5)
            exponentials = -torch.log(1 - draws.mixing[i, v, :3])
            weights, blend = exponentials / exponentials.sum(), draws.mixing[i, v, 3]
            mix = torch.zeros_like(cropped)
            for c in range(3):
                chain = cropped
                for s in range(1 + int(draws.depth[i, v, c] * 3)):
                    index = int(draws.op[i, v, c, s] * 9)
                    level = draws.level[i, v, c, s : s + 1]
                    sign = torch.tensor([-1.0 if draws.sign[i, v, c, s] > 0.5 else 1.0])
                    if AUGMIX_OPS[index] in PIXEL_OPS:
                        chain = PIXEL_OPS[AUGMIX_OPS[index]](chain, level)
                    else:
                        chain = warp(chain, _op_theta(torch.tensor([index]), level, sign, 32, 32), "zeros")
                mix = mix + weights[c] * chain
            assert torch.allclose(views[i, v + 1], (blend * cropped + (1 - blend) * mix)[0], atol=1e-6)


def test_crops_follow_random_resized_crop():
    uniforms = torch.rand(2000, 10, 4, generator=torch.Generator().manual_seed(0))
    top, left, h, w = crop_boxes(uniforms, 32, 40).unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    assert (h == h.round()).all() and (w == w.round()).all() and (h >= 1).all() and (w >= 1).all()
    area, ratio = h * w / (32 * 40), w / h
    assert area.max() <= 1.05 and area.min() >= 0.05 and ratio.min() >= 0.6 and ratio.max() <= 1.6
    # The first attempt that fits is taken; when none fits (full area at ratio 4/3 on a square), the whole image.
    # Area 0.54 * 1024 at ratio 1: 24 x 24, at the bottom of the left offsets (floor(0.999 * 9) = 8).
    first_fits = torch.tensor([[[0.5, 0.5, 0.0, 0.999]] + [[0.1, 0.1, 0.5, 0.5]] * 9])
    assert crop_boxes(first_fits, 32, 32).tolist() == [[0.0, 8.0, 24.0, 24.0]]
    none_fits = torch.tensor([[[1.0 - 1e-7, 1.0 - 1e-7, 0.0, 0.0]] * 10])
    assert crop_boxes(none_fits, 32, 32).tolist() == [[0.0, 0.0, 32.0, 32.0]]


def test_crop_and_resize_equals_cropping_then_resizing(images):
    boxes = torch.tensor([[4.0, 8.0, 16.0, 16.0], [0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 20.0, 11.0],
                          [0.0, 21.0, 32.0, 11.0], [10.0, 10.0, 3.0, 7.0], [1.0, 2.0, 30.0, 29.0]])
    for flip in (False, True):
        ours = crop_and_resize(images, boxes, torch.full((len(images),), flip))
        for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
            expected = F.interpolate(images[i : i + 1, :, top : top + h, left : left + w], size=(32, 32),
                                     mode="bilinear", align_corners=False)[0]
            assert torch.allclose(ours[i], expected.flip(-1) if flip else expected, atol=1e-6)


@pytest.mark.parametrize("name, pil_op, level, exact", [
    ("equalize", ImageOps.equalize, 0.5, True),
    ("posterize", lambda im: ImageOps.posterize(im, 4), 0.9, True),  # severity 1 always keeps 4 bits
    ("solarize", lambda im: ImageOps.solarize(im, 256 - 17), 0.7, True),  # int(0.7 * 25.6) = 17
    ("autocontrast", ImageOps.autocontrast, 0.5, False),  # ours is PIL's without its 8-bit truncation
])
def test_colour_operations_match_pil(name, pil_op, level, exact):
    from counterattack.augmix import PIXEL_OPS

    x = eight_bit_images()
    ours = PIXEL_OPS[name](x, torch.full((len(x),), level))
    expected = torch.stack([from_pil(pil_op(as_pil(image))) for image in x])
    difference = (ours * 255 - expected * 255).abs().max().item()
    assert difference < 1e-3 if exact else difference <= 1 + 1e-3


def test_geometric_operations_match_pil():
    from counterattack.augmix import _op_theta

    x = eight_bit_images()[:1].expand(5, -1, -1, -1)
    names = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
    level = 0.9  # 2 degrees, shear 0.027, 6 px at 224
    ours = warp(x, _op_theta(torch.tensor([AUGMIX_OPS.index(n) for n in names]), torch.full((5,), level),
                             torch.ones(5), 224, 224), "zeros")
    shear, shift = level * 0.3 / 10, int(level * 224 / 3 / 10)
    affine = lambda *data: (lambda im: im.transform((224, 224), Image.AFFINE, data, resample=Image.BILINEAR))  # noqa: E731
    references = [lambda im: im.rotate(int(level * 3), resample=Image.BILINEAR), affine(1, shear, 0, 0, 1, 0),
                  affine(1, 0, 0, shear, 1, 0), affine(1, 0, shift, 0, 1, 0), affine(1, 0, 0, 0, 1, shift)]
    for i, reference in enumerate(references):
        expected = from_pil(reference(as_pil(x[i])))
        interior = (ours[i] - expected)[:, 8:-8, 8:-8].abs().max().item()
        assert interior <= 1.5 / 255, names[i]


# --- 2. determinism and batch-size invariance -------------------------------------------------------------


def test_seeded_determinism(random_classifier, images):
    defense, images = RTPT(views=FEW_VIEWS), images[:3]
    first = defense(random_classifier, images, rng(len(images), seed=3)).logits
    again = defense(random_classifier, images, rng(len(images), seed=3)).logits
    other = defense(random_classifier, images, rng(len(images), seed=4)).logits
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("augmentation", ["augmix", "crop-flip"])
def test_batch_size_invariance(random_classifier, images, augmentation):
    defense = RTPT(views=FEW_VIEWS, augmentation=augmentation)
    ids = list(range(10, 10 + len(images)))
    whole = defense(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p")).logits
    # Chunks of two images (the memory bound) must not change anything either.
    chunked = RTPT(views=FEW_VIEWS, augmentation=augmentation, chunk_prompts=20)
    assert torch.allclose(chunked(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p")).logits,
                          whole, atol=1e-5)
    for i, image_id in enumerate(ids):
        own = ImageRandomness.for_images(0, "d", [image_id], "p")
        alone = defense(random_classifier, images[i : i + 1], own).logits
        assert alone.argmax(-1).item() == whole[i].argmax().item()
        assert torch.allclose(alone[0], whole[i], atol=1e-4)


# --- 3. the reliability weights and the tuned mix, by hand ------------------------------------------------


def test_reliability_weights_by_hand():
    # Four views on a circle: cosines 0-1 .8, 0-2 .6, 0-3 0, 1-2 .96, 1-3 .6, 2-3 .8.
    features = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]])
    # Two neighbours: view 0 -> (.8 + .6) / 2 = .7, view 1 -> (.96 + .8) / 2 = .88, view 2 -> .88, view 3 -> .7.
    z = 2 * math.exp(0.7 / 0.1) + 2 * math.exp(0.88 / 0.1)
    expected = [math.exp(7) / z, math.exp(8.8) / z, math.exp(8.8) / z, math.exp(7) / z]
    assert reliability_weights(features, 2, 0.1)[0].tolist() == pytest.approx(expected, rel=1e-5)
    # More neighbours than other views: every other view counts. View 0: (.8 + .6 + 0) / 3.
    scores = torch.tensor([1.4 / 3, 2.36 / 3, 2.36 / 3, 1.4 / 3])
    assert torch.allclose(reliability_weights(features, 20, 0.01)[0], torch.softmax(scores / 0.01, dim=0), rtol=1e-4)
    # A view is never its own neighbour, but an identical view is (the code's mask would drop it too).
    duplicated = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    z = 2 * math.exp(1.0 / 0.1) + math.exp(0.0)
    expected = [math.exp(10) / z] * 2 + [1 / z]
    assert reliability_weights(duplicated, 1, 0.1)[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_the_untuned_prompt_is_the_classifiers_own(random_classifier):
    prompt = prompt_context(random_classifier)
    assert prompt.length == 6  # "this is a photo of a"
    text = encode_prompts(prompt, prompt.init[None])[0]
    assert torch.allclose(text, random_classifier.text_embeddings, atol=1e-6)


def test_tuning_and_mix_by_hand(random_classifier, images):
    """One AdamW step on the mean entropy of the most confident views, then the reliability-weighted mix,
    recomputed with open_clip's own encode_text: the context lives in spare rows of a copy's token table."""
    defense = RTPT(views=10, selection=0.2, neighbours=3)  # 2 selected views, 3 neighbours
    x = images[:2]
    output = defense(random_classifier, x, rng(len(x))).logits

    with torch.no_grad():
        views = render_views(x, draw_views(rng(len(x)), 10, 1.0, x.device))
        features = F.normalize(random_classifier.encode_image(views.flatten(0, 1)), dim=-1).view(2, 10, -1)
    clip = random_classifier.clip
    model = copy.deepcopy(clip.model)
    tokens = clip.tokenizer([f"This is a photo of a {name}." for name in CIFAR10_CLASSES])
    spare = torch.arange(1000, 1006)
    assert not torch.isin(tokens, spare).any()
    tokens[:, 1:7] = spare
    initial = clip.model.token_embedding(clip.tokenizer(["This is a photo of a"]))[0, 1:7]
    scale, lr, decay = random_classifier.logit_scale, 5e-3, 0.01
    for i in range(2):
        # Reliability: mean cosine to the 3 most similar other views, softmax at temperature 0.01.
        similarity = features[i] @ features[i].T
        scores = torch.stack([similarity[v, [u for u in range(10) if u != v]].sort(descending=True).values[:3].mean()
                              for v in range(10)])
        weights = torch.softmax(scores / 0.01, dim=0)
        # The entropy of the 2 most confident views under the initial prompt, and its gradient.
        table = model.token_embedding.weight
        with torch.no_grad():
            table[spare] = initial
        table.requires_grad_(True)
        logits = scale * features[i] @ F.normalize(model.encode_text(tokens), dim=-1).T
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        loss = entropy[entropy.argsort()[:2]].mean()
        (gradient,) = torch.autograd.grad(loss, table)
        table.requires_grad_(False)
        g = gradient[spare]
        # Adam's first step from a fresh state, bias-corrected: m = g, v = g^2; decoupled weight decay first.
        tuned = initial * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
        with torch.no_grad():
            table[spare] = tuned
            tuned_logits = scale * features[i] @ F.normalize(model.encode_text(tokens), dim=-1).T
        expected = (weights[:, None] * tuned_logits).sum(0)
        assert torch.allclose(output[i], expected, atol=1e-4)
        # The step mattered: the untuned prompt gives other logits.
        assert not torch.allclose((weights[:, None] * logits.detach()).sum(0), expected, atol=1e-3)


def test_the_step_lowers_the_entropy_of_the_selected_views(random_classifier, images):
    defense = RTPT(views=16, selection=0.25)
    with torch.no_grad():
        views = render_views(images, draw_views(rng(len(images)), 16, 1.0, images.device))
        features = F.normalize(random_classifier.encode_image(views.flatten(0, 1)), dim=-1).view(len(images), 16, -1)
    prompt = prompt_context(random_classifier)
    tuned = defense.tune_context(prompt, features, random_classifier.logit_scale)
    assert torch.allclose((tuned - prompt.init).abs().amax(dim=(1, 2)), torch.full((len(images),), 5e-3), rtol=0.01)
    with torch.no_grad():
        def entropy(context: torch.Tensor) -> torch.Tensor:
            text = encode_prompts(prompt, context).transpose(1, 2)
            return view_entropy(random_classifier.logit_scale * features @ text)

        before, after = entropy(prompt.init[None]), entropy(tuned)
    selected = before.argsort(dim=1)[:, :4]
    assert (after.gather(1, selected).mean(1) < before.gather(1, selected).mean(1)).all()


def test_no_tuning_step_is_the_weighted_zero_shot_ensemble(random_classifier, images):
    defense = RTPT(views=FEW_VIEWS, steps=0)
    output = defense(random_classifier, images, rng(len(images))).logits
    with torch.no_grad():
        views = render_views(images, draw_views(rng(len(images)), FEW_VIEWS, 1.0, images.device))
        features = random_classifier.encode_image(views.flatten(0, 1))
        logits = random_classifier.logits_from_embeddings(features).view(len(images), FEW_VIEWS, -1)
        weights = reliability_weights(F.normalize(features, dim=-1).view(len(images), FEW_VIEWS, -1), 20, 0.01)
    assert torch.allclose(output, (weights[..., None] * logits).sum(1), atol=1e-5)


def test_selection_keeps_the_lowest_entropy_views():
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    assert view_entropy(logits).argsort().tolist() == [1, 2, 0]
    assert RTPT().selected_views == 6 and RTPT(views=8).selected_views == 1
    assert RTPT(views=30, selection=0.2).selected_views == 6


# --- 4. the counted passes at the defaults --------------------------------------------------------------


class TextPasses:
    """Prompt sequences through the text transformer, forward and backward, counted by hooks on it."""

    def __init__(self, model: torch.nn.Module):
        self.forwards = self.backwards = 0
        self.handle = model.transformer.register_forward_hook(self._forward)

    def _forward(self, module, args, output) -> None:
        self.forwards += len(output)
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.backwards += len(grad)


def test_passes_at_the_defaults(random_classifier, images):
    x, classes = images[:2], random_classifier.num_classes
    text = TextPasses(random_classifier.clip.model)
    try:
        with count_encoder_passes() as passes:
            RTPT()(random_classifier, x, rng(len(x)))
    finally:
        text.handle.remove()
    # 64 views, each embedded once (the code as shipped recomputes them: 1 + 4 x 64), no image backward.
    assert (passes.forwards / len(x), passes.backwards / len(x)) == (64, 0)
    # The text encoder: every class prompt once with a graph (the step) and once tuned; one backward.
    assert (text.forwards / len(x), text.backwards / len(x)) == (2 * classes, classes)
    assert RTPT().describe()["text_encoder_per_image"] == {"forwards": 2, "backwards": 1, "over": "every class prompt"}


def test_attack_view_passes(random_classifier, images):
    x = images[:2].clone().requires_grad_(True)
    with count_encoder_passes() as passes:
        view = RTPT(views=FEW_VIEWS).attack_view(random_classifier, x, rng(len(x)), "exact")
        view.logits.sum().backward()
    # The views are embedded once with a graph; the tuning reuses those embeddings, detached.
    assert (passes.forwards, passes.backwards) == (FEW_VIEWS * 2, FEW_VIEWS * 2)


# --- the adaptive view ------------------------------------------------------------------------------------


def test_attack_view_is_the_defense_with_a_gradient(random_classifier, images):
    defense = RTPT(views=FEW_VIEWS)
    output = defense(random_classifier, images, rng(len(images))).logits
    gradients = {}
    for method in ("exact", "bpda"):
        x = images.clone().requires_grad_(True)
        view = defense.attack_view(random_classifier, x, rng(len(images)), method)
        assert view.score is None
        assert torch.allclose(view.logits, output, atol=1e-4)  # the same draws give the same logits
        labels = output.argmin(-1)
        (gradients[method],) = torch.autograd.grad(F.cross_entropy(view.logits, labels, reduction="sum"), x)
        assert gradients[method].abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert not torch.allclose(gradients["exact"], gradients["bpda"])
    # EOT: each call draws fresh views.
    streams = rng(len(images))
    first = defense.attack_view(random_classifier, images, streams, "exact").logits
    second = defense.attack_view(random_classifier, images, streams, "exact").logits
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="unknown adaptive method"):
        defense.attack_view(random_classifier, images, rng(len(images)), "fgsm")


def test_exact_gradient_through_a_crop_flip_view_matches_finite_differences(random_classifier, images):
    """With crop and flip alone every view is differentiable: the gradient is the logits' own (context held)."""
    defense = RTPT(views=4, augmentation="crop-flip", steps=0)
    x = (0.1 + 0.8 * images[:1]).clone().requires_grad_(True)  # room for the finite differences
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    logits = defense.attack_view(random_classifier, x, rng(1), "exact").logits
    (gradient,) = torch.autograd.grad(logits[0, 3], x)
    step = 1e-3
    with torch.no_grad():
        plus = defense.attack_view(random_classifier, x + step * direction, rng(1), "exact").logits[0, 3]
        minus = defense.attack_view(random_classifier, x - step * direction, rng(1), "exact").logits[0, 3]
    assert float((plus - minus) / (2 * step)) == pytest.approx(float((gradient * direction).sum()), rel=0.05, abs=1e-3)


# --- refusals -----------------------------------------------------------------------------------------------


def test_refuses_what_it_cannot_tune(random_classifier):
    clip = random_classifier.clip
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    two_templates = ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, ["a photo of a {}.", "a {}."])
    with pytest.raises(CounterattackError, match="one prompt template"):
        RTPT(views=4)(two_templates, x, rng(1))
    bare_template = ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, ["{}"])
    with pytest.raises(CounterattackError, match="words before the class name"):
        RTPT(views=4)(bare_template, x, rng(1))
    bare = ZeroShotClassifier(random_classifier.encoder, random_classifier.text_embeddings, 10.0, CIFAR10_CLASSES)
    with pytest.raises(CounterattackError, match="from_clip"):
        RTPT(views=4)(bare, x, rng(1))
    torch.manual_seed(0)
    custom = open_clip.CustomTextCLIP(**RANDOM_CLIP_CFG)
    custom_classifier = ZeroShotClassifier.from_clip(LoadedCLIP.from_model(custom, clip.tokenizer), CIFAR10_CLASSES)
    with pytest.raises(CounterattackError, match="CustomTextCLIP"):
        RTPT(views=4)(custom_classifier, x, rng(1))
    with pytest.raises(CounterattackError, match="views must be >= 2"):
        RTPT(views=1)
    with pytest.raises(CounterattackError, match="augmentation must be one of"):
        RTPT(augmentation="randaugment")


# --- 5. the adaptive attack on the tiny CLIP --------------------------------------------------------------


def test_adaptive_attack_beats_the_transfer_attack_on_the_tiny_clip(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    # Crop-and-flip views (R-TPT's choice for the ImageNet family) pass a clean gradient, where AugMix's random
    # operations drown a few steps' gain in their draws; and a large budget, for the same reason.
    defense = RTPT(views=FEW_VIEWS, augmentation="crop-flip")
    budget = dict(eps=8 / 255, steps=4, step_size=2 / 255)

    result = transfer_and_adaptive(defense, tiny_classifier, images, labels, budget, rng)
    # Of 40 (10 images, 4 test-time draws), measured here: 15 right after the transfer attack, 7 after the adaptive.
    assert result["adaptive"] < result["transfer"], (result["transfer"], result["adaptive"])
    through_rtpt, undefended = result["through"], result["undefended"]
    assert through_rtpt.abs().sum(dim=(1, 2, 3)).gt(0).all()
    cosine = F.cosine_similarity(through_rtpt.flatten(1), undefended.flatten(1), dim=1)
    assert (cosine < 0.99).all()
