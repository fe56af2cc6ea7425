import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage
from torchvision.transforms import InterpolationMode

from counterattack import CounterattackError, ImageRandomness, ZeroShotClassifier, count_encoder_passes
from counterattack.defenses.dbd import DBD, DEFAULT_TEMPLATE
from counterattack.augment import crop_boxes
from counterattack.defenses._dbd_views import (
    CROP_ATTEMPTS, CROP_SCALE, CROPS, NOISE_VIEWS, bit_depth_levels, box_filter, crop_views, draw_views,
    gaussian_filter, median_filter, pixel_views,
)

from testkit import CIFAR10_CLASSES, threshold_between, transfer_and_adaptive

# The view order of the authors' Augmenter: the image, 16 crops, then these 15 at the input's resolution.
BIT_DEPTH, JPEG, NOISE, FILTERS = slice(0, 3), slice(3, 6), slice(6, 12), slice(12, 15)


def rng(n: int, seed: int = 0) -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, "dbd")


def eight_bit(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Smooth random 8-bit images (upsampled noise, so JPEG has structure to keep) as [0, 1] pixels."""
    coarse = torch.rand(shape[0], 3, shape[2] // 4, shape[3] // 4, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
    return torch.round(smooth * 255) / 255


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return np.round(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# --- the views, each against a reference -------------------------------------------------------------------


def test_bit_depth_follows_the_codes_formula_with_its_uint8_wrap():
    levels = torch.arange(256, dtype=torch.float32)
    as_numpy = np.arange(256, dtype=np.float32) / 32  # the code's np.array(img).astype(np.float32) / interval
    for rounding, numpy_op in (("floor", np.floor), ("round", np.round), ("ceil", np.ceil)):
        expected = (numpy_op(as_numpy) * 32) % 256  # uint8 wraps 256 to 0 on the x86 machines the code ran on
        assert np.array_equal(bit_depth_levels(levels, rounding).numpy(), expected), rounding
    wrapped = {rounding: bit_depth_levels(levels, rounding) for rounding in ("round", "ceil")}
    # The brightest pixels turn black: round from 240 (7.5 rounds to even, 8), ceil above 224.
    assert wrapped["round"][239] == 224 and wrapped["round"][240] == 0 and wrapped["round"][255] == 0
    assert wrapped["ceil"][224] == 224 and wrapped["ceil"][225] == 0
    assert bit_depth_levels(levels, "round")[208] == 192  # 6.5 rounds half to even, as numpy


def test_jpeg_views_are_pils_round_trip_of_the_8_bit_image():
    images = eight_bit((2, 3, 32, 40), seed=0)
    # A float input reads its nearest 8-bit levels: moving each pixel by less than half a level changes nothing.
    nudged = images + (torch.rand(images.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.9 / 255
    for x in (images, nudged.clamp(0, 1)):
        views = pixel_views(x, draw_views(rng(len(x)), x))
        for i in range(len(x)):
            for k, quality in enumerate((50, 60, 75)):
                buffer = io.BytesIO()
                Image.fromarray(as_uint8(images[i])).save(buffer, format="JPEG", quality=quality)
                expected = np.asarray(Image.open(buffer))
                assert np.array_equal(as_uint8(views[i, JPEG][k]), expected), quality
            assert np.array_equal(as_uint8(views[i, BIT_DEPTH][0]), as_uint8(images[i]) // 32 * 32)


def test_noise_views_add_sigma_point_one_clip_and_truncate():
    images = eight_bit((2, 3, 32, 32), seed=2)
    draw = draw_views(rng(len(images)), images)
    views = pixel_views(images, draw)
    levels = np.round(images.numpy().astype(np.float64) * 255)
    for k in range(NOISE_VIEWS):
        noise = draw.noise[:, k].numpy().astype(np.float64)
        expected = np.floor(np.clip(levels / 255 + 0.1 * noise, 0, 1) * 255)
        got = np.round(views[:, NOISE][:, k].numpy().astype(np.float64) * 255)
        # float32 here, float64 in the code: a value a hair from a level may truncate the other way
        assert np.mean(got != expected) < 1e-3 and np.abs(got - expected).max() <= 1
    # Six fresh standard normal fields per image.
    assert abs(float(draw.noise.mean())) < 0.02 and abs(float(draw.noise.std()) - 1) < 0.02
    assert not torch.equal(draw.noise[:, 0], draw.noise[:, 1])


def test_filters_are_opencvs_5x5_median_box_and_binomial_with_its_borders():
    x = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(3))
    binomial = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256
    views = pixel_views(x, draw_views(rng(len(x)), x))[:, FILTERS]
    for i in range(len(x)):
        for c in range(3):
            plane = x[i, c].double().numpy()
            expected = {
                "median": ndimage.median_filter(plane, size=5, mode="nearest"),  # OpenCV's median: replicate
                "box": ndimage.uniform_filter(plane, size=5, mode="mirror"),  # mirror = BORDER_REFLECT_101
                "gaussian": ndimage.correlate(plane, binomial, mode="mirror"),
            }
            for k, (name, reference) in enumerate(expected.items()):
                assert np.allclose(views[i, k, c].numpy(), reference, atol=1e-6), name


def test_filters_equal_opencv_on_8_bit_images_where_it_is_installed():
    cv2 = pytest.importorskip("cv2")  # the test extra installs it; a user without it skips this comparison
    images = eight_bit((1, 3, 24, 28), seed=4)
    picture = as_uint8(images[0])
    # On levels 0..255 rather than [0, 1]: the filters are linear (the median ordinal), and the binomial's sixteenths
    # of integers are exact in float32, so halves are halves, as in OpenCV's fixed-point arithmetic.
    levels = torch.round(images * 255)
    ours = {"median": median_filter(levels), "box": box_filter(levels), "gaussian": gaussian_filter(levels)}
    theirs = {"median": cv2.medianBlur(picture, 5), "box": cv2.blur(picture, (5, 5)),
              "gaussian": cv2.GaussianBlur(picture, (5, 5), 0)}
    for name, filtered in ours.items():
        levels = filtered[0].permute(1, 2, 0).double().numpy()
        # OpenCV stores uint8: the box rounds to nearest, the fixed-point Gaussian rounds halves up.
        rounded = np.floor(levels + 0.5) if name == "gaussian" else np.rint(levels)
        assert np.array_equal(rounded, theirs[name]), name


def reference_box(attempts: list[list[float]], position: list[float], height: int, width: int) -> tuple:
    """torchvision's RandomResizedCrop.get_params, written out in Python, on the given uniforms."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for scale_u, ratio_u in attempts:
        target_area = area * (0.5 + scale_u * 0.5)
        aspect_ratio = math.exp(log_ratio[0] + ratio_u * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(position[0] * (height - h + 1)), int(position[1] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width", [(32, 32), (24, 32), (20, 40)])
def test_crop_boxes_follow_torchvisions_get_params(height, width):
    streams = rng(3)
    attempts = streams.uniform(CROPS, CROP_ATTEMPTS, 2)
    attempts[0, 0] = 0.9999  # every attempt too large for the image: torchvision's fallback
    positions = streams.uniform(CROPS, 2)
    boxes = crop_boxes(attempts.double(), height, width, CROP_SCALE, positions=positions.double())
    for i in range(3):
        for k in range(CROPS):
            expected = reference_box(attempts[i, k].double().tolist(), positions[i, k].double().tolist(), height,
                                     width)
            assert tuple(int(v) for v in boxes[i, k]) == expected, (i, k)
    area = boxes[..., 2] * boxes[..., 3] / (height * width)
    assert area.min() >= 0.45 and area.max() <= 1.0


def test_crops_are_torchvisions_resized_crop_and_flip_at_the_models_side():
    images = eight_bit((2, 3, 24, 32), seed=5)
    draw = draw_views(rng(len(images)), images)
    side = (40, 40)  # the model's input side, as the code's RandomResizedCrop(224)
    crops = crop_views(images, draw, side)
    assert draw.flips.any() and not draw.flips.all()
    for i in range(len(images)):
        picture = Image.fromarray(as_uint8(images[i]))
        for k in range(CROPS):
            top, left, h, w = (int(v) for v in draw.boxes[i, k])
            tensor = TF.resized_crop(images[i], top, left, h, w, list(side), InterpolationMode.BILINEAR,
                                     antialias=True)
            pil = TF.resized_crop(picture, top, left, h, w, list(side), InterpolationMode.BILINEAR)
            if draw.flips[i, k]:
                tensor, pil = TF.hflip(tensor), TF.hflip(pil)
            assert torch.allclose(crops[i, k], tensor, atol=1e-5), (i, k)
            # PIL keeps 8 bits (and fixed-point weights): within one level
            assert np.abs(as_uint8(crops[i, k]).astype(int) - np.asarray(pil).astype(int)).max() <= 1


# --- the directional bias: selection, DB-score, shift ------------------------------------------------------


def test_selection_score_and_shift_against_a_numpy_computation(random_classifier, images):
    x = images[:4]
    dbd = DBD()
    result = dbd.directional_bias(random_classifier, x, rng(len(x)))
    # The 32 features are the normalised embeddings of the image, the 16 crops and the 15 pixel views, in order.
    draw = draw_views(rng(len(x)), x)
    views = [x.unsqueeze(1), crop_views(x, draw, random_classifier.encoder.image_size), pixel_views(x, draw)]
    with torch.no_grad():
        embedded = torch.cat([random_classifier.encoder(v.flatten(0, 1)).view(len(x), v.shape[1], -1)
                              for v in views], dim=1)
    assert torch.allclose(result.features, F.normalize(embedded, dim=-1), atol=1e-5)

    dbd = DBD(db_thres=threshold_between(result.score))  # flags some of the four images, not all
    output = dbd(random_classifier, x, rng(len(x)))
    texts = dbd.class_embeddings(random_classifier).double().numpy()
    scale = random_classifier.logit_scale
    for i in range(len(x)):
        features = result.features[i].double().numpy()
        logits = scale * features @ texts.T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        entropies = -(p * np.log(p)).sum(axis=1)
        chosen = np.argsort(entropies[1:], kind="stable")[:16] + 1
        assert set(result.selected[i].tolist()) == set(chosen.tolist())
        moves = features[chosen] - features[0]
        direction = moves.mean(axis=0)
        unit = moves / (np.linalg.norm(moves, axis=1, keepdims=True) + 1e-8)
        score = float((unit @ (direction / (np.linalg.norm(direction) + 1e-8))).mean())
        flagged = score > dbd.db_thres
        defended = features[0] + (2.5 if flagged else 1.0) * direction
        expected_logits = scale * (defended / (np.linalg.norm(defended) + 1e-8)) @ texts.T
        assert abs(float(output.score[i]) - score) < 1e-5
        assert bool(output.counterattacked[i]) == flagged
        assert np.allclose(output.logits[i].numpy(), expected_logits, atol=1e-4)
    assert output.counterattacked.any() and not output.counterattacked.all()


def test_cost_is_32_forwards_and_no_backward_and_the_views_are_counted_through_attacks(random_classifier, images):
    x = images[:2]
    with count_encoder_passes() as passes:
        DBD()(random_classifier, x, rng(len(x)))
    assert (passes.forwards, passes.backwards) == (32 * len(x), 0)
    for method, backwards in (("exact", 32), ("bpda", 1)):
        with count_encoder_passes() as passes:
            view = DBD().attack_view(random_classifier, x.clone().requires_grad_(True), rng(len(x)), method)
            view.logits.sum().backward()
        assert (passes.forwards, passes.backwards) == (32 * len(x), backwards * len(x)), method


def test_batch_size_invariance(random_classifier, images):
    x = images[:3]
    ids = [11, 12, 13]
    dbd = DBD()
    whole = dbd(random_classifier, x, ImageRandomness.for_images(0, "d", ids, "p"))
    whole_result = dbd.directional_bias(random_classifier, x, ImageRandomness.for_images(0, "d", ids, "p"))
    for i, image_id in enumerate(ids):
        alone = dbd(random_classifier, x[i : i + 1], ImageRandomness.for_images(0, "d", [image_id], "p"))
        result = dbd.directional_bias(random_classifier, x[i : i + 1],
                                      ImageRandomness.for_images(0, "d", [image_id], "p"))
        assert torch.equal(result.selected[0], whole_result.selected[i])
        assert torch.allclose(alone.logits[0], whole.logits[i], atol=1e-4)
        assert torch.allclose(alone.score[0], whole.score[i], atol=1e-5)


def test_attack_view_is_the_defense_and_passes_gradients(random_classifier, images):
    x = images[:3]
    dbd = DBD(db_thres=0.0)  # every image shifted 2.5 times: the extrapolation is what the attack goes through
    expected = dbd(random_classifier, x, rng(len(x)))
    gradients = {}
    for method in ("exact", "bpda"):
        pixels = x.clone().requires_grad_(True)
        view = dbd.attack_view(random_classifier, pixels, rng(len(x)), method, with_score=True)
        assert torch.allclose(view.logits, expected.logits, atol=1e-5), method
        assert torch.allclose(view.score, expected.score, atol=1e-6), method
        loss = F.cross_entropy(view.logits, torch.zeros(len(x), dtype=torch.long))
        (gradients[method],) = torch.autograd.grad(loss, pixels, retain_graph=True)
        assert torch.isfinite(gradients[method]).all() and gradients[method].abs().sum(dim=(1, 2, 3)).gt(0).all()
        (score_gradient,) = torch.autograd.grad(view.score.sum(), pixels)
        assert score_gradient.abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert not torch.allclose(gradients["exact"], gradients["bpda"])
    streams = rng(len(x))  # EOT: every call draws fresh views
    first = dbd.attack_view(random_classifier, x, streams, "exact").logits
    assert not torch.allclose(first, dbd.attack_view(random_classifier, x, streams, "exact").logits)


# --- DBD's classifier --------------------------------------------------------------------------------------


def text_embeddings(clip, sentences: list[str]) -> torch.Tensor:
    """Normalised text embeddings straight from the model and its tokenizer."""
    with torch.no_grad():
        embedded = clip.model.encode_text(clip.tokenizer(sentences)).float()
    return embedded / embedded.norm(dim=-1, keepdim=True)


def test_descriptions_join_the_template_and_a_missing_class_is_refused(random_classifier, images):
    clip = random_classifier.clip
    descriptions = {name: [f"a blurry picture of a {name}.", f"a {name} seen from far away."]
                    for name in CIFAR10_CLASSES}
    described = ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, descriptions=descriptions)
    dbd = DBD(template="{} texture.")
    expected = torch.stack([F.normalize(text_embeddings(clip, ["{} texture.".format(name), *descriptions[name]])
                                        .mean(dim=0), dim=0) for name in CIFAR10_CLASSES])
    assert torch.allclose(dbd.class_embeddings(described), expected, atol=1e-5)

    # Without descriptions, the template alone; the run's own templates play no part.
    other_templates = ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, templates=("itap of a {}.",))
    template_alone = text_embeddings(clip, ["{} texture.".format(name) for name in CIFAR10_CLASSES])
    assert torch.allclose(dbd.class_embeddings(other_templates), template_alone, atol=1e-5)
    assert not torch.allclose(expected, template_alone, atol=1e-3)
    x = images[:2]
    assert not torch.allclose(dbd(described, x, rng(2)).logits, dbd(other_templates, x, rng(2)).logits)

    partial = {name: sentences for name, sentences in descriptions.items() if name != "frog"}
    lacking = ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, descriptions=partial)
    with pytest.raises(CounterattackError, match="frog"):
        dbd(lacking, x, rng(2))


def test_the_template_resolves_per_dataset_as_the_code_chooses():
    assert DBD().for_dataset("dtd").template == "{} texture."
    assert DBD().for_dataset("eurosat").template == "a central satellite photo of a {}."
    assert DBD().for_dataset("oxford_pets").template == "a photo of a {}, a type of pet."
    assert DBD().for_dataset("imagefolder:/data/flowers102/test").template == "a photo of a {}, a type of flower."
    for dataset in ("cifar10", "imagenet", "stanford_cars"):
        assert DBD().for_dataset(dataset).template == DEFAULT_TEMPLATE
    assert DBD(template="a {} in the wild.").for_dataset("dtd").template == "a {} in the wild."
    assert DBD().class_template == DEFAULT_TEMPLATE


@pytest.mark.parametrize("settings, message", [
    ({"selected": 0}, "selected"), ({"selected": 32}, "selected"), ({"selected": 2.5}, "integer"),
    ({"db_thres": 1.5}, "db_thres"), ({"shift": -1.0}, "shift"), ({"template": "a photo"}, "template"),
])
def test_options_out_of_bounds_are_refused(settings, message):
    with pytest.raises(CounterattackError, match=message):
        DBD(**settings)


# --- on the trained tiny CLIP --------------------------------------------------------------------------------


def test_adaptive_attack_beats_the_transfer_attack_on_the_tiny_clip(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    budget = dict(eps=4 / 255, steps=2, step_size=2 / 255)
    result = transfer_and_adaptive(DBD(), tiny_classifier, images, labels, budget, rng)
    # Of 40 (10 images, 4 test-time draws), measured here: 20 right after the true-label transfer attack (the
    # undefended model: 0), 7 after the adaptive one; on the clean images 25 (undefended: 32).
    assert result["adaptive"] < result["transfer"], (result["transfer"], result["adaptive"])
    through, undefended = result["through"], result["undefended"]
    assert through.abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert F.cosine_similarity(through.flatten(1), undefended.flatten(1), dim=1).mean() < 0.95
