import os

# Before anything imports huggingface_hub: a failed hub look-up must not wait for time-outs.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from counterattack import ZeroShotClassifier, load_clip

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY_CLIP_DIR = SHARED / "models" / "tiny-clip-cifar10"
CIFAR10_TEST_DIR = SHARED / "data" / "cifar10" / "test"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

SHARED_PRESENT = TINY_CLIP_DIR.is_dir() and CIFAR10_TEST_DIR.is_dir()
# Under CI the assets are always there: a missing ../shared must fail, not skip the end-to-end tests.
IN_CI = bool(os.environ.get("CI"))

needs_shared = pytest.mark.skipif(
    not SHARED_PRESENT and not IN_CI,
    reason=f"test assets not found at {SHARED} (the tiny CLIP and CIFAR-10 images live beside the project)",
)


def pytest_sessionstart(session) -> None:
    if IN_CI and not SHARED_PRESENT:
        raise pytest.UsageError(f"CI is set but the test assets are missing at {SHARED}: CI must provide ../shared.")

RANDOM_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_local_dir(directory: Path, model_cfg: dict, seed: int, image_size: int = 32) -> Path:
    """An open_clip local-dir model with seeded random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))
    preprocess = {"size": image_size, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    return directory


@pytest.fixture(scope="session")
def random_clip_dir(tmp_path_factory) -> Path:
    return write_local_dir(tmp_path_factory.mktemp("random-clip"), RANDOM_CLIP_CFG, seed=0)


@pytest.fixture(scope="session")
def random_classifier(random_clip_dir) -> ZeroShotClassifier:
    clip = load_clip(f"local-dir:{random_clip_dir}")
    return ZeroShotClassifier.from_clip(clip, CIFAR10_CLASSES)


@pytest.fixture(scope="session")
def tiny_clip():
    if not TINY_CLIP_DIR.is_dir() and not IN_CI:
        pytest.skip(f"tiny CLIP not found at {TINY_CLIP_DIR}")
    return load_clip(f"local-dir:{TINY_CLIP_DIR}")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_clip) -> ZeroShotClassifier:
    return ZeroShotClassifier.from_clip(tiny_clip, CIFAR10_CLASSES)


@pytest.fixture
def images() -> torch.Tensor:
    """Random images with saturated pixels too, so the [0, 1] box constraint is exercised."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    return x


def transfer_and_adaptive(defense, classifier, images, labels, budget: dict, rng) -> dict:
    """A defense against PGD crafted on the undefended model and against PGD through it (same budget,
    same draws): the defended accuracy of each, and at the transfer images the gradient of the loss
    through the defense's exact view beside the undefended one. ``rng(n, seed=...)`` makes streams."""
    import torch.nn.functional as F

    from counterattack import PGD, AdaptiveAttack, ImageRandomness

    def defended_accuracy(adversarial: torch.Tensor) -> float:
        logits = defense(classifier, adversarial, ImageRandomness.from_seed(0, len(images), "defense")).logits
        return (logits.argmax(-1) == labels).float().mean().item()

    transfer = PGD(**budget)(classifier, images, labels, rng(len(images)))
    adaptive = AdaptiveAttack(defense, PGD(**budget))(classifier, images, labels, rng(len(images)))
    x = transfer.clone().requires_grad_(True)
    view = defense.attack_view(classifier, x, rng(len(images), seed=1), "exact")
    (through,) = torch.autograd.grad(F.cross_entropy(view.logits, labels, reduction="sum"), x)
    (undefended,) = torch.autograd.grad(F.cross_entropy(classifier.logits(x), labels, reduction="sum"), x)
    return {"transfer": defended_accuracy(transfer), "adaptive": defended_accuracy(adaptive),
            "through": through, "undefended": undefended}


def free_port() -> str:
    """A TCP port nobody listens on now, for torchrun: a fixed one clashes when two test runs share a machine."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])
