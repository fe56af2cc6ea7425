import pytest
import torch
import torch.nn.functional as F

from counterattack import CounterattackError, ZeroShotClassifier

from testkit import CIFAR10_CLASSES


def test_logits_are_scaled_cosine_similarities(random_classifier, images):
    with torch.no_grad():
        features = random_classifier.encode_image(images)
        expected = random_classifier.logit_scale * F.normalize(features, dim=-1) @ random_classifier.text_embeddings.T
        assert torch.allclose(random_classifier.logits(images), expected, atol=1e-5)
    assert torch.allclose(random_classifier.text_embeddings.norm(dim=-1), torch.ones(10), atol=1e-6)


def test_encode_image_returns_unnormalised_features(random_classifier, images):
    with torch.no_grad():
        norms = random_classifier.encode_image(images).norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-2)


def test_images_of_other_sizes_are_resized_differentiably(random_classifier):
    big = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    random_classifier.logits(big).sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0
    # Downsampling a constant image keeps it constant: the resize is a proper (antialiased) one.
    flat = torch.full((1, 3, 96, 96), 0.3)
    preprocess = random_classifier.encoder.preprocess
    assert torch.allclose(preprocess(flat), preprocess(torch.full((1, 3, 32, 32), 0.3)), atol=1e-5)


def test_input_of_the_model_size_is_only_normalised(random_classifier, images):
    encoder = random_classifier.encoder
    assert torch.equal(encoder.preprocess(images), (images - encoder.mean) / encoder.std)


def test_template_ensemble_averages_normalised_text_embeddings(random_clip_dir):
    from counterattack import load_clip

    clip = load_clip(f"local-dir:{random_clip_dir}")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    ensemble = ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, templates)
    singles = [ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, [t]).text_embeddings for t in templates]
    assert torch.allclose(ensemble.text_embeddings, F.normalize(singles[0] + singles[1], dim=-1), atol=1e-6)
    with pytest.raises(CounterattackError, match="exactly once"):
        ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES, ["no placeholder"])


def test_embeddings_are_bit_identical_with_and_without_autograd(random_classifier, images):
    with torch.no_grad():
        plain = random_classifier.encode_image(images)
    tracked = random_classifier.encode_image(images.clone().requires_grad_(True))
    assert torch.equal(plain, tracked.detach())
